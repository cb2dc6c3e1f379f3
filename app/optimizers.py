"""Optimizers: the tables' own, fused into their backward, and the dense ones over the
parameters every rank holds (dense head, replicated tables), which start from rank 0's values
and step on gradients averaged over the ranks in one flat all-reduce (no DDP)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torchrec.optim.keyed import CombinedOptimizer
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

SPARSE_OPTIMIZERS = {"adagrad": torch.optim.Adagrad, "rowwise_adagrad": RowWiseAdagrad,
                     "sgd": torch.optim.SGD, "adam": torch.optim.Adam}
DENSE_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


class AveragingOptimizer(CombinedOptimizer):
    """The combined optimizer, stepping after the gradients of the parameters every rank holds
    (dense head, replicated tables) are averaged over the ranks (`GradientMeans`)."""

    def __init__(self, optimizers: list, replicated: list[torch.nn.Parameter]):
        super().__init__(optimizers)
        self._means = GradientMeans(replicated) if dist.get_world_size() > 1 else None

    def step(self, closure=None) -> None:
        if self._means is not None:
            self._means.wait()
        super().step(closure)


def _flat_groups(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """`tensors` by dtype: each group flattens into one buffer."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())


class GradientMeans:
    """Replaces the gradients of `params` with their means over the ranks, in one flat all-reduce
    (per dtype) that starts as soon as the backward has accumulated the last of them, so that it
    overlaps the rest of the backward (the tables' update, the all-to-alls), as DDP's did. DDP
    got there with an autograd hook, a copy into its bucket and a division per parameter, whose
    host time a GPU step pays. Parameters without a gradient are left out; the model's graph is
    the same on every rank, so they are the same ones."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params, self._accumulated, self._pending = params, 0, []
        for p in params:
            p.register_post_accumulate_grad_hook(self._accumulate)

    def _accumulate(self, _: torch.Tensor) -> None:
        self._accumulated += 1
        if self._accumulated == len(self.params):
            self._start()

    def _start(self) -> None:
        nccl = dist.get_backend() == "nccl"  # gloo has no AVG
        for group in _flat_groups([p for p in self.params if p.grad is not None]):
            flat = _flatten_dense_tensors([p.grad for p in group])
            work = dist.all_reduce(flat, op=dist.ReduceOp.AVG if nccl else dist.ReduceOp.SUM, async_op=True)
            self._pending.append((group, flat, work, not nccl))

    def wait(self) -> None:
        """The means in place of the gradients (started here if some parameter got none)."""
        if not self._pending:
            self._start()
        for group, flat, work, divide in self._pending:
            work.wait()
            if divide:
                flat.div_(dist.get_world_size())
            for p, g in zip(group, _unflatten_dense_tensors(flat, [p.grad for p in group])):
                p.grad = g
        self._pending, self._accumulated = [], 0


def broadcast_from_first(params: list[torch.Tensor]) -> None:
    """Rank 0's values of `params` on every rank."""
    if dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for group in _flat_groups(params):
            flat = _flatten_dense_tensors(group)
            dist.broadcast(flat, src=0)
            torch._foreach_copy_(group, _unflatten_dense_tensors(flat, group))
