"""The multi-task model: sparse arch (EmbeddingBagCollection) -> dense input -> head -> towers.

Shapes: B rows, F categorical features of dim d, D dense features, E experts, T tasks.

Two multi-task extras live here. ESMM-style chains (`tasks.<t>.multiply_by`): the task's
probability is its tower's probability times another task's, so e.g. a conversion tower is
trained on all impressions through p(click and convert) = p(click) p(convert | click).
Loss balancing (`model.loss_balancing`): how the per-task losses become the one scalar the
pipeline calls `backward()` on; see `LossBalancer`.
"""
from __future__ import annotations

from typing import NamedTuple

import math

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from app.config import ModelConfig, TaskConfig
from app.data.batch import Batch
from app.data.schema import Columns
from app.heads import HEADS, BatchedMLP

class Outputs(NamedTuple):
    """What a step returns besides the loss; all detached, still on the device."""

    losses: torch.Tensor  # [T] per-task mean loss, unweighted
    preds: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T]
    weights: torch.Tensor  # [B]
    gates: torch.Tensor | None  # [T, E + 1] (mean gate weights, entropy) for gated heads
    row_ids: torch.Tensor  # [B] the rows' indices in their split


TABLE_DTYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16}  # model.embedding_dtype


def table_name(feature: str) -> str:
    return f"t_{feature}"


class SparseArch(nn.Module):
    """One embedding table per categorical column: KJT -> pooled KeyedTensor (plan order).

    The collection is built on `meta`: DistributedModelParallel materializes only the shards
    each rank owns.
    """

    def __init__(self, columns: Columns, dim: int, device: torch.device | str = "meta", dtype: str = "fp32"):
        super().__init__()
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name=table_name(f), embedding_dim=dim, num_embeddings=n,
                                   feature_names=[f], pooling=PoolingType.SUM, data_type=TABLE_DTYPES[dtype])
                for f, n in zip(columns.categorical, columns.cardinality)
            ],
            device=torch.device(device),
        )

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.ebc(features)


class DenseInput(nn.Module):
    """(pooled KeyedTensor, dense [B, D]) -> the head's input [B, F*d + D], features in column order.

    A sharded collection returns plan order, so features are looked up by key; where the plan
    kept the columns' order (one GPU, most plans) the pooled values are used whole, which saves
    a copy per feature. No sharded module inside: TorchRec's pipeline does not trace into it,
    so it can compare the keys of the real tensor.
    """

    def __init__(self, features: list[str]):
        super().__init__()
        self.features = features

    def forward(self, pooled: KeyedTensor, dense: torch.Tensor) -> torch.Tensor:
        if pooled.keys() == self.features:
            return torch.cat([pooled.values(), dense], dim=1)
        by_key = pooled.to_dict()
        return torch.cat([by_key[f] for f in self.features] + [dense], dim=1)


def chain_order(tasks: dict[str, TaskConfig]) -> list[tuple[int, int]]:
    """(task index, multiply_by index) for chained tasks, each after the task it multiplies by.

    The config is validated (no cycles), so following multiply_by always ends.
    """
    names = list(tasks)

    def depth(name: str) -> int:
        return 0 if not tasks[name].multiply_by else 1 + depth(tasks[name].multiply_by)

    chained = sorted((n for n in names if tasks[n].multiply_by), key=depth)
    return [(names.index(n), names.index(tasks[n].multiply_by)) for n in chained]


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0, accurate on both sides of -log 2 (Maechler 2012).

    Each branch gets an input clamped to its own side, so the branch torch.where drops has
    finite gradients (an inf there would turn the kept gradient into nan).
    """
    ln2 = math.log(2.0)
    near = torch.log(-torch.expm1(a.clamp(min=-ln2)))
    far = torch.log1p(-torch.exp(a.clamp(max=-ln2)))
    return torch.where(a > -ln2, near, far)


def apply_chains(logits: torch.Tensor, chains: list[tuple[int, int]], num_tasks: int) -> torch.Tensor:
    """[B, T] tower logits -> [B, T] logits whose sigmoid is the chained probability.

    For (t, by) in `chains` (parents first): p_t = sigmoid(z_t) * p_by, computed in log space,
    returned as the logit log p - log(1 - p) so that BCE-with-logits and sigmoid stay exact.
    """
    if not chains:
        return logits
    logsig = nn.functional.logsigmoid(logits)
    # columns by index: a traced tensor (torch.fx) cannot be iterated or unbound into a list
    logp = [logsig[:, t] for t in range(num_tasks)]
    out = [logits[:, t] for t in range(num_tasks)]
    for t, by in chains:
        logp[t] = (logp[t] + logp[by]).clamp(max=-1e-7)  # p < 1: keeps the logit finite
        out[t] = logp[t] - _log1mexp(logp[t])
    return torch.stack(out, dim=1)


class MultiTaskModel(nn.Module):
    """(dense [B, D], KJT) -> (logits [B, T], gate weights [B, T, E] or None).

    One tower per task, in config order. A chained task's logit is that of its product
    probability (`apply_chains`).
    """

    def __init__(self, columns: Columns, tasks: dict[str, TaskConfig], cfg: ModelConfig,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.task_names = list(tasks)
        self.cfg = cfg  # MultiTaskTrain reads the loss balancing from it
        self.chains = chain_order(tasks)
        self.sparse = SparseArch(columns, cfg.embedding_dim, dtype=cfg.embedding_dtype)
        self.inputs = DenseInput(list(columns.categorical))
        in_dim = len(columns.categorical) * cfg.embedding_dim + len(columns.dense)
        self.head = HEADS[cfg.head](in_dim, len(tasks), cfg).to(device)
        # all towers in one batched MLP: tower t is slice t of each weight, in config order
        self.towers = BatchedMLP(len(tasks), [self.head.out_dim, *cfg.tower_layers, 1], cfg.activation,
                                 cfg.dropout, last_activation=False).to(device)
        self.device_type = torch.device(device).type  # a str, not read off a traced tensor
        self.autocast = cfg.precision == "bf16"

    def forward(self, dense: torch.Tensor, features: KeyedJaggedTensor):
        return self.dense_forward(self.inputs(self.sparse(features), dense))

    def dense_forward(self, x: torch.Tensor):
        """The head's input [B, F*d + D] -> (logits, gates): all but the embedding lookup."""
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
            h, gates = self.head(x)  # [B, T, H]
            logits = self.towers(h.transpose(0, 1)).squeeze(2).T  # [T, B, 1] -> [B, T]
        return apply_chains(logits.float(), self.chains, len(self.task_names)), gates if gates is None else gates.float()


class LossBalancer(nn.Module):
    """Per-task mean losses [T] -> the scalar the trainer differentiates.

    fixed: sum_t w_t L_t, w_t = tasks.<t>.weight.
    uncertainty (Kendall et al. 2018): sum_t w_t (c_t exp(-s_t) L_t + s_t / 2), s_t = log
        sigma_t^2 learned from 0; c_t = 1/2 for regression (Gaussian likelihood), 1 for
        binary. At the optimum c_t exp(-s_t) = 1 / (2 L_t): a noisier task weighs less.
    gradnorm (Chen et al. 2018): learned weights w (from tasks.<t>.weight, scaled to sum to T)
        and loss sum_t w_t.detach() L_t + L_grad, with L_grad = sum_t |G_t - mean(G) r_t^alpha|,
        G_t = w_t ||d L_t / d W|| at the last shared layer's weight W, r_t the task's loss
        ratio L_t / L_t(first step) over the mean ratio. The network learns from the first term
        only (w detached); w learns from L_grad only (the norms and the target are detached, as
        in the paper, so no second-order term reaches the network: the per-task gradients need
        retain_graph but not create_graph). Before each training step w is renormalized to sum to
        T, in place: the optimizer steps it after the previous backward.
    """

    def __init__(self, mode: str, weights: list[float], binary: list[bool], alpha: float,
                 device: torch.device | str):
        super().__init__()
        self.mode, self.alpha, self.num_tasks = mode, alpha, len(weights)
        w = torch.tensor(weights, dtype=torch.float32, device=device)
        self.register_buffer("fixed", w, persistent=False)
        if mode == "uncertainty":
            self.log_var = nn.Parameter(torch.zeros(len(weights), device=device))
            self.register_buffer("scale", torch.tensor([1.0 if b else 0.5 for b in binary], device=device),
                                 persistent=False)
        elif mode == "gradnorm":
            self.task_weights = nn.Parameter(w * len(weights) / w.sum())
            # first step's losses, the reference of each task's training rate (kept in checkpoints)
            self.register_buffer("initial", torch.zeros(len(weights), device=device))

    def weights(self) -> torch.Tensor:
        """[T] the current multiplier of each task's loss (detached)."""
        if self.mode == "uncertainty":
            return (self.fixed * self.scale * torch.exp(-self.log_var)).detach()
        if self.mode == "gradnorm":
            w = self.task_weights.detach().clamp(min=1e-6)
            return w * self.num_tasks / w.sum()
        return self.fixed

    def forward(self, losses: torch.Tensor, shared_weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode == "uncertainty":
            return (self.fixed * (self.scale * torch.exp(-self.log_var) * losses + 0.5 * self.log_var)).sum()
        if self.mode != "gradnorm":
            return (self.fixed * losses).sum()
        if not self.training:
            return (self.task_weights.detach() * losses).sum()
        with torch.no_grad():  # the sum to T; positive, however far the last step went
            self.task_weights.clamp_(min=1e-6)
            self.task_weights.mul_(self.num_tasks / self.task_weights.sum())
        norms = torch.stack([  # ||d L_t / d W||, one backward pass to W per task
            torch.linalg.vector_norm(torch.autograd.grad(losses[t], shared_weight, retain_graph=True,
                                                         materialize_grads=True)[0])
            for t in range(self.num_tasks)])
        g = self.task_weights * norms.detach()  # [T] G_t, differentiable in w only
        with torch.no_grad():
            self.initial.copy_(torch.where(self.initial > 0, self.initial, losses))
            ratio = losses / self.initial.clamp(min=1e-12)
            target = g.mean() * (ratio / ratio.mean()) ** self.alpha
        return (self.task_weights.detach() * losses).sum() + (g - target).abs().sum()


class TaskLosses(nn.Module):
    """(logits [B, T], labels [B, T], row weights [B], gates) -> (per-task mean losses [T],
    predictions [B, T], gate statistics [T, E + 1] or None).

    Predictions are probabilities for binary tasks and raw values for regression tasks. Rows of
    weight 0 (skipped as bad input) add nothing to any loss.
    """

    def __init__(self, binary: list[bool], gate_stats: bool):
        super().__init__()
        self.register_buffer("binary", torch.tensor(binary), persistent=False)
        # the loss kinds present (each step launches only their kernels)
        self.kinds = "binary" if all(binary) else "regression" if not any(binary) else "mixed"
        self.gate_stats = gate_stats

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                gates: torch.Tensor | None):
        if self.kinds == "binary":
            per_row = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
            preds = logits.sigmoid()
        elif self.kinds == "regression":
            per_row, preds = (logits - labels) ** 2, logits
        else:
            bce = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
            per_row = torch.where(self.binary, bce, (logits - labels) ** 2)  # [B, T]
            preds = torch.where(self.binary, logits.sigmoid(), logits)
        w = weights.unsqueeze(1)
        losses = (per_row * w).sum(0) / w.sum().clamp(min=1.0)  # [T]
        stats = _gate_stats(gates.detach(), w) if gates is not None and self.gate_stats else None
        return losses, preds.detach(), stats


class MultiTaskTrain(nn.Module):
    """Batch -> (balanced loss, Outputs).

    The per-task losses (`TaskLosses`) become one scalar through `LossBalancer`
    (`model.loss_balancing`). Everything after the embedding lookup, from the head to that
    scalar, is one `DenseStep`: what `model.compile` compiles.
    """

    def __init__(self, model: MultiTaskModel, tasks: dict[str, TaskConfig], gate_stats: bool = True):
        super().__init__()
        self.model = model
        device = next(model.head.parameters()).device
        binary = [t.type == "binary" for t in tasks.values()]
        self.task_losses = TaskLosses(binary, gate_stats).to(device)
        self.balancer = LossBalancer(model.cfg.loss_balancing, [t.weight for t in tasks.values()], binary,
                                     model.cfg.gradnorm_alpha, device)
        self.gradnorm = model.cfg.loss_balancing == "gradnorm"
        self.compile_mode = compile_mode(model.cfg, model.device_type)
        self.step = DenseStep(self.dense_step, self.compile_mode)

    def dense_step(self, x: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor):
        """Head input -> (loss, per-task losses, predictions, gate statistics)."""
        logits, gates = self.model.dense_forward(x)
        losses, preds, stats = self.task_losses(logits, labels, weights, gates)
        loss = self.balancer(losses, self.model.head.shared_weight if self.gradnorm else None)
        return loss, losses.detach(), preds, stats

    def forward(self, batch: Batch) -> tuple[torch.Tensor, Outputs]:
        x = self.model.inputs(self.model.sparse(batch.sparse_features), batch.dense)
        loss, losses, preds, stats = self.step(x, batch.labels, batch.weights)
        return loss, Outputs(losses, preds, batch.labels, batch.weights, stats, batch.row_ids)


class DenseStep(nn.Module):
    """Calls `fn`, compiled as `model.compile` says: one graph (with CUDA graphs, one replay
    forward and one backward) from the head's input to the loss. A module without parameters
    or children, so that TorchRec's pipeline takes it as a leaf and does not trace into it;
    the parameters stay where they are, under their names."""

    def __init__(self, fn, mode: str):
        super().__init__()
        self.fn = fn if mode == "off" else torch.compile(
            fn, mode=None if mode == "default" else mode, dynamic=False)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor):
        return self.fn(x, labels, weights)


def _gate_stats(gates: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[T, E + 1]: each expert's mean gate weight per task, then the mean gate entropy."""
    w = w.unsqueeze(2) / w.sum().clamp(min=1.0)  # [B, 1, 1]
    entropy = -(gates * gates.clamp(min=1e-12).log()).sum(-1, keepdim=True)  # [B, T, 1]
    return (torch.cat([gates, entropy], dim=2) * w).sum(0)


def compile_mode(cfg: ModelConfig, device_type: str) -> str:
    """`model.compile` with "auto" resolved: CUDA graphs on a GPU, where a step is bound by
    host work (1.18M -> 1.48M samples/s from Parquet on one H100, Criteo shape, bf16); nothing on CPU,
    where compiling takes longer than most runs gain. GradNorm's second backward pass through
    the shared layer is not replayable, so it stays eager. "default": fused kernels, no CUDA
    graphs. Shapes are static: a training run sees two batch sizes (full batches and one
    tail), each compiled once."""
    if cfg.compile != "auto":
        return cfg.compile
    return "reduce-overhead" if device_type == "cuda" and cfg.loss_balancing != "gradnorm" else "off"
