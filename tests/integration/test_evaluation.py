"""Evaluation across ranks: metrics summed over 2 gloo ranks equal those of all rows at once."""
from __future__ import annotations

import os
import sys

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from conftest import free_port  # noqa: E402
from reference import TASKS, direct_eval, eval_data, pairwise_auc  # noqa: E402

from app.metrics import EvalMetrics  # noqa: E402

ROWS, BINS = 400, 1000
CUTS = {0: [0, 120, 250], 1: [250, 400, 400]}  # each rank's batches; rank 1's second is empty


def metrics_worker(rank: int, world: int, port: int, result: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    preds, labels, weights = eval_data(ROWS, seed=1)
    exact, binned = EvalMetrics(TASKS), EvalMetrics(TASKS, auc_bins=BINS)
    cuts = CUTS[rank]
    for a, b in zip(cuts[:-1], cuts[1:]):
        for metrics in (exact, binned):
            metrics.update(preds[a:b], labels[a:b], weights[a:b])
    result[rank] = exact.compute(), binned.compute()
    dist.destroy_process_group()


def test_metrics_over_two_ranks_equal_those_of_all_rows():
    """Exact AUC (the predictions gathered) and binned AUC (the counts summed) alike."""
    result = mp.Manager().dict()
    mp.spawn(metrics_worker, args=(2, free_port(), result), nprocs=2)
    preds, labels, weights = eval_data(ROWS, seed=1)
    want = direct_eval(preds, labels, weights)
    keep = weights > 0
    cut = (preds[keep] * BINS).floor().clamp(max=BINS - 1).numpy()  # each prediction's bin
    for rank in (0, 1):
        exact, binned = result[rank]
        assert exact == pytest.approx(want, rel=1e-6), rank
        for i, task in enumerate(TASKS):
            if TASKS[task].type == "binary":
                auc = pairwise_auc(cut[:, i], labels[keep][:, i].numpy())
                assert binned[f"eval/{task}/auc"] == pytest.approx(auc, rel=1e-9), (rank, task)
