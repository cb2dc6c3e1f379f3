"""Reader worker processes, and the shared page-locked memory they pack chunks into."""
from __future__ import annotations

import copy
import mmap
import multiprocessing
import os
import sys
import threading
import time
from typing import Iterator

import numpy as np
import torch
from multiprocessing.reduction import DupFd
from torch.utils.data import DataLoader

from app.data.batch import Batch, Chunk
from app.data.errors import DataError
from app.data.reader import ParquetBatches

PREFETCH_CHUNKS = 4  # chunks each reader worker holds ready
# Reader workers are forked from a server process (`start_worker_server`), not from the trainer:
# forking the trainer (its CUDA context, compiled code and page-locked memory) held it up about
# 50 ms a worker at every epoch's and evaluation's start (430 ms for 8 workers on an H100
# machine), where the next epoch's workers start while this one trains.
WORKERS = multiprocessing.get_context("forkserver")


SLOTS_PER_WORKER = 3  # a chunk being trained on, and two packed ahead


def start_worker_server() -> None:
    """Starts the server reader workers are forked from, unless it runs. It imports the app's
    modules that this process has imported (a worker runs the main script's top level again,
    as Python's multiprocessing does for every start method but fork: with them imported
    already, that takes milliseconds, not seconds). Called early, it imports them while the
    trainer builds its model."""
    from multiprocessing import forkserver

    WORKERS.set_forkserver_preload(sorted(m for m in sys.modules if m.split(".")[0] == "app"
                                          and not m.endswith("__main__")))
    forkserver.ensure_running()


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
        os.ftruncate(self._fd, self._flag_bytes + self.size)
        self._owner = os.getpid()
        self._attach()
        self.pinned = pin
        if pin:
            mem = self.memory()
            err = int(torch.cuda.cudart().cudaHostRegister(mem.data_ptr(), self.size, 1))  # 1: portable
            if err:
                raise RuntimeError(f"page-locking {self.size / 2**20:.0f} MiB of reader slots failed "
                                   f"(CUDA error {err}); lower data.num_workers")

    @property
    def _flag_bytes(self) -> int:
        """The memfd's first pages: a flag a slot (the slots start on a page)."""
        return -(-8 * self.workers * self.per_worker // mmap.PAGESIZE) * mmap.PAGESIZE

    def _attach(self) -> None:
        """Maps the flags: 1 where a slot holds a chunk the trainer has not released."""
        self._taken = np.frombuffer(mmap.mmap(self._fd, self._flag_bytes), np.int64)[:self.workers * self.per_worker]
        self._memory: dict[int, torch.Tensor] = {}

    def memory(self) -> torch.Tensor:
        """This process's mapping of the slots."""
        pid = os.getpid()
        if pid not in self._memory:
            self._memory = {pid: torch.frombuffer(mmap.mmap(self._fd, self.size, offset=self._flag_bytes),
                                                  dtype=torch.uint8)}
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
            if not _alive(self._owner):
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

    def __getstate__(self) -> dict:
        """For a worker being started: the memfd travels as a file descriptor of its own."""
        return {**vars(self), "_fd": DupFd(self._fd), "_taken": None, "_memory": None}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state, _fd=state["_fd"].detach())
        self._attach()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


_IDLE_SLOTS: list[ChunkSlots] = []  # slots whose loader has finished, for the next one
_IDLE_LOCK = threading.Lock()  # loaders start on another thread too (`app.feed`)


def _slots_for(dataset: ParquetBatches, workers: int) -> ChunkSlots:
    """Idle slots that fit `dataset`'s chunks, or new ones (page-locking takes a while, and
    every epoch and evaluation starts a loader)."""
    need = dataset.chunk_bytes()
    with _IDLE_LOCK:
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
    if num_workers:
        start_worker_server()
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers,
                        pin_memory=pin_memory and slots is None, persistent_workers=False,
                        prefetch_factor=PREFETCH_CHUNKS if num_workers else None,
                        multiprocessing_context=WORKERS if num_workers else None,
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
                with _IDLE_LOCK:
                    _IDLE_SLOTS.append(slots)


def batches_in_flight(dataset: ParquetBatches, num_workers: int) -> int:
    """At most this many batches are decoded ahead of the trainer: once fewer are left in an
    epoch, its workers have (nearly) nothing left to read, and the next epoch's can start."""
    return max(1, num_workers) * PREFETCH_CHUNKS * dataset.chunk_batches
