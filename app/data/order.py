"""The epoch's row order and each rank's share of it: pure functions of the row groups, the
seed, the epoch and the world size, so every rank computes the same order without talking,
and a resume on any world size continues exactly where the run stopped."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RowGroup:
    """One non-empty row group of a split's files."""

    file: str
    index: int
    rows: int
    first_row: int  # index of its first row within the split


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
