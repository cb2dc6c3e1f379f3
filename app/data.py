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

import copy
import hashlib
import json
import math
import mmap
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Callable, Iterator

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
READ_AHEAD = 2  # row groups decoded ahead of the one being packed
PREFETCH_CHUNKS = 4  # chunks each reader worker holds ready


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
    packed: uint8, set when all of the above are views of it (the reader's batches): the batch
    then moves to the GPU as one copy, not seven.
    copies: where a copy of `packed` to the GPU leaves a CUDA event, when the reader waits for
    them before reusing its memory (`ChunkSlots`).
    """

    dense: torch.Tensor
    sparse_features: KeyedJaggedTensor
    labels: torch.Tensor
    weights: torch.Tensor
    row_ids: torch.Tensor
    packed: torch.Tensor | None = None
    copies: list[torch.cuda.Event] | None = None

    def _map(self, fn) -> "Batch":
        if self.packed is None:
            return Batch(*(fn(getattr(self, f)) for f in
                           ("dense", "sparse_features", "labels", "weights", "row_ids")))
        moved = fn(self.packed)
        if self.copies is not None and moved.is_cuda:
            self.copies.append(torch.cuda.Event())
            self.copies[-1].record()  # on the stream that copied

        def view(t: torch.Tensor) -> torch.Tensor:  # the same view of the moved buffer
            start = t.data_ptr() - self.packed.data_ptr()
            return _typed(moved[start:start + t.nbytes], t.dtype, t.shape)

        kjt = self.sparse_features
        return Batch(view(self.dense), KeyedJaggedTensor(keys=kjt.keys(), values=view(kjt.values()),
                                                         lengths=view(kjt.lengths()), stride=kjt.stride(),
                                                         length_per_key=kjt.length_per_key()),
                     view(self.labels), view(self.weights), view(self.row_ids), moved)

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for t in (self.dense, self.sparse_features, self.labels, self.weights, self.row_ids) \
                if self.packed is None else (self.packed,):
            t.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())

    def pinned_copy(self) -> "Batch":
        """A page-locked copy of its own: the reader's batches (`iter_batches`) are views of
        buffers it reuses, and pinning an already pinned tensor returns the tensor itself."""
        return self._map(lambda t: t.clone().pin_memory())

    def __len__(self) -> int:
        return self.dense.shape[0]


def _hash_strings(arr: pa.Array | pa.ChunkedArray, cardinality: int) -> np.ndarray:
    """Stable across processes and runs (Python's hash() is salted per process)."""
    encoded = pc.dictionary_encode(arr).combine_chunks() if isinstance(arr, pa.ChunkedArray) \
        else pc.dictionary_encode(arr)
    table = np.array(
        [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") % cardinality
         for s in encoded.dictionary.to_pylist()],
        dtype=np.int64,
    )
    return table[encoded.indices.to_numpy(zero_copy_only=False)]


def _id_values(arr: pa.Array | pa.ChunkedArray, cardinality: int) -> np.ndarray:
    values = (_hash_strings(arr, cardinality) if pa.types.is_string(arr.type)
              else arr.to_numpy(zero_copy_only=False))
    return values.astype(np.int64, copy=False)


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


def _float_matrix(table: pa.Table, names: tuple[str, ...]) -> np.ndarray:
    if not names:
        return np.zeros((table.num_rows, 0), np.float32)
    return np.stack([table.column(n).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
                     for n in names], axis=1)


Rows = slice | np.ndarray  # rows of a block: a range, or positions in the epoch's order


def _gather(src: np.ndarray, rows: Rows, out: np.ndarray) -> None:
    """out[:] = src[rows] without a temporary."""
    if isinstance(rows, slice):
        out[...] = src[rows]
    else:
        src.take(rows, axis=0, out=out, mode="clip")  # "clip": no bounds check, no buffer


@dataclass
class Ids:
    """One categorical column of a row group: row i has the ids values[offsets[i]:offsets[i + 1]],
    `lengths[i]` of them; single-hot columns (offsets None) have one id a row, values[i]."""

    values: np.ndarray  # int64
    lengths: np.ndarray | None = None  # int32 [N]
    offsets: np.ndarray | None = None  # int64 [N + 1]

    @classmethod
    def from_arrow(cls, arr: pa.ChunkedArray, cardinality: int) -> "Ids":
        """Lists are multi-hot (a null list is empty), strings are hashed."""
        if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
            return cls(_id_values(arr, cardinality))
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy().astype(np.int32)
        return cls(_id_values(pc.list_flatten(arr), cardinality), lengths,
                   np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))

    def gather(self, rows: Rows, lengths: np.ndarray | None, out: np.ndarray) -> None:
        """The ids of `rows` into `out`; multi-hot columns need the rows' `lengths`."""
        if self.offsets is None:
            return _gather(self.values, rows, out)
        # each id's position in `values`: its row's start there, plus its rank within the row
        shift = self.offsets[:-1][rows] - (np.cumsum(lengths, dtype=np.int64) - lengths)
        _gather(self.values, np.repeat(shift, lengths) + np.arange(len(out)), out)


@dataclass
class Block:
    """A checked row group as numpy arrays (zero-copy where Arrow allows) and the epoch's order
    of its rows. Batches gather from it straight into their tensors (one copy a value) rather
    than permuting it first."""

    dense: np.ndarray  # [N, D] float32
    labels: np.ndarray  # [N, T] float32
    weights: np.ndarray  # [N] float32
    row_ids: np.ndarray  # [N] int64
    ids: list[Ids]  # per categorical column
    order: np.ndarray | None = None  # the rows' order; None: as in the file

    @classmethod
    def from_table(cls, table: pa.Table, columns: Columns, row_ids: np.ndarray,
                   weights: np.ndarray | None = None, order: np.ndarray | None = None) -> "Block":
        """`row_ids`: the rows' indices in their split; `weights` None: all 1."""
        return cls(
            dense=_float_matrix(table, columns.dense),
            labels=_float_matrix(table, columns.labels),
            weights=np.ones(table.num_rows, np.float32) if weights is None else weights,
            row_ids=row_ids.astype(np.int64, copy=False),
            ids=[Ids.from_arrow(table.column(c), card)
                 for c, card in zip(columns.categorical, columns.cardinality)],
            order=order,
        )

    def rows(self, lo: int, hi: int) -> Rows:
        """Positions [lo, hi) of the order."""
        return slice(lo, hi) if self.order is None else self.order[lo:hi]


Piece = tuple[Block, int, int]  # positions [lo, hi) of a block


@dataclass
class _Slot:
    """Where a piece goes in a chunk."""

    block: Block
    rows: Rows  # its rows of the block
    row: int  # its first row in its batch
    n: int  # its number of rows
    lengths: np.ndarray  # [keys, n]: its part of its batch's KJT lengths

    def count(self, k: int) -> int:
        """Its number of ids of key k."""
        return self.n if self.block.ids[k].offsets is None else int(self.lengths[k].sum())


# a batch's tensors in its part of a chunk, widest first so that each starts aligned
_PACKED = (("values", np.int64), ("row_ids", np.int64), ("dense", np.float32), ("labels", np.float32),
           ("weights", np.float32), ("lengths", np.int32))
_TORCH_DTYPES = {np.dtype(d): torch.from_numpy(np.empty(0, d)).dtype for _, d in _PACKED}


Layout = dict[str, tuple[np.dtype, tuple[int, ...], int]]  # each tensor's dtype, shape and first byte


def _parts(sizes: list[int], counts: list[list[int]], widths: tuple[int, int]) -> tuple[list[tuple[int, Layout]], int]:
    """Where each batch's tensors go in a chunk's buffer: each batch's first byte and layout,
    and the buffer's size."""
    (d, t), parts, at = widths, [], 0
    for size, per_key in zip(sizes, counts):
        shapes = {"values": (sum(per_key),), "row_ids": (size,), "dense": (size, d), "labels": (size, t),
                  "weights": (size,), "lengths": (size * len(per_key),)}
        start, layout = at, {}
        for name, dtype in _PACKED:
            layout[name] = (np.dtype(dtype), shapes[name], at)
            at += math.prod(shapes[name]) * np.dtype(dtype).itemsize
        parts.append((start, layout))
        at = -(-at // 8) * 8  # the next batch's int64s start aligned too
    return parts, at


@dataclass
class Chunk:
    """Consecutive batches packed into one tensor, each batch's tensors one after the other. A
    DataLoader worker hands over every tensor as a shared-memory segment of its own, through the
    worker's Python (milliseconds each while the worker decodes), so a chunk is one tensor (or
    packed into a `ChunkSlots` slot, none); and each batch goes to the GPU as one copy.
    `batches` cuts views out of it."""

    keys: list[str]
    sizes: list[int]  # rows of each batch
    counts: list[list[int]]  # ids of each batch, key by key (the KJT's length_per_key)
    widths: tuple[int, int]  # dense features, tasks
    buffer: torch.Tensor | None  # uint8, the batches' parts (`_parts`) one after the other
    slot: int | None = None  # the `ChunkSlots` slot holding the buffer, which then stays behind

    def __getstate__(self) -> dict:
        # a chunk in a slot crosses to the trainer as its numbers only
        return {**vars(self), "buffer": None} if self.slot is not None else vars(self)

    @classmethod
    def pack(cls, batches: list[list[Piece]], columns: Columns,
             place: Callable[[int], tuple[int | None, np.ndarray]] | None = None) -> "Chunk":
        """Gathers each batch's pieces into one chunk (an evaluation batch may have none).
        `place(size)` gives the bytes to pack into, and their slot (None: not in a slot)."""
        keys, f = list(columns.categorical), len(columns.categorical)
        sizes = [sum(hi - lo for _, lo, hi in pieces) for pieces in batches]
        blocks = [block for pieces in batches for block, _, _ in pieces]
        multi = [k for k, ids in enumerate(blocks[0].ids) if ids.offsets is not None] if blocks else []
        # each piece's rows, and (multi-hot) ids a row of each key: the counts come from them
        slots: list[list[_Slot]] = []  # per batch
        lengths = [np.ones((f, size), np.int32) for size in sizes]
        for pieces, kjt in zip(batches, lengths):
            at, batch = 0, []
            for block, lo, hi in pieces:
                slot = _Slot(block, block.rows(lo, hi), at, hi - lo, kjt[:, at:at + hi - lo])
                for k in multi:
                    _gather(block.ids[k].lengths, slot.rows, slot.lengths[k])
                batch.append(slot)
                at += hi - lo
            slots.append(batch)
        counts = [[sum(slot.count(k) for slot in batch) for k in range(f)] for batch in slots]
        widths = (len(columns.dense), len(columns.labels))
        parts, size = _parts(sizes, counts, widths)
        in_slot, buffer = place(size) if place else (None, np.empty(size, np.uint8))
        places = []  # (key, slot, ids out): each piece's ids of each key, key-major within a batch (KJT order)
        for batch, kjt, (_, layout) in zip(slots, lengths, parts):
            out = {name: _view(buffer, *layout[name]) for name in layout}
            out["lengths"][:] = kjt.reshape(-1)
            for slot in batch:
                for name, src in (("dense", slot.block.dense), ("labels", slot.block.labels),
                                  ("weights", slot.block.weights), ("row_ids", slot.block.row_ids)):
                    _gather(src, slot.rows, out[name][slot.row:slot.row + slot.n])
            at = 0
            for k in range(f):
                for slot in batch:
                    n = slot.count(k)
                    places.append((k, slot, out["values"][at:at + n]))
                    at += n
        # key by key: a column stays in the CPU cache through all the batches
        for k, slot, out in sorted(places, key=lambda p: p[0]):
            slot.block.ids[k].gather(slot.rows, slot.lengths[k], out)
        return cls(keys, sizes, counts, widths, torch.from_numpy(buffer), in_slot)

    def batches(self, copies: list[torch.cuda.Event] | None = None) -> Iterator[Batch]:
        """Its batches, as views of its buffer (`copies`: see `Batch`). Each KJT carries its ids
        per key, which TorchRec's input distribution would otherwise sum on the GPU and wait for."""
        parts, total = _parts(self.sizes, self.counts, self.widths)
        ends = [start for start, _ in parts[1:]] + [total]
        for (start, layout), end, size, per_key in zip(parts, ends, self.sizes, self.counts):
            t = {name: _view(self.buffer, *layout[name]) for name in layout}
            kjt = KeyedJaggedTensor(keys=self.keys, values=t["values"], lengths=t["lengths"], stride=size,
                                    length_per_key=per_key)
            yield Batch(t["dense"], kjt, t["labels"], t["weights"], t["row_ids"], self.buffer[start:end], copies)

    def pin_memory(self) -> "Chunk":
        return Chunk(self.keys, self.sizes, self.counts, self.widths, self.buffer.pin_memory(), self.slot)


def _view(buffer: np.ndarray | torch.Tensor, dtype: np.dtype, shape: tuple[int, ...], start: int):
    """A dtype view of bytes of `buffer` (numpy, or a torch tensor sharing its memory)."""
    part = buffer[start:start + math.prod(shape) * dtype.itemsize]
    if isinstance(part, np.ndarray):
        return part.view(dtype).reshape(shape)
    return _typed(part, _TORCH_DTYPES[dtype], shape)


def _typed(part: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Bytes as a `dtype` tensor of `shape`, sharing their memory (no bytes: a new empty one)."""
    return part.view(dtype).view(shape) if part.numel() else torch.empty(shape, dtype=dtype, device=part.device)


def arrow_to_batch(table: pa.Table, columns: Columns, row_ids: np.ndarray,
                   weights: np.ndarray | None = None) -> Batch:
    """Converts checked Arrow rows into a `Batch`, in the column order of `columns`."""
    block = Block.from_table(table, columns, row_ids, weights)
    return next(Chunk.pack([[(block, 0, table.num_rows)]], columns).batches())


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
    """Yields `Chunk`s (consecutive batches) for one rank and one epoch.

    DataLoader workers take chunks round-robin, so each worker decodes only the row groups
    its chunks touch; `iter_batches` cuts the chunks back into batches in step order. Helper
    threads decode the next row groups while the current ones are packed into chunks.
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
        self.slots: ChunkSlots | None = None  # where workers pack chunks (`iter_batches` sets it)
        self._footers: dict[str, pq.FileMetaData] = {}
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

    def _read(self, gi: int, epoch: int) -> Block:
        """Decodes and checks one row group; draws its row order."""
        g = self.groups[gi]
        try:
            # the footer is parsed once per file (not memory-mapped: a file cut short while
            # it is read must raise the error below, not kill the process with SIGBUS)
            file = pq.ParquetFile(g.file, metadata=self._footers.get(g.file))
            self._footers[g.file] = file.metadata
            # in a reader worker, one thread: Arrow's pool (a thread per core in every worker)
            # would take cores from the training process; the workers are the parallelism
            table = file.read_row_group(g.index, columns=self.columns.all,
                                        use_threads=torch.utils.data.get_worker_info() is None)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{g.file}: row group {g.index} cannot be read ({' '.join(str(e).split())}); "
                            f"the file is damaged: rewrite it with the converter") from e
        table = subtract_offsets(table, self.columns)
        bad = checks.check_rows(table, self.columns, self.label_kinds, f"{g.file}: row group {g.index}",
                                skip=self.on_bad_rows == "skip")
        if bad is not None:
            table = checks.clean_rows(table, self.columns, bad)
        weights = None if bad is None else (~bad).astype(np.float32)
        order = row_permutation(g, self.seed, epoch, self.shuffle) if self.shuffle else None
        return Block.from_table(table, self.columns, g.first_row + np.arange(g.rows), weights, order)

    def _read_ahead(self, groups: list[int], epoch: int) -> Iterator[Block]:
        """`_read` of each of `groups` in turn, done on helper threads READ_AHEAD row groups
        ahead: pyarrow and numpy release the GIL, so decoding overlaps packing."""
        pool, pending = ThreadPoolExecutor(READ_AHEAD), deque()
        try:
            for gi in groups:
                pending.append(pool.submit(self._read, gi, epoch))
                if len(pending) > READ_AHEAD:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(cancel_futures=True)

    def chunk_bytes(self) -> int:
        """The bytes of a chunk of full batches, at one id a row per single-hot column and two
        per multi-hot one (a chunk that needs more is packed outside the slots)."""
        ids = [self.batch_size * (2 if c in self.columns.multi_hot else 1) for c in self.columns.categorical]
        widths = (len(self.columns.dense), len(self.columns.labels))
        return _parts([self.batch_size] * self.chunk_batches, [ids] * self.chunk_batches, widths)[1]

    def _chunks(self, share: list[Span], sizes: list[int]) -> list[list[tuple[int, int]]]:
        """Batches as (start, size) in share positions, grouped into chunks."""
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
        pairs = list(zip(starts, sizes))
        return [pairs[i:i + self.chunk_batches] for i in range(0, len(pairs), self.chunk_batches)]

    def __iter__(self) -> Iterator[Chunk]:
        share, sizes = self.plan()
        epoch = self.position.epoch
        order = epoch_order(self.groups, self.seed, epoch, self.shuffle)
        # global position where each row group (in visiting order) begins
        offsets = np.concatenate([[0], np.cumsum([self.groups[g].rows for g in order])])
        info = torch.utils.data.get_worker_info()
        workers, me = (info.num_workers, info.id) if info else (1, 0)
        # this worker's chunks, each batch as (row group, lo, hi) pieces
        chunks = [[self._pieces(share, start, size, order, offsets) for start, size in chunk]
                  for ci, chunk in enumerate(self._chunks(share, sizes)) if ci % workers == me]
        needed = [gi for gi, _ in groupby(gi for chunk in chunks for pieces in chunk for gi, _, _ in pieces)]
        blocks = self._read_ahead(needed, epoch)
        held, block = -1, None
        for k, chunk in enumerate(chunks):
            batches = []
            for pieces in chunk:
                batches.append([])
                for gi, lo, hi in pieces:
                    if gi != held:  # the next one: row groups come in the order needed
                        held, block = gi, next(blocks)
                    batches[-1].append((block, lo, hi))
            place = None if self.slots is None or not info else \
                (lambda size, k=k: self.slots.take(me, k, size))
            yield Chunk.pack(batches, self.columns, place)

    @staticmethod
    def _pieces(share: list[Span], start: int, size: int, order: list[int],
                offsets: np.ndarray) -> list[tuple[int, int, int]]:
        """Share positions [start, start + size) as (row group, lo, hi): rows [lo, hi) of the
        row group in its permuted order."""
        pieces = []
        for a, b in take_spans(share, start, size):
            # row groups covering global positions [a, b)
            k = int(np.searchsorted(offsets, a, side="right")) - 1
            while a < b:
                lo, hi = a - offsets[k], min(b, offsets[k + 1]) - offsets[k]
                pieces.append((order[k], int(lo), int(hi)))
                a, k = offsets[k] + hi, k + 1
        return pieces


SLOTS_PER_WORKER = 3  # a chunk being trained on, and two packed ahead


class ChunkSlots:
    """Shared, page-locked memory that reader workers pack chunks into and the copy to the GPU
    reads in place.

    A DataLoader hands a worker's chunk over by moving it into a new shared-memory segment
    (a copy in the worker), passing that segment's file descriptor through the worker's Python,
    and copying it into page-locked memory on the trainer's pin thread: work on the trainer's
    host, whose time bounds a GPU step, for every chunk. Here the trainer makes the memory once
    (a memfd, each slot `slot_bytes`, registered with CUDA), worker w packs its k-th chunk into
    its slot k mod `per_worker` and sends back the slot's number, and a slot is written again
    only after the trainer has released it (`release`: the copies of its chunk are done).
    """

    def __init__(self, workers: int, per_worker: int, slot_bytes: int, pin: bool):
        self.workers, self.per_worker = workers, per_worker
        self.slot_bytes = -(-slot_bytes // 64) * 64  # each slot's int64s start aligned
        self.size = workers * per_worker * self.slot_bytes
        self._fd = os.memfd_create("mmoe-reader-chunks")
        os.ftruncate(self._fd, self.size)
        self._owner = os.getpid()
        # 1: the slot holds a chunk the trainer has not released (shared with forked workers)
        self._taken = np.frombuffer(mmap.mmap(-1, 8 * workers * per_worker), np.int64)
        self._memory: dict[int, torch.Tensor] = {}
        self.pinned = pin
        if pin:
            mem = self.memory()
            err = int(torch.cuda.cudart().cudaHostRegister(mem.data_ptr(), self.size, 1))  # 1: portable
            if err:
                raise RuntimeError(f"page-locking {self.size / 2**20:.0f} MiB of reader slots failed "
                                   f"(CUDA error {err}); lower data.num_workers")

    def memory(self) -> torch.Tensor:
        """This process's mapping: a forked worker maps the memfd anew (the driver may keep
        page-locked memory out of a fork's copy of the trainer's)."""
        pid = os.getpid()
        if pid not in self._memory:
            self._memory = {pid: torch.frombuffer(mmap.mmap(self._fd, self.size), dtype=torch.uint8)}
        return self._memory[pid]

    def view(self, slot: int) -> torch.Tensor:
        return self.memory()[slot * self.slot_bytes:(slot + 1) * self.slot_bytes]

    def take(self, worker: int, k: int, size: int) -> tuple[int | None, np.ndarray]:
        """(slot, bytes) for `worker`'s k-th chunk of `size` bytes, once the trainer released
        the slot; a chunk too big for a slot gets memory of its own (slot None)."""
        if size > self.slot_bytes:
            return None, np.empty(size, np.uint8)
        slot = worker * self.per_worker + k % self.per_worker
        wait = 0.0002
        while self._taken[slot]:  # a worker ahead of training waits here most of the time
            if os.getppid() != self._owner:
                raise RuntimeError("the training process is gone")
            time.sleep(wait)
            wait = min(2 * wait, 0.005)  # seldom wakes, beside a trainer bound by its host
        self._taken[slot] = 1
        return slot, self.view(slot)[:size].numpy()

    def release(self, copies: list[torch.cuda.Event] | None, slot: int) -> None:
        """Frees `slot` once `copies` (of its chunk's batches to the GPU) are done."""
        for event in copies or ():
            event.synchronize()  # made a chunk ago: done, unless the copy engine fell behind
        self._taken[slot] = 0

    def reset(self) -> None:
        self._taken[:] = 0

    def __reduce__(self):
        raise TypeError("reader slots reach the DataLoader's workers by fork (its default on Linux), "
                        "not by pickling")


_IDLE_SLOTS: list[ChunkSlots] = []  # slots whose loader has finished, for the next one


def _slots_for(dataset: ParquetBatches, workers: int) -> ChunkSlots:
    """Idle slots that fit `dataset`'s chunks, or new ones (page-locking takes a while, and
    every epoch and evaluation starts a loader)."""
    need = dataset.chunk_bytes()
    for i, slots in enumerate(_IDLE_SLOTS):
        if slots.pinned and slots.workers == workers and slots.slot_bytes >= need:
            return _IDLE_SLOTS.pop(i)
    return ChunkSlots(workers, SLOTS_PER_WORKER, need, pin=True)


def iter_batches(dataset: ParquetBatches, num_workers: int, pin_memory: bool,
                 slots: ChunkSlots | None = None) -> Iterator[Batch]:
    """Step-ordered batches of one epoch (or of what remains of it). The reader workers start
    now, not at the first batch: made before an epoch ends, the next epoch's first batches
    are decoded by the time they are needed (see `batches_in_flight`).

    Workers pack into `slots`, by default page-locked ones (`ChunkSlots`) where `pin_memory`
    asks for pinned batches on a GPU machine. Batches in slots are views of memory the reader
    reuses: copy each one as it is taken (`.to(device, non_blocking=True)`, as TorchRec's
    pipeline does). A chunk's slot is written again once the batch after the following chunk
    is asked for, and its batches' copies to the GPU are done.
    """
    if slots is None and pin_memory and num_workers and torch.cuda.is_available():
        slots = _slots_for(dataset, num_workers)
    if slots is not None:
        dataset = copy.copy(dataset)  # the workers' copy packs into the slots
        dataset.slots = slots
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers,
                        pin_memory=pin_memory and slots is None, persistent_workers=False,
                        prefetch_factor=PREFETCH_CHUNKS if num_workers else None,
                        # its own generator: drawing worker seeds from the global one would
                        # shift dropout masks depending on when an epoch's loader starts
                        generator=torch.Generator())
    return _unpack(iter(loader), slots)


def _unpack(chunks: Iterator[Chunk], slots: ChunkSlots | None) -> Iterator[Batch]:
    held = []  # (copies made, slot) of the chunks in slots not released yet
    try:
        for chunk in chunks:
            copies = None
            if chunk.slot is not None:
                chunk.buffer = slots.view(chunk.slot)
                copies = [] if slots.pinned else None
                held.append((copies, chunk.slot))
            yield from chunk.batches(copies)
            # moved past this chunk: the ones before it are done with (their copies long
            # issued); only this one's slot stays held while the next chunk is waited for
            while len(held) > (chunk.slot is not None):
                slots.release(*held.pop(0))
    except DataError as e:
        # a worker's error arrives with its traceback in the message; keep the one line
        raise DataError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
    finally:
        if slots is not None:
            for copies, slot in held:
                slots.release(copies, slot)
            slots.reset()  # wakes a worker waiting for a slot, so that the loader can stop it
            chunks = None  # stops the loader's workers (its iterator's finalizer joins them)
            slots.reset()  # what they packed meanwhile is dropped
            if slots.pinned:
                _IDLE_SLOTS.append(slots)


def batches_in_flight(dataset: ParquetBatches, num_workers: int) -> int:
    """At most this many batches are decoded ahead of the trainer: once fewer are left in an
    epoch, its workers have (nearly) nothing left to read, and the next epoch's can start."""
    return max(1, num_workers) * PREFETCH_CHUNKS * dataset.chunk_batches
