"""Criteo-format Parquet -> `Batch`: schema, rank shares, and the reader.

A dataset folder holds `schema.json` and one folder of Parquet files per split; HugeCTR's
Parquet splits (a file list and `_metadata.json`) are read in place (app/hugectr.py). Every epoch
defines one global order of rows (row groups shuffled, rows shuffled inside each row group,
both seeded by the epoch), independent of the world size. Each rank takes an equal,
contiguous share of the rows not yet consumed, so ranks read disjoint row groups (shared
only at share boundaries), yield the same number of batches, and a resume on any world
size continues exactly where the run stopped.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from app import checks, hugectr
from app.checks import DataError

SCHEMA_FILE = "schema.json"


# ---------------------------------------------------------------------------------------
# Schema and the columns a run reads


@dataclass
class Schema:
    """Column roles of a dataset, as written by the converters into `schema.json`."""

    labels: list[str]
    dense: list[str]
    categorical: dict[str, int]  # column -> cardinality (ids must lie in [0, cardinality))
    multi_hot: list[str] = field(default_factory=list)  # list<int> columns
    meta: dict = field(default_factory=dict)
    # keys in the files are id + offset (HugeCTR's slot offsets); from the config, not saved
    offsets: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, dataset: str | Path) -> "Schema":
        path = Path(dataset) / SCHEMA_FILE
        if not path.exists():
            raise DataError(f"{path}: no schema file; prepare the data set first (`make data` for the census sample, or `mmoe data ...`)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: malformed schema, not JSON ({e}); rewrite it with the converter") from e
        checks.check_schema_doc(raw, path)
        return cls(
            labels=list(raw["labels"]),
            dense=list(raw["dense"]),
            categorical={k: int(v["cardinality"]) for k, v in raw["categorical"].items()},
            multi_hot=[k for k, v in raw["categorical"].items() if v.get("multi_hot")],
            meta=raw.get("meta", {}),
        )

    def save(self, dataset: str | Path) -> None:
        cats = {
            k: {"cardinality": v, "multi_hot": k in self.multi_hot}
            for k, v in self.categorical.items()
        }
        doc = {"labels": self.labels, "dense": self.dense, "categorical": cats, "meta": self.meta}
        (Path(dataset) / SCHEMA_FILE).write_text(json.dumps(doc, indent=2) + "\n")


def load_schema(dataset: str | Path, splits: list[str] | tuple[str, ...] = (),
                slot_size_array: list[int] | tuple[int, ...] = (),
                keys_have_offsets: bool = False) -> tuple[Schema, str]:
    """(schema, where it came from): `schema.json` when the dataset has one, otherwise the
    `_metadata.json` of HugeCTR's split folders (`splits`, train first; app/hugectr.py)."""
    path = Path(dataset) / SCHEMA_FILE
    if path.exists() or not splits:
        if slot_size_array or keys_have_offsets:
            raise DataError(f"{path}: data.slot_size_array and data.keys_have_offsets are for HugeCTR "
                            f"data sets without schema.json; this one gives the cardinalities: "
                            f"remove those keys")
        return Schema.load(dataset), str(path)
    return hugectr.derive_schema(dataset, list(splits), list(slot_size_array), keys_have_offsets)


@dataclass(frozen=True)
class Columns:
    """The columns one run reads, in config order: labels (one per task), dense, categorical."""

    labels: tuple[str, ...]
    dense: tuple[str, ...]
    categorical: tuple[str, ...]
    cardinality: tuple[int, ...]
    multi_hot: frozenset[str] = frozenset()
    offsets: tuple[int, ...] = ()  # per categorical column, subtracted from its keys; (): none

    @classmethod
    def resolve(cls, schema: Schema, labels: list[str], dense: list[str], categorical: list[str],
                where: str) -> "Columns":
        """Config lists win; empty lists take every column of that role from the schema."""
        dense = dense or schema.dense
        categorical = categorical or list(schema.categorical)
        for role, names, known in (("label", labels, schema.labels), ("dense", dense, schema.dense),
                                   ("categorical", categorical, list(schema.categorical))):
            for name in names:
                if name not in known:
                    raise DataError(
                        f"{where}: the config names {role} column {name!r}, which the schema "
                        f"does not list as {role}; known: {', '.join(known) or 'none'}"
                    )
        return cls(
            labels=tuple(labels),
            dense=tuple(dense),
            categorical=tuple(categorical),
            cardinality=tuple(schema.categorical[c] for c in categorical),
            multi_hot=frozenset(c for c in categorical if c in schema.multi_hot),
            offsets=tuple(schema.offsets.get(c, 0) for c in categorical) if schema.offsets else (),
        )

    @property
    def all(self) -> list[str]:
        return [*self.labels, *self.dense, *self.categorical]


# ---------------------------------------------------------------------------------------
# The batch


@dataclass
class Batch(Pipelineable):
    """One step's input on one rank.

    dense: [B, D] float32; sparse_features: KJT with one key per categorical column;
    labels: [B, T] float32 in task order; weights: [B] (0 marks a row skipped as bad);
    row_ids: [B] int64, the row's index in its split (files in split order, then row order).
    """

    dense: torch.Tensor
    sparse_features: KeyedJaggedTensor
    labels: torch.Tensor
    weights: torch.Tensor
    row_ids: torch.Tensor

    def _map(self, fn) -> "Batch":
        return Batch(*(fn(getattr(self, f)) for f in
                       ("dense", "sparse_features", "labels", "weights", "row_ids")))

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for t in (self.dense, self.sparse_features, self.labels, self.weights, self.row_ids):
            t.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return self.dense.shape[0]


def _hash_strings(arr: pa.Array, cardinality: int) -> np.ndarray:
    """Stable across processes and runs (Python's hash() is salted per process)."""
    encoded = pc.dictionary_encode(arr).combine_chunks() if isinstance(arr, pa.ChunkedArray) \
        else pc.dictionary_encode(arr)
    table = np.array(
        [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") % cardinality
         for s in encoded.dictionary.to_pylist()],
        dtype=np.int64,
    )
    return table[encoded.indices.to_numpy(zero_copy_only=False)]


def _ids(arr: pa.Array, cardinality: int) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, values) of one categorical column; lists are multi-hot, strings are hashed."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy()
        flat = pc.list_flatten(arr)
        values = (_hash_strings(flat, cardinality) if pa.types.is_string(flat.type)
                  else flat.to_numpy(zero_copy_only=False))
        return lengths.astype(np.int32), values.astype(np.int64, copy=False)
    values = (_hash_strings(arr, cardinality) if pa.types.is_string(arr.type)
              else arr.to_numpy(zero_copy_only=False))
    return np.ones(len(arr), dtype=np.int32), values.astype(np.int64, copy=False)


def subtract_offsets(table: pa.Table, columns: Columns) -> pa.Table:
    """Keys carrying slot offsets -> table ids, before the checks: a key outside its slot
    then shows as an id outside [0, cardinality)."""
    for name, offset in zip(columns.categorical, columns.offsets):
        if not offset:
            continue
        col = table.column(name).combine_chunks()
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            ids = pc.subtract(col.values.cast(pa.int64()), offset)
            col = type(col).from_arrays(col.offsets, ids, mask=col.is_null() if col.null_count else None)
        else:
            col = pc.subtract(col.cast(pa.int64()), offset)
        table = table.set_column(table.schema.get_field_index(name), name, col)
    return table


def _float_matrix(table: pa.Table, names: tuple[str, ...]) -> torch.Tensor:
    if not names:
        return torch.zeros(table.num_rows, 0)
    cols = [table.column(n).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            for n in names]
    return torch.from_numpy(np.stack(cols, axis=1))


def arrow_to_batch(table: pa.Table, columns: Columns, row_ids: np.ndarray,
                   weights: np.ndarray | None = None) -> Batch:
    """Converts checked Arrow rows into a `Batch`, in the column order of `columns`."""
    lengths, values = zip(*(_ids(table.column(c), n) for c, n in
                            zip(columns.categorical, columns.cardinality))) if columns.categorical \
        else ((), ())
    kjt = KeyedJaggedTensor(
        keys=list(columns.categorical),
        values=torch.from_numpy(np.concatenate(values) if values else np.zeros(0, np.int64)),
        lengths=torch.from_numpy(np.concatenate(lengths) if lengths else np.zeros(0, np.int32)),
    )
    n = table.num_rows
    return Batch(
        dense=_float_matrix(table, columns.dense),
        sparse_features=kjt,
        labels=_float_matrix(table, columns.labels),
        weights=torch.from_numpy(np.ones(n, np.float32) if weights is None else weights),
        row_ids=torch.from_numpy(row_ids.astype(np.int64, copy=False)),
    )


# ---------------------------------------------------------------------------------------
# Files, row groups, and checks


@dataclass(frozen=True)
class RowGroup:
    file: str
    index: int
    rows: int
    first_row: int  # index of its first row within the split


def split_files(dataset: str | Path, split: str) -> list[Path]:
    """A split's Parquet files: HugeCTR's file list order (rows checked against its
    `_metadata.json`), or the split folder's files sorted by name."""
    layout = hugectr.find_split(dataset, split)
    if layout is not None:
        hugectr.check_row_counts(layout)
        return layout.files
    folder = Path(dataset) / split
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        raise DataError(f"{folder}: no .parquet files for split {split!r}")
    return files


def scan_row_groups(files: list[Path], columns: Columns,
                    label_kinds: tuple[str, ...] | None = None) -> list[RowGroup]:
    """Reads footers only; rejects unreadable, empty or mismatched files before training, and
    with `label_kinds`, values that the footers' statistics show out of range."""
    groups: list[RowGroup] = []
    first_row, reference = 0, None
    for path in files:
        meta = checks.check_file(path, columns, reference)
        if label_kinds is not None:
            checks.check_statistics(path, meta, columns, label_kinds)
        reference = reference or (path, meta.schema.to_arrow_schema())
        for i in range(meta.num_row_groups):
            rows = meta.row_group(i).num_rows
            if rows:
                groups.append(RowGroup(str(path), i, rows, first_row))
                first_row += rows
    return groups


# ---------------------------------------------------------------------------------------
# The epoch's row order and each rank's share


def epoch_order(groups: list[RowGroup], seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Row-group visiting order of one epoch; the same on every rank and world size."""
    order = np.arange(len(groups))
    if shuffle:
        np.random.default_rng([seed, epoch]).shuffle(order)
    return order.tolist()


def row_permutation(group: RowGroup, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(group.rows)
    return np.random.default_rng([seed, epoch, group.first_row]).permutation(group.rows)


Span = tuple[int, int]  # [start, end) positions in the epoch's global order


def take_spans(spans: list[Span], start: int, count: int) -> list[Span]:
    """The `count` positions following the first `start` positions covered by `spans`."""
    out: list[Span] = []
    for a, b in spans:
        n = b - a
        if start >= n:
            start -= n
            continue
        a, start = a + start, 0
        k = min(count, b - a)
        out.append((a, a + k))
        count -= k
        if count == 0:
            break
    return out


def span_rows(spans: list[Span]) -> int:
    return sum(b - a for a, b in spans)


def rank_share(spans: list[Span], rank: int, world_size: int, equal: bool) -> list[Span]:
    """Contiguous share of the remaining positions. `equal` drops the < world_size rows left
    over so every rank has the same count (training); otherwise shares differ by at most one."""
    total = span_rows(spans)
    if equal:
        size = total // world_size
        return take_spans(spans, rank * size, size)
    base, extra = divmod(total, world_size)
    return take_spans(spans, rank * base + min(rank, extra), base + (rank < extra))


def batch_sizes(share_rows: int, max_share_rows: int, batch_size: int, equal: bool) -> list[int]:
    """Equal counts on every rank: training uses full batches and one equal partial tail;
    evaluation splits each share into ceil(max_share / batch_size) near-equal batches."""
    if equal:
        full, tail = divmod(share_rows, batch_size)
        return [batch_size] * full + ([tail] if tail else [])
    n = math.ceil(max_share_rows / batch_size)
    return [len(p) for p in np.array_split(np.arange(share_rows), n)]


@dataclass
class Position:
    """Where an epoch stands: the positions not yet consumed. Saved in checkpoints."""

    epoch: int = 0
    remaining: list[Span] | None = None  # None: the whole epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "remaining": [list(s) for s in self.remaining or []],
                "fresh": self.remaining is None}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Position":
        remaining = None if state["fresh"] else [tuple(s) for s in state["remaining"]]
        return cls(epoch=int(state["epoch"]), remaining=remaining)


def consume(spans: list[Span], world_size: int, rows_per_rank: int) -> list[Span]:
    """Remaining positions after every rank took `rows_per_rank` rows from its equal share."""
    size = span_rows(spans) // world_size
    rows_per_rank = min(rows_per_rank, size)
    out: list[Span] = []
    for r in range(world_size):
        out += take_spans(spans, r * size + rows_per_rank, size - rows_per_rank)
    return out


class ParquetBatches(IterableDataset):
    """Yields lists of `Batch` (chunks of consecutive batches) for one rank and one epoch.

    DataLoader workers take chunks round-robin, so each worker decodes only the row groups
    its chunks touch; `iter_batches` flattens the chunks back into step order.
    """

    def __init__(self, dataset: str | Path, split: str, columns: Columns, label_kinds: tuple[str, ...],
                 batch_size: int, rank: int, world_size: int, *, train: bool, seed: int = 0,
                 shuffle: bool = True, on_bad_rows: str = "error", chunk_batches: int = 8):
        self.files = split_files(dataset, split)
        self.columns, self.label_kinds = columns, label_kinds
        # with on_bad_rows = "skip", bad values are counted when read instead of refused
        self.groups = scan_row_groups(self.files, columns,
                                      label_kinds if on_bad_rows == "error" else None)
        self.total_rows = sum(g.rows for g in self.groups)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.train, self.seed, self.shuffle = train, seed, shuffle and train
        self.on_bad_rows, self.chunk_batches = on_bad_rows, chunk_batches
        self.position = Position()
        if self.total_rows < world_size:
            raise DataError(f"{Path(dataset) / split}: {self.total_rows} rows cannot give each of "
                            f"{world_size} ranks at least one row")

    def set_position(self, position: Position) -> None:
        self.position = position

    def _spans(self) -> list[Span]:
        return self.position.remaining or [(0, self.total_rows)]

    def plan(self) -> tuple[list[Span], list[int]]:
        """This rank's share and its batch sizes."""
        spans = self._spans()
        share = rank_share(spans, self.rank, self.world_size, equal=self.train)
        largest = span_rows(rank_share(spans, 0, self.world_size, equal=self.train))
        sizes = batch_sizes(span_rows(share), largest, self.batch_size, equal=self.train)
        if not sizes:
            raise DataError(f"rank {self.rank} of {self.world_size} gets no rows of {self.files[0].parent}")
        return share, sizes

    def __len__(self) -> int:
        return len(self.plan()[1])

    def _read(self, gi: int, epoch: int) -> tuple[pa.Table, np.ndarray, np.ndarray]:
        """Decodes, checks and permutes one row group: (table, row ids, weights)."""
        g = self.groups[gi]
        try:
            table = pq.ParquetFile(g.file).read_row_group(g.index, columns=self.columns.all)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{g.file}: row group {g.index} cannot be read ({' '.join(str(e).split())}); "
                            f"the file is damaged: rewrite it with the converter") from e
        table = subtract_offsets(table, self.columns)
        bad = checks.check_rows(table, self.columns, self.label_kinds, f"{g.file}: row group {g.index}",
                                skip=self.on_bad_rows == "skip")
        if bad is not None:
            table = checks.clean_rows(table, self.columns, bad)
        perm = row_permutation(g, self.seed, epoch, self.shuffle)
        weights = np.ones(g.rows, np.float32) if bad is None else (~bad).astype(np.float32)[perm]
        return table.take(pa.array(perm)), g.first_row + perm, weights

    def _chunks(self, share: list[Span], sizes: list[int]) -> list[list[tuple[int, int]]]:
        """Batches as (start, size) in share positions, grouped into chunks."""
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
        pairs = list(zip(starts, sizes))
        return [pairs[i:i + self.chunk_batches] for i in range(0, len(pairs), self.chunk_batches)]

    def __iter__(self) -> Iterator[list[Batch]]:
        share, sizes = self.plan()
        epoch = self.position.epoch
        order = epoch_order(self.groups, self.seed, epoch, self.shuffle)
        # global position where each row group (in visiting order) begins
        offsets = np.concatenate([[0], np.cumsum([self.groups[g].rows for g in order])])
        info = torch.utils.data.get_worker_info()
        workers, me = (info.num_workers, info.id) if info else (1, 0)
        cache: dict[int, tuple[pa.Table, np.ndarray, np.ndarray]] = {}
        for ci, chunk in enumerate(self._chunks(share, sizes)):
            if ci % workers != me:
                continue
            out = []
            for start, size in chunk:
                pieces = []
                for a, b in take_spans(share, start, size):
                    # row groups covering global positions [a, b)
                    k = int(np.searchsorted(offsets, a, side="right")) - 1
                    while a < b:
                        gi = order[k]
                        if gi not in cache:
                            cache.clear()  # keep one decoded row group per worker
                            cache[gi] = self._read(gi, epoch)
                        table, ids, w = cache[gi]
                        lo, hi = a - offsets[k], min(b, offsets[k + 1]) - offsets[k]
                        pieces.append((table.slice(lo, hi - lo), ids[lo:hi], w[lo:hi]))
                        a, k = offsets[k] + hi, k + 1
                table = pa.concat_tables([p[0] for p in pieces])
                out.append(arrow_to_batch(table, self.columns, np.concatenate([p[1] for p in pieces]),
                                          np.concatenate([p[2] for p in pieces])))
            yield out


def iter_batches(dataset: ParquetBatches, num_workers: int, pin_memory: bool) -> Iterator[Batch]:
    """Step-ordered batches of one epoch (or of what remains of it)."""
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                        persistent_workers=False, prefetch_factor=4 if num_workers else None,
                        # its own generator: drawing worker seeds from the global one would
                        # shift dropout masks depending on when an epoch's loader starts
                        generator=torch.Generator())
    try:
        for chunk in loader:
            yield from chunk
    except DataError as e:
        # a worker's error arrives with its traceback in the message; keep the one line
        raise DataError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
