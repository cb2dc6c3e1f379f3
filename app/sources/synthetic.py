"""Synthetic Criteo-shape multi-task data with a known best achievable AUC, at any size.

Labels come from a hidden ground-truth model, drawn once from the seed. Task t's label is 1
with probability sigmoid(z_t), where

    z_t = signal * (w_t . dense + b_t + sum over columns c of effect_t,c[id mod 2**17])

with dense features standard normal, w_t and the effects normal with variance
1 / (dense columns + categorical columns), and b_t ~ N(-0.5, 0.3). A multi-hot column
contributes the mean of its ids' effects. Ids i and i + 2**17 share an effect, so memory does
not grow with the cardinality; an id carries signal only as far as a model sees it often
enough, which power-law ids (the head) allow and uniform ids in a 40M-row table do not. Tasks
share a fraction `correlation` of their weights and effects, so task relatedness is a dial.
The AUC of the true probabilities on each split (on up to `auc_rows` rows) is stored in the
schema's meta as `best_auc`, the ceiling a model can reach.

Ids are drawn per column as `distribution` says: "skew" (floor(cardinality * u**skew), u
uniform; the default), "uniform", or "zipf" (p(id) ~ (id + 1)**-zipf_alpha). Multi-hot columns
hold lists whose lengths vary by row around a mean (`multi_hot`) or have one fixed length
(`multi_hot_sizes`, as MLPerf's multi-hot Criteo 1TB).

Each output file is drawn from its own generator seeded by (seed, split, file index), so a
process pool can write files in parallel and the result does not depend on the number of
workers. The same rows can be written as Criteo TSV (labels, 13 integer counts, 26 hex
strings, empty fields for missing values) to feed `mmoe data criteo-tsv`.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from app.data.errors import DataError
from app.data.schema import Schema

EFFECTS_PER_COLUMN = 1 << 17  # the hidden effect of id i is effect[i % this]: bounded memory
CHUNK_ROWS = 1 << 16  # rows drawn at once inside a file (a multiple of the row group size)
TRUTH_FILE = "truth.json"  # best AUC and label rates of a TSV data set
DISTRIBUTIONS = ("skew", "uniform", "zipf")
COMPRESSIONS = ("snappy", "zstd", "none")
SHAPES = {  # --shape: rows of each table and ids of each row, per categorical column
    # MLPerf DLRM-DCNv2's multi-hot Criteo 1TB: about 204M rows, 214 ids a row
    "criteo1tb": ([40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
                   2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36],
                  [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]),
}


@dataclass
class SyntheticSpec:
    rows: dict[str, int] = field(default_factory=lambda: {"train": 20_000, "test": 5_000})
    num_dense: int = 13
    cardinalities: list[int] = field(default_factory=lambda: [1000] * 26)
    multi_hot: dict[int, float] = field(default_factory=dict)  # column index -> mean list length
    multi_hot_sizes: dict[int, int] = field(default_factory=dict)  # column index -> every list's length
    tasks: list[str] = field(default_factory=lambda: ["click", "convert"])
    correlation: float = 0.5  # shared fraction of the tasks' ground-truth weights
    signal: float = 1.5  # scale of the true logits; larger -> easier
    files_per_split: int = 1
    row_group_size: int = 4096
    seed: int = 0
    distribution: str = "skew"  # of the ids: "skew", "uniform" or "zipf"
    skew: float = 3.0  # id = floor(cardinality * u**skew), u uniform: 1 is uniform, larger is more skewed
    zipf_alpha: float = 1.05  # zipf: p(id) ~ (id + 1)**-zipf_alpha
    missing: float = 0.0  # TSV only: fraction of dense and categorical fields left empty
    # Parquet only: "snappy" (pyarrow's default), "zstd" or "none"; uncompressed files decode in
    # about half the CPU time at 214 ids a row (more reader headroom, about 2.3x the bytes)
    compression: str = "snappy"
    auc_rows: int = 2_000_000  # best_auc uses at most this many rows per split (a sample of each file)

    def check(self) -> None:
        """Names the first setting that cannot be drawn."""
        if self.distribution not in DISTRIBUTIONS:
            raise DataError(f"distribution {self.distribution!r} is unknown; use one of {', '.join(DISTRIBUTIONS)}")
        if self.compression not in COMPRESSIONS:
            raise DataError(f"compression {self.compression!r} is unknown; use one of {', '.join(COMPRESSIONS)}")
        if self.distribution == "zipf" and self.zipf_alpha <= 0:
            raise DataError(f"zipf_alpha is {self.zipf_alpha}; use a positive exponent, e.g. 1.05")
        for i in [*self.multi_hot, *self.multi_hot_sizes]:
            if not 0 <= i < len(self.cardinalities):
                raise DataError(f"multi-hot column {i} does not exist; columns are 0..{len(self.cardinalities) - 1}")
        both = sorted(set(self.multi_hot) & set(self.multi_hot_sizes))
        if both:
            raise DataError(f"column {both[0]} has a mean list length and a fixed one; give one of them")
        bad = {i: k for i, k in self.multi_hot_sizes.items() if k < 1}
        if bad:
            raise DataError(f"multi-hot sizes {bad}: a list holds at least one id")


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Rank-based (Mann-Whitney) AUC."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    pos = labels.astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / max(n_pos * n_neg, 1))


class _Truth:
    """The hidden model; drawn once from the seed so every split and file shares it."""

    def __init__(self, spec: SyntheticSpec):
        rng = np.random.default_rng([spec.seed, 0])
        t, rho = len(spec.tasks), spec.correlation
        mix = lambda shape: (np.sqrt(rho) * rng.normal(size=shape)[None]  # noqa: E731
                             + np.sqrt(1 - rho) * rng.normal(size=(t, *shape)))
        scale = np.sqrt(spec.num_dense + len(spec.cardinalities))
        self.dense_w = mix((spec.num_dense,)) / scale
        self.effects = [mix((min(n, EFFECTS_PER_COLUMN),)) / scale for n in spec.cardinalities]
        self.bias = rng.normal(-0.5, 0.3, size=t)
        self.signal = spec.signal

    def logits(self, dense: np.ndarray, ids: list[np.ndarray],
               lengths: list[np.ndarray | None]) -> np.ndarray:
        """dense [N, D], per column ids (concatenated lists) and lengths (None: one id a row)."""
        z = dense @ self.dense_w.T + self.bias  # [N, T]
        for eff, v, ln in zip(self.effects, ids, lengths):
            e = eff[:, v % eff.shape[1]]  # [T, ids]
            if ln is None:
                z += e.T
                continue
            rows = np.repeat(np.arange(len(ln)), ln)
            for k in range(e.shape[0]):  # mean of the list's effects
                z[:, k] += np.bincount(rows, weights=e[k], minlength=len(ln)) / np.maximum(ln, 1)
        return self.signal * z


def _ids(rng: np.random.Generator, n: int, card: int, spec: SyntheticSpec) -> np.ndarray:
    """n ids in [0, card) as `spec.distribution` says; but for "uniform", small ids are the
    frequent ones, as in click logs."""
    if spec.distribution == "uniform":
        return rng.integers(0, card, n)
    if spec.distribution == "zipf":
        return zipf_ids(rng.random(n), card, spec.zipf_alpha)
    return np.minimum((card * rng.random(n) ** spec.skew).astype(np.int64), card - 1)


def zipf_ids(u: np.ndarray, card: int, alpha: float) -> np.ndarray:
    """Uniform u in [0, 1) -> ids in [0, card) with p(id) ~ (id + 1)**-alpha: `zipf_inverse_cdf`,
    rounded (the midpoint rule keeps p(0) within about 10% of the discrete law's, and the rest
    closer). A closed form: no per-id table, however large `card`."""
    return np.clip((zipf_inverse_cdf(u, card, alpha) - 0.5).astype(np.int64), 0, card - 1)


def zipf_inverse_cdf(u, card, alpha: float):
    """The inverse CDF of the density x**-alpha on [0.5, card + 0.5), in arithmetic alone, so
    that numpy arrays and torch tensors (the benchmark draws ids on the GPU) take it alike."""
    lo, hi = 0.5, card + 0.5
    if alpha == 1:
        return lo * (hi / lo) ** u
    a = 1 - alpha
    return (lo**a + u * (hi**a - lo**a)) ** (1 / a)


@dataclass
class _Chunk:
    dense: np.ndarray  # [N, D] float32, standard normal
    ids: list[np.ndarray]
    lengths: list[np.ndarray | None]
    prob: np.ndarray  # [N, T] true probabilities
    labels: np.ndarray  # [N, T] float32 0/1


def _draw(spec: SyntheticSpec, truth: _Truth, rng: np.random.Generator, n: int) -> _Chunk:
    dense = rng.normal(size=(n, spec.num_dense)).astype(np.float32)
    lengths = [np.full(n, spec.multi_hot_sizes[i]) if i in spec.multi_hot_sizes else
               rng.poisson(spec.multi_hot[i] - 1, n) + 1 if i in spec.multi_hot else None
               for i in range(len(spec.cardinalities))]
    ids = [_ids(rng, n if ln is None else int(ln.sum()), card, spec)
           for ln, card in zip(lengths, spec.cardinalities)]
    prob = 1 / (1 + np.exp(-truth.logits(dense, ids, lengths)))
    labels = (rng.random(prob.shape) < prob).astype(np.float32)
    return _Chunk(dense, ids, lengths, prob, labels)


def _parquet_table(spec: SyntheticSpec, c: _Chunk) -> pa.Table:
    cols: dict[str, pa.Array] = {t: pa.array(c.labels[:, k]) for k, t in enumerate(spec.tasks)}
    cols.update({f"d{i}": pa.array(c.dense[:, i]) for i in range(spec.num_dense)})
    for i, (v, ln) in enumerate(zip(c.ids, c.lengths)):
        if ln is None:
            cols[f"c{i}"] = pa.array(v)
        else:
            offsets = np.concatenate([[0], np.cumsum(ln)]).astype(np.int32)
            cols[f"c{i}"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(v))
    return pa.table(cols)


HEX_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)


def hex_strings(values: np.ndarray, missing: np.ndarray | None = None) -> pa.Array:
    """uint32 values -> 8-digit lowercase hex strings (Criteo's look), nulls where `missing`."""
    v = values.astype(np.uint32)
    digits = HEX_DIGITS[(v[:, None] >> np.arange(28, -1, -4, dtype=np.uint32)) & 15]  # [N, 8]
    offsets = np.arange(0, 8 * len(v) + 1, 8, dtype=np.int32)
    validity = None
    if missing is not None and missing.any():
        validity = pa.array(~missing).buffers()[1]
    return pa.StringArray.from_buffers(len(v), pa.py_buffer(offsets), pa.py_buffer(digits.tobytes()),
                                       validity, null_count=-1)


def _tsv_table(spec: SyntheticSpec, c: _Chunk, rng: np.random.Generator) -> pa.Table:
    """Labels as 0/1, dense as counts floor(expm1(1.5 (x + 1.5))) (so log1p recovers a clipped,
    scaled x), ids as hex of a per-column bijective scramble (so hash sizes do not align with
    the hidden ids)."""
    n, num_cat = len(c.dense), len(spec.cardinalities)
    missing = rng.random((n, spec.num_dense + num_cat)) < spec.missing if spec.missing else None
    cols: dict[str, pa.Array] = {t: pa.array(c.labels[:, k].astype(np.int8))
                                 for k, t in enumerate(spec.tasks)}
    counts = np.floor(np.expm1(np.maximum(1.5 * (c.dense.astype(np.float64) + 1.5), 0))).astype(np.int64)
    for i in range(spec.num_dense):
        mask = None if missing is None else missing[:, i]
        cols[f"d{i}"] = pa.array(counts[:, i], mask=mask)
    for i, v in enumerate(c.ids):
        salt = np.uint64((0x9E3779B1 * (i + 1)) & 0xFFFFFFFF)
        scrambled = (v.astype(np.uint64) * np.uint64(2654435761) + salt) & np.uint64(0xFFFFFFFF)
        cols[f"c{i}"] = hex_strings(scrambled, None if missing is None else missing[:, spec.num_dense + i])
    return pa.table(cols)


def _split_key(split: str) -> int:
    return zlib.crc32(split.encode())  # stable, unlike hash(); adding a split changes no other


def _write_file(spec: SyntheticSpec, split: str, index: int, rows: int, path: Path, fmt: str,
                sample: int) -> dict:
    """Writes one file; returns its row count, label sums and a sample of (prob, labels)."""
    truth = _Truth(spec)
    rng = np.random.default_rng([spec.seed, _split_key(split), index])
    chunk = max(spec.row_group_size, CHUNK_ROWS // spec.row_group_size * spec.row_group_size)
    writer, sums, probs, labels = None, np.zeros(len(spec.tasks)), [], []
    done, kept = 0, 0
    try:
        while done < rows or writer is None:
            n = min(chunk, rows - done)
            c = _draw(spec, truth, rng, n)
            if fmt == "parquet":
                table = _parquet_table(spec, c)
                writer = writer or pq.ParquetWriter(path, table.schema, compression=spec.compression)
                writer.write_table(table, row_group_size=spec.row_group_size)
            else:
                table = _tsv_table(spec, c, rng)
                if writer is None:
                    sink = pa.CompressedOutputStream(str(path), "gzip") if path.suffix == ".gz" else str(path)
                    opts = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
                    writer = pacsv.CSVWriter(sink, table.schema, write_options=opts)
                writer.write_table(table)
            sums += c.labels.sum(0)
            take = min(n, sample - kept)
            probs.append(c.prob[:take])
            labels.append(c.labels[:take])
            done, kept = done + n, kept + take
    finally:
        if writer is not None:
            writer.close()
    return {"rows": rows, "label_sum": sums, "prob": np.concatenate(probs), "labels": np.concatenate(labels)}


def _write_all(out: Path, spec: SyntheticSpec, fmt: str, workers: int, gzip: bool = False) -> dict:
    """Every split's files, through a pool of `workers` processes; returns the meta."""
    spec.check()
    if (spec.multi_hot or spec.multi_hot_sizes) and fmt == "tsv":
        raise DataError("multi-hot columns have no Criteo TSV form; write Parquet instead")
    jobs = []
    for split, rows in spec.rows.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        for old in (out / split).glob("part-*"):  # a larger earlier set must not leave files behind
            old.unlink()
        files = max(1, min(spec.files_per_split, rows))
        bounds = np.linspace(0, rows, files + 1).astype(int)
        suffix = ".parquet" if fmt == "parquet" else ".tsv.gz" if gzip else ".tsv"
        for f in range(files):
            jobs.append((spec, split, f, int(bounds[f + 1] - bounds[f]),
                         out / split / f"part-{f:05d}{suffix}", fmt, math.ceil(spec.auc_rows / files)))
    if workers > 1 and len(jobs) > 1:
        # fork: the workers need no fresh import of this package (and `python -m app` runs the
        # CLI on import, which a spawned worker would repeat)
        fork = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=fork) as pool:
            results = list(pool.map(_write_file, *zip(*jobs)))
    else:
        results = [_write_file(*job) for job in jobs]
    meta: dict = {"generator": "synthetic", "seed": spec.seed, "correlation": spec.correlation,
                  "rows": {}, "best_auc": {}, "best_auc_rows": {}, "label_rate": {},
                  "spec": {k: v for k, v in asdict(spec).items() if k not in ("rows",)}}
    for split in spec.rows:
        mine = [r for job, r in zip(jobs, results) if job[1] == split]
        rows = sum(r["rows"] for r in mine)
        prob = np.concatenate([r["prob"] for r in mine])
        labels = np.concatenate([r["labels"] for r in mine])
        sums = sum(r["label_sum"] for r in mine)
        meta["rows"][split] = rows
        meta["best_auc"][split] = {t: _auc(prob[:, k], labels[:, k]) for k, t in enumerate(spec.tasks)}
        meta["best_auc_rows"][split] = len(prob)  # fewer than rows: computed on a sample
        meta["label_rate"][split] = {t: float(sums[k] / max(rows, 1)) for k, t in enumerate(spec.tasks)}
    return meta


def generate(out: str | Path, spec: SyntheticSpec, workers: int = 1) -> Schema:
    """Writes Parquet splits and `schema.json` into `out`; the same output for any `workers`."""
    out = Path(out)
    meta = _write_all(out, spec, "parquet", workers)
    cat_names = [f"c{i}" for i in range(len(spec.cardinalities))]
    schema = Schema(labels=list(spec.tasks), dense=[f"d{i}" for i in range(spec.num_dense)],
                    categorical=dict(zip(cat_names, spec.cardinalities)),
                    multi_hot=[cat_names[i] for i in sorted({*spec.multi_hot, *spec.multi_hot_sizes})],
                    meta=meta)
    schema.save(out)
    return schema


def generate_tsv(out: str | Path, spec: SyntheticSpec, workers: int = 1, gzip: bool = False) -> dict:
    """Writes the same hidden model's rows as Criteo TSV, one folder per split, and the best
    AUC and label rates into `truth.json`; returns that meta."""
    out = Path(out)
    meta = _write_all(out, spec, "tsv", workers, gzip=gzip)
    (out / TRUTH_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def add_data_command(sub) -> None:
    p = sub.add_parser("synthetic", help="Criteo-shape rows with a known best achievable AUC")
    p.add_argument("--out", default="data/debug")
    p.add_argument("--rows", default="20000,5000",
                   help="train,test rows, or split=rows pairs: train=1000000,valid=1000,test=5000")
    p.add_argument("--cardinalities", help="one vocabulary size per categorical column (default 26 of 1000)")
    p.add_argument("--dense", type=int, default=13)
    p.add_argument("--tasks", default="click,convert")
    p.add_argument("--correlation", type=float, default=0.5)
    p.add_argument("--signal", type=float, default=1.5, help="scale of the true logits; larger is easier")
    p.add_argument("--distribution", choices=DISTRIBUTIONS, default="skew", help="of the ids (default skew)")
    p.add_argument("--skew", type=float, default=3.0, help="skew: id = floor(cardinality * u**skew); 1 is uniform")
    p.add_argument("--zipf-alpha", type=float, default=1.05, help="zipf: p(id) ~ (id + 1)**-alpha")
    p.add_argument("--multi-hot", default="", help="column:mean length pairs, e.g. 3:4,7:2.5")
    p.add_argument("--multi-hot-sizes", default="",
                   help="every row's list length, one per column, e.g. 3,1,2: 1 is a single id (not a list)")
    p.add_argument("--shape", choices=sorted(SHAPES),
                   help="cardinalities and multi-hot sizes of a known data set; criteo1tb: MLPerf "
                        "DLRM-DCNv2's (26 tables, about 204M rows, 214 ids a row)")
    p.add_argument("--files-per-split", type=int, default=1)
    p.add_argument("--row-group-size", type=int, default=4096)
    p.add_argument("--workers", type=int, default=1, help="processes writing files; same output for any")
    p.add_argument("--format", choices=("parquet", "tsv"), default="parquet",
                   help="tsv: Criteo TSV for `mmoe data criteo-tsv` (no multi-hot)")
    p.add_argument("--compression", choices=COMPRESSIONS, default="snappy",
                   help="parquet: none decodes in about half the CPU time of snappy at 214 ids a row")
    p.add_argument("--missing", type=float, default=0.0, help="tsv: fraction of empty feature fields")
    p.add_argument("--gzip", action="store_true", help="tsv: write .tsv.gz")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run)


def _parse_rows(text: str) -> dict[str, int]:
    if "=" not in text:
        train_rows, test_rows = (int(x) for x in text.split(","))
        return {"train": train_rows, "test": test_rows}
    return {k: int(v) for k, v in (pair.split("=") for pair in text.split(","))}


def fixed_multi_hot(sizes: list[int]) -> dict[int, int]:
    """Ids per row of each column (1: a single id) -> SyntheticSpec.multi_hot_sizes."""
    return {i: k for i, k in enumerate(sizes) if k != 1}


def _run(args) -> None:
    multi_hot = {int(c): float(m) for c, m in (p.split(":") for p in args.multi_hot.split(",") if p)}
    if args.shape:
        if args.cardinalities or args.multi_hot_sizes:
            raise DataError(f"--shape {args.shape} gives the cardinalities and multi-hot sizes; "
                            "leave out --cardinalities and --multi-hot-sizes")
        cardinalities, sizes = SHAPES[args.shape]
    else:
        cardinalities = [int(x) for x in (args.cardinalities or ",".join(["1000"] * 26)).split(",")]
        sizes = [int(x) for x in args.multi_hot_sizes.split(",")] if args.multi_hot_sizes else [1] * len(cardinalities)
    if len(sizes) != len(cardinalities):
        raise DataError(f"--multi-hot-sizes has {len(sizes)} entries for {len(cardinalities)} columns; "
                        "give one per column of --cardinalities (1: a single id)")
    spec = SyntheticSpec(rows=_parse_rows(args.rows), num_dense=args.dense, cardinalities=cardinalities,
                         multi_hot=multi_hot, multi_hot_sizes=fixed_multi_hot(sizes),
                         tasks=args.tasks.split(","), correlation=args.correlation, signal=args.signal,
                         distribution=args.distribution, skew=args.skew, zipf_alpha=args.zipf_alpha,
                         files_per_split=args.files_per_split, row_group_size=args.row_group_size,
                         missing=args.missing, compression=args.compression, seed=args.seed)
    if args.format == "tsv":
        meta = generate_tsv(args.out, spec, workers=args.workers, gzip=args.gzip)
    else:
        meta = generate(args.out, spec, workers=args.workers).meta
    last = list(spec.rows)[-1]
    print(f"wrote {args.out} ({args.format}): best achievable {last} AUC {meta['best_auc'][last]}")
