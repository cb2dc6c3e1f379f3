"""Synthetic Criteo-shape multi-task data with a known best achievable AUC.

Labels come from a hidden ground-truth model: per task, a logit that is linear in the dense
features plus one learned-able effect per categorical id. Tasks share a fraction
`correlation` of their weights, so task relatedness is a dial. The AUC of the true
probabilities on each split is stored in the schema's meta as the ceiling a model can reach.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from app.data import Schema


@dataclass
class SyntheticSpec:
    rows: dict[str, int] = field(default_factory=lambda: {"train": 20_000, "test": 5_000})
    num_dense: int = 13
    cardinalities: list[int] = field(default_factory=lambda: [1000] * 26)
    multi_hot: dict[int, float] = field(default_factory=dict)  # column index -> mean list length
    tasks: list[str] = field(default_factory=lambda: ["click", "convert"])
    correlation: float = 0.5  # shared fraction of the tasks' ground-truth weights
    signal: float = 1.5  # scale of the true logits; larger -> easier
    files_per_split: int = 1
    row_group_size: int = 4096
    seed: int = 0


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Rank-based (Mann-Whitney) AUC."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    pos = labels.astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / max(n_pos * n_neg, 1))


class _Truth:
    """The hidden model; drawn once from the seed so every split shares it."""

    def __init__(self, spec: SyntheticSpec, rng: np.random.Generator):
        t, rho = len(spec.tasks), spec.correlation
        mix = lambda shape: (np.sqrt(rho) * rng.normal(size=shape)[None]  # noqa: E731
                             + np.sqrt(1 - rho) * rng.normal(size=(t, *shape)))
        self.dense_w = mix((spec.num_dense,)) / np.sqrt(spec.num_dense + len(spec.cardinalities))
        self.effects = [mix((n,)) / np.sqrt(spec.num_dense + len(spec.cardinalities))
                        for n in spec.cardinalities]
        self.bias = rng.normal(-0.5, 0.3, size=t)
        self.signal = spec.signal

    def logits(self, dense: np.ndarray, ids: list[np.ndarray], lengths: list[np.ndarray]) -> np.ndarray:
        z = dense @ self.dense_w.T + self.bias  # [N, T]
        for eff, v, ln in zip(self.effects, ids, lengths):
            rows = np.repeat(np.arange(len(ln)), ln)
            contrib = np.zeros((len(ln), eff.shape[0]))
            np.add.at(contrib, rows, eff[:, v].T)
            z += contrib / np.maximum(ln, 1)[:, None]
        return self.signal * z


def _ids(rng: np.random.Generator, n: int, card: int) -> np.ndarray:
    """Power-law ids: small ids are frequent, as in click logs."""
    return np.minimum((card * rng.random(n) ** 3).astype(np.int64), card - 1)


def generate(out: str | Path, spec: SyntheticSpec) -> Schema:
    out = Path(out)
    truth = _Truth(spec, np.random.default_rng([spec.seed, 0]))
    dense_names = [f"d{i}" for i in range(spec.num_dense)]
    cat_names = [f"c{i}" for i in range(len(spec.cardinalities))]
    meta: dict = {"generator": "synthetic", "seed": spec.seed, "correlation": spec.correlation,
                  "best_auc": {}, "label_rate": {}}
    for s, (split, rows) in enumerate(spec.rows.items()):
        rng = np.random.default_rng([spec.seed, 1 + s])
        dense = rng.normal(size=(rows, spec.num_dense)).astype(np.float32)
        lengths = [rng.poisson(spec.multi_hot[i] - 1, rows) + 1 if i in spec.multi_hot
                   else np.ones(rows, np.int64) for i in range(len(cat_names))]
        ids = [_ids(rng, int(ln.sum()), n) for ln, n in zip(lengths, spec.cardinalities)]
        prob = 1 / (1 + np.exp(-truth.logits(dense, ids, lengths)))
        labels = (rng.random(prob.shape) < prob).astype(np.float32)
        cols: dict[str, pa.Array] = {t: pa.array(labels[:, k]) for k, t in enumerate(spec.tasks)}
        cols.update({n: pa.array(dense[:, i]) for i, n in enumerate(dense_names)})
        for i, n in enumerate(cat_names):
            if i in spec.multi_hot:
                offsets = np.concatenate([[0], np.cumsum(lengths[i])]).astype(np.int32)
                cols[n] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids[i]))
            else:
                cols[n] = pa.array(ids[i])
        table = pa.table(cols)
        (out / split).mkdir(parents=True, exist_ok=True)
        bounds = np.linspace(0, rows, spec.files_per_split + 1).astype(int)
        for f, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            pq.write_table(table.slice(a, b - a), out / split / f"part-{f}.parquet",
                           row_group_size=spec.row_group_size)
        meta["best_auc"][split] = {t: _auc(prob[:, k], labels[:, k]) for k, t in enumerate(spec.tasks)}
        meta["label_rate"][split] = {t: float(labels[:, k].mean()) for k, t in enumerate(spec.tasks)}
    schema = Schema(labels=list(spec.tasks), dense=dense_names,
                    categorical=dict(zip(cat_names, spec.cardinalities)),
                    multi_hot=[cat_names[i] for i in spec.multi_hot], meta=meta)
    schema.save(out)
    return schema


def add_data_command(sub) -> None:
    p = sub.add_parser("synthetic", help="Criteo-shape rows with a known best achievable AUC")
    p.add_argument("--out", default="data/debug")
    p.add_argument("--rows", default="20000,5000", help="train,test rows")
    p.add_argument("--cardinalities", default=",".join(["1000"] * 26),
                   help="one vocabulary size per categorical column")
    p.add_argument("--dense", type=int, default=13)
    p.add_argument("--tasks", default="click,convert")
    p.add_argument("--correlation", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run)


def _run(args) -> None:
    train_rows, test_rows = (int(x) for x in args.rows.split(","))
    spec = SyntheticSpec(rows={"train": train_rows, "test": test_rows}, num_dense=args.dense,
                         cardinalities=[int(x) for x in args.cardinalities.split(",")],
                         tasks=args.tasks.split(","), correlation=args.correlation, seed=args.seed)
    schema = generate(args.out, spec)
    print(f"wrote {args.out}: best achievable test AUC {schema.meta['best_auc']['test']}")
