"""Scoring a checkpoint: `mmoe predict` writes per-task scores, `mmoe eval` computes metrics.

Both load the checkpoint into whatever plan this world size gets, like a resume does.
`mmoe predict --artifact` scores with an exported model instead (`app.artifact`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from app import checkpoint
from app.artifact import CONFIG, Artifact, ArtifactError, read_meta
from app.config import Config, load_config
from app.data.batch import Batch
from app.data.loader import iter_batches
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
    if merge and env.world_size > 1:
        gathered = [None] * env.world_size
        dist.all_gather_object(gathered, (ids_np, scores_np))
        ids_np = np.concatenate([g[0] for g in gathered])
        scores_np = np.concatenate([g[1] for g in gathered])
    target = Path(out) / ("predictions.parquet" if merge else f"part-{env.rank:05d}.parquet")
    if not merge or env.rank == 0:
        write_scores(ids_np, scores_np, list(cfg.tasks), target)
    dist.barrier()
    return target


def artifact_outputs(folder: str | Path, split: str, overrides: list[str]) -> Iterator[tuple[Batch, torch.Tensor]]:
    """(batch, scores [B, T] on the CPU) for each batch of a split, scored by an exported
    artifact (`mmoe export`) alone, in this one process; the data is read as its run read it
    (the artifact's config.json, with `overrides`)."""
    model = Artifact(folder)
    cfg = load_config(Path(folder) / CONFIG, overrides)
    columns = resolve_columns(cfg)
    exported = (model.meta["dense"], model.meta["features"], model.meta["cardinality"])
    if (list(columns.dense), list(columns.categorical), list(columns.cardinality)) != exported:
        raise ArtifactError(f"{cfg.data.path}: its columns or cardinalities differ from those {folder} was "
                            f"exported with (meta.json); pass --data.path of a data set of the same schema")
    data = split_data(cfg, Env(0, 1, 0, 1, torch.device("cpu")), columns, split, train=False)
    with torch.inference_mode():
        for batch in iter_batches(data, cfg.data.num_workers, pin_memory=False):
            features = batch.sparse_features
            yield batch, model(batch.dense, features.values(), features.lengths()).cpu()


def predict_artifact(folder: str | Path, split: str, out: str | Path, overrides: list[str]) -> Path:
    """OUT/predictions.parquet of `artifact_outputs`, as `predict` with `merge` writes it."""
    ids, scores = [], []
    for batch, batch_scores in artifact_outputs(folder, split, overrides):
        keep = batch.weights > 0
        ids.append(batch.row_ids[keep])
        scores.append(batch_scores[keep])
    return write_scores(torch.cat(ids).numpy(), torch.cat(scores).numpy(), read_meta(folder)["tasks"],
                        Path(out) / "predictions.parquet")


def write_scores(ids: np.ndarray, scores: np.ndarray, tasks: list[str], target: Path) -> Path:
    """row_id and one column per task, in row order."""
    table = pa.table({"row_id": ids, **{t: scores[:, i] for i, t in enumerate(tasks)}}).sort_by("row_id")
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, target)
    return target
