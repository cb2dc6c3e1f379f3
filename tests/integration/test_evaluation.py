"""Evaluation across ranks: metrics summed over 2 gloo ranks equal those of all rows at once; a
checkpoint's `mmoe eval` and `mmoe predict` (a file per rank) on 2 ranks agree with the metrics'
definitions applied to the predictions and the split's labels."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from conftest import free_port, mmoe  # noqa: E402
from reference import TASKS, direct_eval, eval_data, pairwise_auc  # noqa: E402

from app.config import TaskConfig  # noqa: E402
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


def test_eval_and_predictions_of_a_checkpoint_agree_with_the_definitions(mixed_run, tiny_data, tmp_path):
    mmoe("predict", "--checkpoint", mixed_run, "--out", tmp_path / "pred", ranks=2)
    parts = [pq.read_table(tmp_path / "pred" / f"part-{rank:05d}.parquet") for rank in (0, 1)]
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert all(part.num_rows > 0 for part in parts)
    predictions = pa.concat_tables(parts).sort_by("row_id")
    # row ids count the split's rows, its files in name order
    labels = pa.concat_tables([pq.read_table(f, columns=["click", "convert"])
                               for f in sorted((tiny_data / "test").glob("*.parquet"))])
    assert predictions.column("row_id").to_pylist() == list(range(labels.num_rows))

    def matrix(table):
        return np.stack([table.column(t).to_numpy() for t in ("click", "convert")], axis=1)

    tasks = {"click": TaskConfig(type="binary"), "convert": TaskConfig(type="regression")}
    want = direct_eval(matrix(predictions), matrix(labels), np.ones(labels.num_rows), tasks, split="test")
    got = json.loads(mmoe("eval", "--checkpoint", mixed_run, ranks=2).stdout)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # the training run's last evaluation scored the same weights
    for task, metrics in json.loads((mixed_run / "summary.json").read_text())["tasks"].items():
        for metric, value in metrics.items():
            assert value == pytest.approx(want[f"test/{task}/{metric}"], rel=1e-5, abs=1e-6), (task, metric)
