"""Criteo TSV -> Criteo-format Parquet: `mmoe data criteo-tsv --train FILE... --test FILE...`.

Input rows are tab-separated: L label columns (0/1), 13 integer dense features and 26
hexadecimal categorical features, an empty field for a missing value; files may be plain or
compressed (.gz, .bz2, .zst). The output is what `app.data` reads: `schema.json`, and per
split a folder of Parquet files with float32 labels `click[,convert,...]`, float32 dense
columns `d0..d12` and int64 id columns `c0..c25`.

Plain files are cut into byte ranges at line ends, compressed files are taken whole; a pool
of processes converts one range each, streaming blocks through pyarrow's CSV reader into row
groups of one Parquet file per range. Memory is therefore bounded by workers x (one block +
one row group), whatever the size of the input.

Categorical values become ids in [0, cardinality):
- hash:  id = 1 + int(value, 16) % (size - 1); a missing value is 0.
- vocab: a first pass over the train inputs counts every value; values seen at least
  `min_count` times get ids 2, 3, ... by decreasing count (ties by value), rarer and unseen
  values share id 1, a missing value is 0. The vocabulary is saved as `vocab.npz`.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from app.data.errors import DataError
from app.data.schema import Schema
from app.sources.row_groups import RowGroupWriter
from app.sources.tsv import Piece, parse_hex, pieces, read_batches

MISSING_ID, RARE_ID = 0, 1
DEFAULT_LABELS = ("click", "convert")
VOCAB_FILE = "vocab.npz"
COUNT_RANGE_BYTES = 64 << 20  # vocabulary pass: smaller ranges bound each worker's counts


@dataclass(frozen=True)
class Options:
    """How fields become columns (see the module docstring for the id rules)."""

    labels: tuple[str, ...] = ("click",)
    num_dense: int = 13
    num_categorical: int = 26
    log1p: bool = True  # dense: log1p(max(x, 0)), the Criteo convention
    dense_fill: float = 0.0  # a missing dense value, before the transform
    mode: str = "hash"  # "hash" or "vocab"
    hash_sizes: tuple[int, ...] = (1_000_000,)  # one for every column, or one per column
    min_count: int = 3
    row_group_size: int = 65_536

    @property
    def dense(self) -> list[str]:
        return [f"d{i}" for i in range(self.num_dense)]

    @property
    def categorical(self) -> list[str]:
        return [f"c{i}" for i in range(self.num_categorical)]

    def hash_size(self, column: int) -> int:
        return self.hash_sizes[column if len(self.hash_sizes) > 1 else 0]

    def validate(self) -> None:
        if self.mode not in ("hash", "vocab"):
            raise DataError(f"categorical mode {self.mode!r}; use 'hash' or 'vocab'")
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise DataError(f"label names {list(self.labels)} must be one or more distinct names")
        clash = set(self.labels) & set(self.dense + self.categorical)
        if clash:
            raise DataError(f"label names {sorted(clash)} clash with the feature columns d*/c*")
        if self.mode == "hash" and (len(self.hash_sizes) not in (1, self.num_categorical)
                                    or min(self.hash_sizes) < 2):
            raise DataError(f"hash sizes {list(self.hash_sizes)}: give one size (at least 2, id 0 "
                            f"is kept for missing values) or {self.num_categorical} of them")
        if self.min_count < 1 or self.row_group_size < 1:
            raise DataError("min_count and row_group_size must be at least 1")


def _types(opts: Options) -> tuple[list[str], dict[str, pa.DataType]]:
    names = [*opts.labels, *opts.dense, *opts.categorical]
    types = {n: pa.int64() for n in [*opts.labels, *opts.dense]}
    types.update({n: pa.string() for n in opts.categorical})
    return names, types


@dataclass
class Vocabulary:
    """Per categorical column: sorted kept values and their ids (2, 3, ... by decreasing count)."""

    values: list[np.ndarray]
    ids: list[np.ndarray]
    counts: list[np.ndarray]

    @classmethod
    def build(cls, counts: list[tuple[np.ndarray, np.ndarray]], min_count: int) -> "Vocabulary":
        values, ids, kept_counts = [], [], []
        for vals, cnts in counts:
            keep = cnts >= min_count
            v, c = vals[keep], cnts[keep]  # v is sorted: it comes from np.unique
            order = np.lexsort((v, -c))  # by decreasing count, then by value
            col_ids = np.empty(len(v), np.int64)
            col_ids[order] = np.arange(len(v)) + RARE_ID + 1
            values.append(v)
            ids.append(col_ids)
            kept_counts.append(c)
        return cls(values, ids, kept_counts)

    def cardinality(self, column: int) -> int:
        return len(self.values[column]) + RARE_ID + 1

    def lookup(self, column: int, values: np.ndarray) -> np.ndarray:
        keys = self.values[column]
        if len(keys) == 0:
            return np.full(len(values), RARE_ID, np.int64)
        pos = np.minimum(np.searchsorted(keys, values), len(keys) - 1)
        return np.where(keys[pos] == values, self.ids[column][pos], RARE_ID)

    def save(self, path: Path) -> None:
        arrays = {}
        for i, (v, d, c) in enumerate(zip(self.values, self.ids, self.counts)):
            arrays.update({f"c{i}_values": v, f"c{i}_ids": d, f"c{i}_counts": c})
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: Path, num_categorical: int) -> "Vocabulary":
        with np.load(path) as z:
            return cls(*([z[f"c{i}_{key}"] for i in range(num_categorical)]
                         for key in ("values", "ids", "counts")))


def _ids(values: np.ndarray, present: np.ndarray, column: int, opts: Options,
         vocab: Vocabulary | None) -> np.ndarray:
    ids = np.full(len(values), MISSING_ID, np.int64)
    v = values[present]
    if opts.mode == "hash":
        size = opts.hash_size(column)
        ids[present] = (v % np.uint64(size - 1)).astype(np.int64) + 1
    else:
        ids[present] = vocab.lookup(column, v)
    return ids


def convert_batch(batch: pa.RecordBatch, opts: Options, vocab: Vocabulary | None, where: str,
                  first_line: int = 1) -> pa.Table:
    """One parsed block -> output columns: float32 labels and dense, int64 ids. `where` and
    `first_line` (the block's first line) locate a bad field in the error message."""
    cols: dict[str, np.ndarray] = {}
    for name in opts.labels:
        y = pc.fill_null(batch.column(name), -1).to_numpy()
        bad = (y != 0) & (y != 1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            value = batch.column(name)[row].as_py()
            raise DataError(f"{where}, line {first_line + row}, label {name!r}: "
                            f"{'empty' if value is None else value}; labels must be 0 or 1")
        cols[name] = y.astype(np.float32)
    for name in opts.dense:
        x = pc.fill_null(batch.column(name).cast(pa.float64()), opts.dense_fill).to_numpy()
        cols[name] = (np.log1p(np.maximum(x, 0)) if opts.log1p else x).astype(np.float32)
    for i, name in enumerate(opts.categorical):
        values, present = parse_hex(batch.column(name),
                                    lambda r: f"{where}, line {first_line + r}, column {name}")
        cols[name] = _ids(values, present, i, opts, vocab)
    return pa.table(cols)


# ---------------------------------------------------------------------------------------
# The two passes, one piece per call (run in pool workers)


_VOCAB: Vocabulary | None = None  # set in each worker by _init_worker


def _init_worker(vocab: Vocabulary | None) -> None:
    global _VOCAB
    _VOCAB = vocab


def _merge_counts(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    values = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    uniq, inverse = np.unique(values, return_inverse=True)
    return uniq, np.bincount(inverse, weights=counts, minlength=len(uniq)).astype(np.int64)


def count_piece(piece: Piece, opts: Options) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per categorical column, (sorted values, counts) of the values present in `piece`."""
    names, types = _types(opts)
    parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in opts.categorical]
    line = 1
    for batch in read_batches(piece, names, types, include=opts.categorical):
        for i, name in enumerate(opts.categorical):
            values, present = parse_hex(batch.column(name),
                                        lambda r: f"{piece.where}, line {line + r}, column {name}")
            parts[i].append(np.unique(values[present], return_counts=True))
            if len(parts[i]) >= 8:  # fold now and then: bounded by the piece's distinct values
                parts[i] = [_merge_counts(parts[i])]
        line += batch.num_rows
    return [_merge_counts(p) if p else (np.zeros(0, np.uint64), np.zeros(0, np.int64)) for p in parts]


def convert_piece(piece: Piece, opts: Options, out_file: str) -> dict:
    """Writes the piece's rows to `out_file` in row groups of `opts.row_group_size`; returns
    its row count and label sums (no file when the piece holds no rows)."""
    names, types = _types(opts)
    rows, sums = 0, np.zeros(len(opts.labels))
    with RowGroupWriter(out_file, opts.row_group_size) as writer:
        for batch in read_batches(piece, names, types):
            table = convert_batch(batch, opts, _VOCAB, piece.where, first_line=rows + 1)
            sums += [np.sum(table.column(n).to_numpy()) for n in opts.labels]
            rows += table.num_rows
            writer.write(table)
    return {"rows": rows, "label_sum": sums}


def _run_pool(fn: Callable, jobs: list[tuple], workers: int,
              vocab: Vocabulary | None = None) -> Iterator[tuple[int, object]]:
    """(job index, result) as jobs finish; in this process when one worker is asked for."""
    if workers <= 1 or len(jobs) <= 1:
        _init_worker(vocab)
        for i, job in enumerate(jobs):
            yield i, fn(*job)
        return
    # fork: workers inherit the vocabulary instead of unpickling a copy each, and need no
    # fresh import of this package (`python -m app` runs the CLI on import)
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker,
                             initargs=(vocab,)) as pool:
        futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield futures[f], f.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


# ---------------------------------------------------------------------------------------
# The whole conversion


def convert(inputs: dict[str, list[str | Path]], out: str | Path, opts: Options,
            workers: int | None = None, range_bytes: int = 256 << 20, force: bool = False) -> Schema:
    """Converts TSV files per split (e.g. {"train": [...], "test": [...]}) into `out`.
    The data set appears only when every split converted; `force` replaces an existing one."""
    opts.validate()
    out = Path(out)
    workers = workers or os.cpu_count() or 1
    inputs = {s: [str(p) for p in files] for s, files in inputs.items() if files}
    if not inputs:
        raise DataError("no input files; name them per split: --train FILE... --test FILE...")
    seen = [p for files in inputs.values() for p in files]
    if len(set(seen)) != len(seen):
        raise DataError(f"an input file is listed twice: {sorted({p for p in seen if seen.count(p) > 1})}")
    if opts.mode == "vocab" and "train" not in inputs:
        raise DataError("vocab mode builds its vocabulary from the train split; give --train files")
    old_splits = [d for d in out.glob("*") if d.is_dir() and any(d.glob("*.parquet"))]
    if not force and (old_splits or (out / "schema.json").exists()):
        raise DataError(f"{out} already holds a data set; pass --force to replace it")

    stage = out / ".incomplete"  # renamed into place once every split converted
    shutil.rmtree(stage, ignore_errors=True)
    created = not out.exists()
    stage.mkdir(parents=True)
    try:
        vocab = None
        if opts.mode == "vocab":
            vocab = _build_vocabulary(inputs["train"], opts, workers, min(range_bytes, COUNT_RANGE_BYTES))
            vocab.save(stage / VOCAB_FILE)
        jobs, splits = [], []
        for split, files in inputs.items():
            (stage / split).mkdir(parents=True)
            for f, path in enumerate(files):
                for r, piece in enumerate(pieces(path, range_bytes)):
                    jobs.append((piece, opts, str(stage / split / f"part-{f:04d}-{r:04d}.parquet")))
                    splits.append(split)
        rows = {s: 0 for s in inputs}
        sums = {s: np.zeros(len(opts.labels)) for s in inputs}
        for i, result in _run_pool(convert_piece, jobs, workers, vocab):
            rows[splits[i]] += result["rows"]
            sums[splits[i]] += result["label_sum"]
        for split, n in rows.items():
            if n == 0:
                raise DataError(f"split {split!r}: its input files {inputs[split]} hold no rows")
        for old in old_splits:  # every split converted: replace the old data set
            shutil.rmtree(old)
        for split in inputs:
            (stage / split).rename(out / split)
        (out / VOCAB_FILE).unlink(missing_ok=True)
        if vocab is not None:
            (stage / VOCAB_FILE).rename(out / VOCAB_FILE)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not any(out.iterdir()):  # a failed first conversion leaves nothing
            out.rmdir()

    if opts.mode == "hash":
        cards = [opts.hash_size(i) for i in range(opts.num_categorical)]
        cat_meta = {"mode": "hash", "rule": "id = 1 + int(value, 16) % (size - 1); missing -> 0",
                    "sizes": cards}
    else:
        cards = [vocab.cardinality(i) for i in range(opts.num_categorical)]
        cat_meta = {"mode": "vocab", "min_count": opts.min_count, "missing_id": MISSING_ID,
                    "rare_id": RARE_ID, "vocab_file": VOCAB_FILE, "built_from": "train",
                    "rule": "ids 2.. by decreasing train count for values seen >= min_count times"}
    meta = {
        "source": "criteo-tsv",
        "inputs": inputs,
        "rows": rows,
        "label_rate": {s: {t: float(sums[s][k] / rows[s]) for k, t in enumerate(opts.labels)}
                       for s in inputs},
        "dense_transform": (f"log1p(max(x, 0)), missing -> {opts.dense_fill:g} first" if opts.log1p
                            else f"none, missing -> {opts.dense_fill:g}"),
        "categorical_transform": cat_meta,
        "row_group_size": opts.row_group_size,
    }
    schema = Schema(labels=list(opts.labels), dense=opts.dense,
                    categorical=dict(zip(opts.categorical, cards)), meta=meta)
    schema.save(out)
    return schema


def _build_vocabulary(files: list[str], opts: Options, workers: int, range_bytes: int) -> Vocabulary:
    jobs = [(piece, opts) for path in files for piece in pieces(path, range_bytes)]
    merged: list[tuple[np.ndarray, np.ndarray]] | None = None
    for _, counts in _run_pool(count_piece, jobs, workers):
        merged = counts if merged is None else [_merge_counts([a, b]) for a, b in zip(merged, counts)]
    if merged is None:
        raise DataError(f"train inputs {files} hold no rows to build a vocabulary from")
    return Vocabulary.build(merged, opts.min_count)


# ---------------------------------------------------------------------------------------
# Command line


def add_data_command(sub) -> None:
    p = sub.add_parser("criteo-tsv", help="Criteo TSV (labels, 13 ints, 26 hex) -> Criteo-format Parquet",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--train", nargs="+", default=[], metavar="FILE", help="TSV files of the train split")
    p.add_argument("--valid", nargs="+", default=[], metavar="FILE")
    p.add_argument("--test", nargs="+", default=[], metavar="FILE")
    p.add_argument("--out", default="data/criteo")
    p.add_argument("--num-labels", type=int, default=None,
                   help="label columns at the start of each line (default 1, or as many as --label-names)")
    p.add_argument("--label-names", default=None,
                   help=f"comma-separated; default {','.join(DEFAULT_LABELS)} cut to --num-labels")
    p.add_argument("--categorical", choices=("hash", "vocab"), default="hash")
    p.add_argument("--hash-size", default="1000000",
                   help="hash mode: ids per column, one size or one per column (100000 fits CPU training)")
    p.add_argument("--min-count", type=int, default=3, help="vocab mode: rarer values share one id")
    p.add_argument("--dense-transform", choices=("log1p", "none"), default="log1p")
    p.add_argument("--dense-fill", type=float, default=0.0, help="value of a missing dense field")
    p.add_argument("--num-dense", type=int, default=13)
    p.add_argument("--num-categorical", type=int, default=26)
    p.add_argument("--row-group-size", type=int, default=65_536)
    p.add_argument("--range-mb", type=int, default=256, help="input bytes per output file (plain inputs)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: all cores)")
    p.add_argument("--force", action="store_true", help="replace a data set already in --out")
    p.set_defaults(run=_run)


def label_names(num_labels: int | None, names: str | None) -> tuple[str, ...]:
    if names:
        out = tuple(n.strip() for n in names.split(","))
        if num_labels is not None and num_labels != len(out):
            raise DataError(f"--num-labels {num_labels} but --label-names lists {len(out)}: {names}")
        return out
    n = 1 if num_labels is None else num_labels
    return tuple(DEFAULT_LABELS[k] if k < len(DEFAULT_LABELS) else f"label{k}" for k in range(n))


def _run(args) -> None:
    if args.range_mb < 1 or args.workers < 1:
        raise DataError(f"--range-mb {args.range_mb} and --workers {args.workers} must be at least 1")
    sizes = [int(x) for x in args.hash_size.split(",")]
    opts = Options(labels=label_names(args.num_labels, args.label_names), num_dense=args.num_dense,
                   num_categorical=args.num_categorical, log1p=args.dense_transform == "log1p",
                   dense_fill=args.dense_fill, mode=args.categorical,
                   hash_sizes=tuple(sizes),
                   min_count=args.min_count, row_group_size=args.row_group_size)
    start = time.perf_counter()
    schema = convert({"train": args.train, "valid": args.valid, "test": args.test}, args.out, opts,
                     workers=args.workers, range_bytes=args.range_mb << 20, force=args.force)
    rows = ", ".join(f"{s} {n:,}" for s, n in schema.meta["rows"].items())
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s: {rows} rows; "
          f"cardinalities {min(schema.categorical.values()):,}..{max(schema.categorical.values()):,}")
