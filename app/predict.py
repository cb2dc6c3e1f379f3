"""Scoring a checkpoint: `mmoe predict` writes per-task scores, `mmoe eval` computes metrics.

Both load the checkpoint into whatever plan this world size gets, like a resume does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from app import checkpoint
from app.config import Config, load_config
from app.distributed import Env, init_distributed
from app.evaluate import evaluate, score
from app.feed import split_data
from app.pipeline import make_pipeline
from app.sharded import build, resolve_columns


def restore(path: str | Path, overrides: list[str]) -> tuple[Config, Env, torch.nn.Module,
                                                              TrainPipelineSparseDist]:
    """A checkpoint folder, or a run folder (its best checkpoint with early stopping, else its
    latest), ready to score."""
    path = checkpoint.resolve(path)
    # the run's plan file was made for its world size; plan afresh unless told otherwise
    cfg = load_config(path / "config.json", ["--plan.file", "", *overrides])
    env = init_distributed(cfg.train.device)
    dmp, optimizer, _ = build(cfg, env, resolve_columns(cfg))
    checkpoint.load(path, dmp)
    return cfg, env, dmp, make_pipeline(cfg.train.pipeline, dmp, optimizer, env)


def evaluate_checkpoint(path: str | Path, split: str, overrides: list[str]) -> dict[str, float]:
    cfg, env, dmp, pipeline = restore(path, overrides)
    data = split_data(cfg, env, resolve_columns(cfg), split, train=False)
    return evaluate(pipeline, dmp, data, cfg, env, split=split)


def predict(path: str | Path, split: str, out: str | Path, merge: bool, overrides: list[str]) -> Path:
    """Writes row_id plus one score column per task (probabilities for binary tasks):
    OUT/part-<rank>.parquet, or with `merge` a single OUT/predictions.parquet from rank 0."""
    cfg, env, dmp, pipeline = restore(path, overrides)
    data = split_data(cfg, env, resolve_columns(cfg), split, train=False)
    ids, scores = [], []
    for o in score(pipeline, dmp, data, cfg, env):
        keep = o.weights > 0
        ids.append(o.row_ids[keep].cpu())
        scores.append(o.preds[keep].float().cpu())
    ids_np = torch.cat(ids).numpy()
    scores_np = torch.cat(scores).numpy()
    out = Path(out)
    if merge and env.world_size > 1:
        gathered = [None] * env.world_size
        dist.all_gather_object(gathered, (ids_np, scores_np))
        ids_np = np.concatenate([g[0] for g in gathered])
        scores_np = np.concatenate([g[1] for g in gathered])
    table = pa.table({"row_id": ids_np, **{t: scores_np[:, i] for i, t in enumerate(cfg.tasks)}})
    table = table.sort_by("row_id")
    if merge:
        target = out / "predictions.parquet"
        if env.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, target)
    else:
        out.mkdir(parents=True, exist_ok=True)
        target = out / f"part-{env.rank:05d}.parquet"
        pq.write_table(table, target)
    dist.barrier()
    return target

