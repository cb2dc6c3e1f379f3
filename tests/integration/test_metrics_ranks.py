"""Evaluation metrics over 2 gloo ranks, each scoring its own share of the rows, equal those of
one process scoring them all: sums, skipped rows and AUC states are combined across ranks."""
from __future__ import annotations

import os
import sys

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from conftest import free_port  # noqa: E402
from unit.test_metrics import TASKS, eval_data  # noqa: E402

from app.metrics import EvalMetrics  # noqa: E402

ROWS, SPLIT = 500, 180  # rank 0 scores rows [0, 180), rank 1 the rest: unequal shares


def worker(rank: int, world: int, port: int, auc_bins: int, result: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    preds, labels, weights = eval_data(ROWS, seed=3)
    mine = slice(0, SPLIT) if rank == 0 else slice(SPLIT, ROWS)
    metrics = EvalMetrics(TASKS, auc_bins)
    metrics.update(preds[mine], labels[mine], weights[mine])
    result[rank] = metrics.compute()
    dist.destroy_process_group()


@pytest.mark.parametrize("auc_bins", [0, 1000])
def test_metrics_over_ranks_equal_one_process(auc_bins):
    result = mp.Manager().dict()
    mp.spawn(worker, args=(2, free_port(), auc_bins, result), nprocs=2)
    one = EvalMetrics(TASKS, auc_bins)
    one.update(*eval_data(ROWS, seed=3))
    want = one.compute()
    assert want["eval/rows"] + want["eval/skipped_rows"] == ROWS
    for rank in (0, 1):
        assert result[rank] == pytest.approx(want, rel=1e-9), rank
