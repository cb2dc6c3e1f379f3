"""The MMoE paper's synthetic regression pair, with task correlation as a dial.

Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts" (KDD 2018), section 4, synthetic data: u1, u2 orthogonal unit vectors in
R^d; w1 = c u1, w2 = c (p u1 + sqrt(1 - p^2) u2); x ~ N(0, I_d);
y_i = w_i . x + sum_j sin(alpha_j w_i . x + beta_j) + noise, noise ~ N(0, 0.01) (variance).
The cosine of w1 and w2 is p (`correlation`); alpha_j, beta_j ~ N(0, 1) are shared by both
tasks, so the labels' own Pearson correlation falls with p but does not equal it (the schema's
meta stores the measured one). The sines come from their own seed (`sine_seed`): they set how
hard the tasks are, while `seed` draws the directions u1, u2 and the rows (the problem looks
the same from any direction, so seeds repeat one experiment).

Columns: dense x0..x{d-1}, labels y1 and y2, and two categorical columns, x0_bucket and
x1_bucket (x0, x1 cut at standard-normal quantiles into `buckets` ids): the model needs at
least one embedding table, and these carry no information the dense columns lack.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from app.data.schema import Schema

LABELS = ["y1", "y2"]
BUCKETED = [0, 1]  # dense columns also given as bucket ids


@dataclass
class PaperSpec:
    rows: dict[str, int] = field(default_factory=lambda: {"train": 20_000, "test": 5_000})
    dim: int = 100  # d, the input dimension
    correlation: float = 0.5  # p, the cosine of the two tasks' weight vectors, in [-1, 1]
    scale: float = 1.0  # c
    num_sines: int = 10  # m
    noise_var: float = 0.01
    buckets: int = 8  # ids per categorical column
    row_group_size: int = 4096
    seed: int = 0  # draws u1, u2; each split's rows use (seed, split)
    sine_seed: int = 0  # draws alpha and beta


def _truth(spec: PaperSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [2, d], alpha [m], beta [m]."""
    rng = np.random.default_rng([spec.seed, 0])
    q, _ = np.linalg.qr(rng.normal(size=(spec.dim, 2)))  # two orthonormal columns
    u1, u2 = q[:, 0], q[:, 1]
    p = spec.correlation
    w = spec.scale * np.stack([u1, p * u1 + np.sqrt(1 - p * p) * u2])
    sines = np.random.default_rng([spec.sine_seed, 2])
    return w, sines.normal(size=spec.num_sines), sines.normal(size=spec.num_sines)


def draw(spec: PaperSpec, split: str, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(x [rows, d] float32, y [rows, 2] float32) of one split."""
    w, alpha, beta = _truth(spec)
    rng = np.random.default_rng([spec.seed, 1, *split.encode()])
    x = rng.normal(size=(rows, spec.dim))
    z = x @ w.T  # [rows, 2]
    y = z + np.sin(alpha * z[..., None] + beta).sum(-1)
    y += rng.normal(scale=np.sqrt(spec.noise_var), size=y.shape)
    return x.astype(np.float32), y.astype(np.float32)


def generate(out: str | Path, spec: PaperSpec) -> Schema:
    """Writes one Parquet file per split and `schema.json` into `out`."""
    if not -1 <= spec.correlation <= 1:
        raise ValueError(f"correlation {spec.correlation} is outside [-1, 1]")
    if spec.dim < 2:
        raise ValueError(f"dim {spec.dim}: two orthogonal directions need at least 2 dimensions")
    out = Path(out)
    edges = [NormalDist().inv_cdf(k / spec.buckets) for k in range(1, spec.buckets)]  # equal-mass cuts of N(0, 1)
    meta: dict = {"generator": "mmoe_paper", "spec": {k: v for k, v in asdict(spec).items() if k != "rows"},
                  "rows": {}, "label_corr": {}, "label_var": {}}
    for split, rows in spec.rows.items():
        x, y = draw(spec, split, rows)
        cols: dict[str, np.ndarray] = {t: y[:, k] for k, t in enumerate(LABELS)}
        cols.update({f"x{i}": x[:, i] for i in range(spec.dim)})
        cols.update({f"x{i}_bucket": np.searchsorted(edges, x[:, i]).astype(np.int64) for i in BUCKETED})
        (out / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols), out / split / "part-0.parquet", row_group_size=spec.row_group_size)
        meta["rows"][split] = rows
        meta["label_corr"][split] = float(np.corrcoef(y.T)[0, 1]) if rows > 1 else 0.0
        meta["label_var"][split] = {t: float(y[:, k].var()) for k, t in enumerate(LABELS)}
    schema = Schema(labels=list(LABELS), dense=[f"x{i}" for i in range(spec.dim)],
                    categorical={f"x{i}_bucket": spec.buckets for i in BUCKETED}, meta=meta)
    schema.save(out)
    return schema


def add_data_command(sub) -> None:
    p = sub.add_parser("mmoe-paper", help="the MMoE paper's two regression tasks of set correlation")
    p.add_argument("--out", default="data/mmoe_paper")
    p.add_argument("--rows", default="20000,5000", help="train,test rows")
    p.add_argument("--correlation", type=float, default=0.5, help="cosine of the task weights, -1 to 1")
    p.add_argument("--dim", type=int, default=100, help="input dimension d")
    p.add_argument("--num-sines", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="draws the directions and the rows")
    p.add_argument("--sine-seed", type=int, default=0, help="draws the sines' alpha and beta")
    p.set_defaults(run=_run)


def _run(args) -> None:
    train_rows, test_rows = (int(v) for v in args.rows.split(","))
    spec = PaperSpec(rows={"train": train_rows, "test": test_rows}, dim=args.dim,
                     correlation=args.correlation, num_sines=args.num_sines, seed=args.seed,
                     sine_seed=args.sine_seed)
    meta = generate(args.out, spec).meta
    print(f"wrote {args.out}: label correlation {meta['label_corr']['train']:.3f} (train), "
          f"label variance {meta['label_var']['train']}")
