"""Scoring through the pipeline: once a pipeline has run, the model's forward belongs to it, so
evaluation and prediction go through `pipeline.progress` with the model in eval mode (the
pipeline then skips backward)."""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator

import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from app.config import Config
from app.data.batch import Batch
from app.data.loader import iter_batches
from app.data.reader import ParquetBatches
from app.distributed import Env
from app.feed import AgreedBatches
from app.metrics import EvalMetrics
from app.model import Outputs


def run_pipeline(pipeline: TrainPipelineSparseDist, batches: Iterator[Batch]) -> Iterator[Outputs]:
    """Outputs of `pipeline.progress` until `batches` is exhausted (the pipeline drains)."""
    while True:
        try:
            yield pipeline.progress(batches)
        except StopIteration:
            return


def score(pipeline: TrainPipelineSparseDist, dmp: torch.nn.Module, data: ParquetBatches, cfg: Config,
          env: Env) -> Iterator[Outputs]:
    """The outputs of every batch of `data`, through the pipeline in scoring mode (`scoring`).
    Bad input stops every rank before the same batch, then raises its `DataError`."""
    batches = AgreedBatches(iter_batches(data, cfg.data.num_workers, env.device.type == "cuda"), env.host_group)
    with scoring(dmp):
        yield from run_pipeline(pipeline, batches)
    if batches.error is not None:
        raise batches.error


def evaluate(pipeline: TrainPipelineSparseDist, dmp: torch.nn.Module, data: ParquetBatches,
             cfg: Config, env: Env, split: str = "eval") -> dict[str, float]:
    """Metrics of a whole split (`EvalMetrics`, summed over the ranks)."""
    metrics = EvalMetrics(cfg.tasks, cfg.train.eval_auc_bins).to(env.device)
    for out in score(pipeline, dmp, data, cfg, env):
        metrics.update(out.preds, out.labels, out.weights)
    return metrics.compute(split)


@contextlib.contextmanager
def scoring(dmp: torch.nn.Module) -> Iterator[None]:
    """Eval mode (the pipeline then skips backward), no gradients, and the compiled parts
    (`model.compile`) run eagerly: each scoring batch size would compile again, for a pass
    made once per evaluation. Python's collector runs as usual (training may have stopped
    it: see `collecting_every`). Back to training mode after."""
    dmp.eval()
    collector_was_on = gc.isenabled()
    gc.enable()
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            yield
    finally:
        if not collector_was_on:
            gc.disable()
        dmp.train()
