"""Parquet row groups -> chunks of batches for one rank and one epoch (`ParquetBatches`)."""
from __future__ import annotations

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset

from app.data import checks
from app.data.batch import Block, Chunk, chunk_parts
from app.data.errors import DataError
from app.data.layout import split_files
from app.data.order import (Position, RowGroup, Span, batch_sizes, epoch_order, rank_share, row_permutation,
                            span_rows, take_spans)
from app.data.schema import Columns

READ_AHEAD = 2  # row groups decoded ahead of the one being packed
MULTI_HOT_MARGIN = 1.05  # room in reader slots over the ids a row the footers show


def scan_row_groups(files: list[Path], columns: Columns, label_kinds: tuple[str, ...] | None = None,
                    ids_per_row: dict[str, float] | None = None) -> list[RowGroup]:
    """Reads footers only; rejects unreadable, empty or mismatched files before training, and
    with `label_kinds`, values that the footers' statistics show out of range. `ids_per_row`
    gets, per multi-hot column, the most ids a row that any row group has on average (from
    the footers' value counts, where an empty list counts as one)."""
    groups: list[RowGroup] = []
    first_row, reference = 0, None
    for path in files:
        meta = checks.check_file(path, columns, reference)
        if label_kinds is not None:
            checks.check_statistics(path, meta, columns, label_kinds)
        reference = reference or (path, meta.schema.to_arrow_schema())
        leaves = {meta.schema.column(j).path.split(".")[0]: j for j in range(meta.num_columns)}
        for i in range(meta.num_row_groups):
            rows = meta.row_group(i).num_rows
            if rows:
                groups.append(RowGroup(str(path), i, rows, first_row))
                first_row += rows
                for c in columns.multi_hot if ids_per_row is not None else ():
                    ids = meta.row_group(i).column(leaves[c]).num_values / rows
                    ids_per_row[c] = max(ids_per_row.get(c, 0.0), ids)
    return groups


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
        self.ids_per_row: dict[str, float] = {}  # the multi-hot columns' (`scan_row_groups`)
        self.groups = scan_row_groups(self.files, columns, label_kinds if on_bad_rows == "error" else None,
                                      self.ids_per_row)
        self.total_rows = sum(g.rows for g in self.groups)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.train, self.seed, self.shuffle = train, seed, shuffle and train
        self.on_bad_rows, self.chunk_batches = on_bad_rows, chunk_batches
        self.position = Position()
        self.slots = None  # the `ChunkSlots` (app.data.loader) workers pack into; `iter_batches` sets it
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
        # in a reader worker, one thread: Arrow's pool (a thread per core in every worker)
        # would take cores from the training process; the workers are the parallelism
        table = checks.read_row_group(g.file, g.index, self.columns, self._footers,
                                      use_threads=torch.utils.data.get_worker_info() is None)
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
        """The bytes of a chunk of full batches, at one id a row per single-hot column and 5%
        over the most a row group has per multi-hot one (a chunk that needs more is packed
        outside the slots)."""
        ids = [math.ceil(self.batch_size * MULTI_HOT_MARGIN * self.ids_per_row[c]) if c in self.ids_per_row
               else self.batch_size for c in self.columns.categorical]
        widths = (len(self.columns.dense), len(self.columns.labels))
        return chunk_parts([self.batch_size] * self.chunk_batches, [ids] * self.chunk_batches, widths)[1]

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
