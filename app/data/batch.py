"""The `Batch` a training step takes, and how the reader packs batches.

A checked row group becomes a `Block` of numpy arrays; a `Chunk` packs consecutive batches,
gathered from blocks in the epoch's row order, into one buffer (each batch's tensors one
after the other), and `Chunk.batches` cuts `Batch`es back out of it as views.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from app.data.schema import Columns, is_list


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
    fixed: int = 0  # multi-hot lists that all have this many ids (0: lengths vary, or single-hot)

    @classmethod
    def from_arrow(cls, arr: pa.ChunkedArray, cardinality: int) -> "Ids":
        """Lists are multi-hot (a null list is empty), strings are hashed."""
        if not is_list(arr.type):
            return cls(_id_values(arr, cardinality))
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy().astype(np.int32)
        fixed = int(lengths[0]) if len(lengths) and lengths[0] > 0 and (lengths == lengths[0]).all() else 0
        return cls(_id_values(pc.list_flatten(arr), cardinality), lengths,
                   np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]), fixed)

    def gather(self, rows: Rows, lengths: np.ndarray | None, out: np.ndarray) -> None:
        """The ids of `rows` into `out`; multi-hot columns need the rows' `lengths`."""
        if self.offsets is None:
            return _gather(self.values, rows, out)
        if self.fixed:  # a row's ids are one row of a [N, fixed] matrix: one index a row, not one an id
            return _gather(self.values.reshape(-1, self.fixed), rows, out.reshape(-1, self.fixed))
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


def chunk_parts(sizes: list[int], counts: list[list[int]], widths: tuple[int, int]) -> tuple[list[tuple[int, Layout]], int]:
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
    buffer: torch.Tensor | None  # uint8, the batches' parts (`chunk_parts`) one after the other
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
        parts, size = chunk_parts(sizes, counts, widths)
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
        parts, total = chunk_parts(self.sizes, self.counts, self.widths)
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
