"""Batches for the trainer: a split's reader from the config (`split_data`), and the training
feed (`EpochFeed`), which owns where training stands in its epochs (the `Position` a
checkpoint stores), the next epoch's read-ahead, and what the ranks have consumed."""
from __future__ import annotations

import copy
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import torch
import torch.distributed as dist

from app.config import Config
from app.data.batch import Batch
from app.data.errors import DataError
from app.data.loader import batches_in_flight, iter_batches
from app.data.order import Position, consume, span_rows
from app.data.reader import ParquetBatches
from app.distributed import Env


def split_data(cfg: Config, env: Env, columns, split: str, train: bool) -> ParquetBatches:
    """This rank's reader of `split`: training batches (equal counts on every rank, shuffled) or
    scoring batches (every row once)."""
    return ParquetBatches(cfg.data.path, split, columns, tuple(t.type for t in cfg.tasks.values()),
                          cfg.data.batch_size if train else cfg.data.eval_batch_size, env.rank,
                          env.world_size, train=train, seed=cfg.train.seed,
                          shuffle=cfg.data.shuffle, on_bad_rows=cfg.data.on_bad_rows)


class AgreedBatches:
    """`batches`, handed out only while every rank has its next one: bad input found by one
    rank's reader (a `DataError`) ends the batches on every rank before the same batch, so that
    no rank waits in a collective for a rank that stopped. The error is kept (`error`): the
    reading rank's own, a note pointing at it on the others. On one rank nothing is exchanged;
    on more, each batch is read one ahead and the ranks agree on it over `host_group` while the
    one before it trains."""

    def __init__(self, batches: Iterator[Batch], host_group: dist.ProcessGroup | None):
        self.batches, self.host_group = batches, host_group
        self.error: DataError | None = None
        if host_group is not None:
            self._read_ahead()

    def __iter__(self) -> AgreedBatches:
        return self

    def _read_ahead(self) -> None:
        self._next, self._next_error = None, None
        try:
            self._next = next(self.batches)
        except StopIteration:
            pass  # every rank has as many batches: all run out together
        except DataError as e:
            self._next_error = e
        self._flag = torch.tensor([self._next_error is not None], dtype=torch.int32)
        self._vote = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.host_group, async_op=True)

    def __next__(self) -> Batch:
        if self.host_group is None:
            try:
                return next(self.batches)
            except DataError as e:
                self.error = e
                raise StopIteration from None
        self._vote.wait()
        if self._flag.item():
            self.error = self._next_error or DataError(
                f"rank {dist.get_rank()} stopped with the other ranks: another rank's reader found bad "
                f"input (its error is above)")
            raise StopIteration
        if self._next is None:
            raise StopIteration
        batch = self._next
        self._read_ahead()
        return batch


class Segment:
    """At most `count` batches of the current epoch; `stop()` ends it early, at the same batch
    on every rank (the pipeline finishes the batches it holds, then drains)."""

    def __init__(self, feed: EpochFeed, count: int):
        self.feed, self.left = feed, count
        self.stopped = self.exhausted = False
        self.error: DataError | None = None  # bad input ended it (every rank's segment ends there)

    def __iter__(self) -> Segment:
        return self

    def __next__(self) -> Batch:
        if self.left <= 0 or self.stopped:
            raise StopIteration
        try:
            batch = self.feed.next_batch()
        except StopIteration:
            self.error = self.feed.error
            self.exhausted = self.error is None  # the epoch's data ran out
            raise
        self.left -= 1
        return batch

    def stop(self) -> None:
        self.stopped = True


class EpochFeed:
    """Training batches from `position` on, handed out in segments (`segment`), for
    `epochs` epochs or until step `max_steps` (0: no limit).

    A segment ends early where its epoch does; `done(segment)` then moves the position to the
    next epoch, and otherwise to the rows every rank has left. Once the current epoch has no
    more batches to decode than its reader holds ahead, the next epoch's reader workers start
    (`batches_in_flight`): they decode its first batches while this epoch's last ones train
    (starting them at the epoch's end stalled training for 0.1-2 s an epoch). They are started
    from a thread of their own, so that training goes on meanwhile (started by the training
    thread, they held it up 430 ms an epoch on an H100 machine).
    """

    def __init__(self, data: ParquetBatches, position: Position, step: int, epochs: int, max_steps: int,
                 num_workers: int, pin_memory: bool, host_group: dist.ProcessGroup | None = None):
        self.data, self.position = data, position
        self.num_workers, self.pin_memory, self.host_group = num_workers, pin_memory, host_group
        self.read_ahead = batches_in_flight(data, num_workers)
        steps_per_epoch = len(data)  # of a whole epoch on this world size (a resume may change it)
        data.set_position(position)
        total = step + len(data) + steps_per_epoch * (epochs - position.epoch - 1)
        self.total = step if position.epoch >= epochs else total  # the step training ends at
        if max_steps:
            self.total = min(self.total, max_steps)
        self._batches: AgreedBatches | None = None  # the current epoch's
        self._upcoming: Future[Iterator[Batch]] | None = None  # the next epoch's, started early
        self._starter = ThreadPoolExecutor(1, thread_name_prefix="next-epoch-reader")
        self._step = step  # of the last batch handed out

    def segment(self, count: int) -> Segment:
        """The next `count` batches, or fewer where the epoch ends."""
        if self._batches is None:  # a new epoch (or the first one, resumed)
            self.data.set_position(self.position)
            self._epoch_spans = self.position.remaining or [(0, self.data.total_rows)]
            self._epoch_end = self._step + len(self.data)
            self._taken = 0
            batches = self._upcoming.result() if self._upcoming else \
                iter_batches(self.data, self.num_workers, self.pin_memory)
            self._batches = AgreedBatches(batches, self.host_group)
            self._upcoming = None
        return Segment(self, count)

    @property
    def error(self) -> DataError | None:
        """The bad input that ended the current epoch's batches, if any."""
        return self._batches.error if self._batches is not None else None

    @property
    def reading_ahead(self) -> bool:
        """Whether the next epoch's reader has started."""
        return self._upcoming is not None

    def next_batch(self) -> Batch:
        batch = next(self._batches)
        self._taken += 1
        self._step += 1
        if self._upcoming is None and self._epoch_end - self._step <= self.read_ahead \
                and self._epoch_end < self.total:
            ahead = copy.copy(self.data)  # this epoch may still read through `data` (num_workers = 0)
            ahead.set_position(Position(self.position.epoch + 1))
            self._upcoming = self._starter.submit(iter_batches, ahead, self.num_workers, self.pin_memory)
        return batch

    def done(self, segment: Segment) -> None:
        """Records what every rank consumed once `segment` has trained (the pipeline drained)."""
        world = self.data.world_size
        remaining = consume(self._epoch_spans, world, self._taken * self.data.batch_size)
        if segment.error is None and (segment.exhausted or span_rows(remaining) < world):
            self.position, self._batches = Position(self.position.epoch + 1), None
        else:
            self.position = Position(self.position.epoch, remaining)
