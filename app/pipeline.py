"""The training pipeline: TorchRec's `TrainPipelineSparseDist` (`train.pipeline = "torchrec"`),
or by default (`"host"`) a subclass of it that learns each batch's counts on the host. This is
the one module that reaches into TorchRec's internals; `make_pipeline` uses it only on the
TorchRec releases it was written for and tested on, and TorchRec's own pipeline otherwise.

Before a batch's ids move between ranks, every rank must learn how many it receives from each
other rank; after they arrive, how many it got of each feature. The sender knows both on the
host (`Chunk.batches` sets them), but TorchRec copies the counts to the GPU (two blocking
copies), all-to-alls them with NCCL, where they queue behind the step's other collectives on
the same communicator, and reads them back; then sums the ids per feature on the GPU and reads
those back too. So the host waits for the GPU twice a step and cannot run ahead of it. Here
both go over a gloo group between the hosts. The ids themselves still move with NCCL, as
TorchRec sends them. On one rank there is nothing to exchange: the ids stay where they are,
where TorchRec would still build its exchange (and a reordering tensor, copied to the GPU
with a wait) every step.

TorchRec also builds the ids' reordering after the all-to-all (`_get_recat`) from a Python list
every step, copied to the GPU with a wait for the copy; it depends only on the splits and the
batch sizes, so here it is made once per distinct value and kept (`_kept_recats`, applied
around TorchRec's code that makes it, and only there).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from typing import Iterator

import torch
import torch.distributed as dist
import torchrec
from torchrec.distributed import dist_data
from torchrec.distributed.dist_data import KJTAllToAll, KJTAllToAllTensorsAwaitable
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import Awaitable, NoWait
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from app.distributed import Env

log = logging.getLogger("app")

PIPELINES = ("host", "torchrec")
# TorchRec releases (major.minor) whose internals this module was written against and tested on
WRITTEN_FOR = ("1.6", "1.8")


def make_pipeline(kind: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  env: Env) -> TrainPipelineSparseDist:
    """`train.pipeline`: "host" (`HostSplitsPipeline`, where this TorchRec release is one it was
    written for) or "torchrec". Both run every batch they are given (`execute_all_batches`)."""
    release = ".".join(torchrec.__version__.split(".")[:2])
    if kind == "host" and release not in WRITTEN_FOR:
        log.warning("train.pipeline 'host' reaches into TorchRec internals written for TorchRec %s; "
                    "this is %s, so TorchRec's own pipeline runs instead", " and ".join(WRITTEN_FOR),
                    torchrec.__version__)
        kind = "torchrec"
    if kind == "torchrec":
        return TrainPipelineSparseDist(model, optimizer, env.device, execute_all_batches=True)
    return HostSplitsPipeline(model, optimizer, env.device, env.host_group, execute_all_batches=True)


class HostSplitsPipeline(TrainPipelineSparseDist):
    """`TrainPipelineSparseDist` whose input distributions exchange their counts on the host.
    Its batches have one batch size for all features (no variable batch per feature)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 host_group: dist.ProcessGroup | None, **kwargs) -> None:
        super().__init__(model, optimizer, device, **kwargs)
        self._host_group = host_group  # None on one rank (`Env.host_group`)

    def _init_pipelined_modules(self, batch, context, *args, **kwargs) -> None:
        # TorchRec points the input distributions at its fused GPU splits exchange here
        super()._init_pipelined_modules(batch, context, *args, **kwargs)
        for module in self._pipelined_modules:
            for child in module.modules():
                for input_dist in getattr(child, "_input_dists", ()):
                    kjt_dist = getattr(input_dist, "_dist", None)
                    if isinstance(kjt_dist, KJTAllToAll):
                        _exchange_on_host(kjt_dist, self._host_group)


def _exchange_on_host(kjt_dist: KJTAllToAll, host_group: dist.ProcessGroup | None) -> None:
    if host_group is None:  # one rank: its ids are all its own
        kjt_dist.forward = lambda kjt: NoWait(NoWait(kjt))
    else:
        kjt_dist.forward = lambda kjt: HostSplitsAwaitable(kjt_dist, kjt, host_group)


class HostSplitsAwaitable(Awaitable[KJTAllToAllTensorsAwaitable]):
    """Sends this rank's splits (ids and rows for each rank) and its ids per feature to every
    rank over `host_group`; waited on, starts TorchRec's all-to-all of the ids with the splits
    received, and the ids per feature make TorchRec's read of them from the GPU unnecessary."""

    def __init__(self, kjt_dist: KJTAllToAll, kjt: KeyedJaggedTensor, host_group: dist.ProcessGroup) -> None:
        super().__init__()
        self._dist, self._kjt = kjt_dist, kjt
        self._input_splits = kjt.dist_splits(kjt_dist._splits)  # per tensor (lengths, values), per rank
        sent = torch.tensor([n for splits in self._input_splits for n in splits] + [kjt.stride()]
                            + kjt.length_per_key(), dtype=torch.int64)
        self._received = [torch.empty_like(sent) for _ in range(kjt_dist._pg.size())]
        self._work = dist.all_gather(self._received, sent, group=host_group, async_op=True)

    def _wait_impl(self) -> KJTAllToAllTensorsAwaitable:
        self._work.wait()
        kjt_dist, kjt = self._dist, self._kjt
        world, rank, tensors = kjt_dist._pg.size(), kjt_dist._pg.rank(), len(self._input_splits)
        bounds = [0, *itertools.accumulate(kjt_dist._splits)]
        received = torch.stack(self._received)  # [rank it came from, what it sent]
        ids_per_key = received[:, tensors * world + 1:][:, bounds[rank]:bounds[rank + 1]].sum(0)
        with _kept_recats():
            return KnownLengthsAwaitable(
                ids_per_key.tolist(),
                pg=kjt_dist._pg, input=kjt, splits=kjt_dist._splits, input_splits=self._input_splits,
                output_splits=received[:, :tensors * world].view(world, tensors, world)[:, :, rank].T.tolist(),
                input_tensors=kjt.dist_tensors(), labels=kjt.dist_labels(),
                keys=kjt.keys()[bounds[rank]:bounds[rank + 1]], device=kjt.device(),
                stagger=kjt_dist._stagger, stride_per_rank=received[:, tensors * world].tolist())


class KnownLengthsAwaitable(KJTAllToAllTensorsAwaitable):
    """TorchRec's all-to-all of the ids, giving a KJT whose ids per feature are already known:
    TorchRec's own (`KeyedJaggedTensor.dist_init`) sums them on the GPU and waits for the sum."""

    def __init__(self, length_per_key: list[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self._length_per_key = length_per_key

    def _wait_impl(self) -> KeyedJaggedTensor:
        for work in self._awaitables:
            work.wait()
        lengths, values, *weights = self._output_tensors
        weights = weights[0] if weights else None
        strides = self._stride_per_rank
        if self._recat is not None:
            # from [rank it came from][feature] to [feature][rank], as `dist_init` does
            if all(s == strides[0] for s in strides):
                if strides[0]:
                    lengths, values, weights = torch.ops.fbgemm.permute_2D_sparse_data(
                        self._recat, lengths.view(-1, strides[0]), values, weights, values.numel())
                    lengths = lengths.view(-1)
            else:
                lengths, values, weights = torch.ops.fbgemm.permute_1D_sparse_data(
                    self._recat, lengths.view(-1), values, weights, values.numel())
        return KeyedJaggedTensor(keys=self._keys, values=values, weights=weights, lengths=lengths,
                                 stride=sum(strides), length_per_key=self._length_per_key)


_torchrec_recat = dist_data._get_recat


@contextlib.contextmanager
def _kept_recats() -> Iterator[None]:
    """TorchRec's code run inside makes each reordering once per distinct arguments."""
    dist_data._get_recat = kept_recat
    try:
        yield
    finally:
        dist_data._get_recat = _torchrec_recat


def kept_recat(local_split: int, num_splits: int, stagger: int = 1, device: torch.device | None = None,
               batch_size_per_rank: list[int] | None = None) -> torch.Tensor | None:
    """TorchRec's `_get_recat`, made once per distinct arguments (read-only where it is used)."""
    return _recat(local_split, num_splits, stagger, device,
                  None if batch_size_per_rank is None else tuple(batch_size_per_rank))


@functools.lru_cache(maxsize=256)
def _recat(local_split, num_splits, stagger, device, batch_size_per_rank) -> torch.Tensor | None:
    return _torchrec_recat(local_split, num_splits, stagger, device,
                           None if batch_size_per_rank is None else list(batch_size_per_rank))
