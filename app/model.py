"""The multi-task model: sparse arch (EmbeddingBagCollection) -> dense input -> head -> towers.

Shapes: B rows, F categorical features of dim d, D dense features, E experts, T tasks.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from app.config import ModelConfig, TaskConfig
from app.data import Batch, Columns

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class Outputs(NamedTuple):
    """What a step returns besides the loss; all detached, still on the device."""

    losses: torch.Tensor  # [T] per-task mean loss
    preds: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T]
    weights: torch.Tensor  # [B]
    gates: torch.Tensor | None  # [T, E + 1] (mean gate weights, entropy) for gated heads
    row_ids: torch.Tensor  # [B] the rows' indices in their split


def table_name(feature: str) -> str:
    return f"t_{feature}"


class SparseArch(nn.Module):
    """One embedding table per categorical column; KJT -> {feature: [B, d]} by key.

    The collection is built on `meta`: DistributedModelParallel materializes only the shards
    each rank owns. Lookups go by key because a sharded collection returns plan order.
    """

    def __init__(self, columns: Columns, dim: int, device: torch.device | str = "meta"):
        super().__init__()
        self.features = list(columns.categorical)
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name=table_name(f), embedding_dim=dim, num_embeddings=n,
                                   feature_names=[f], pooling=PoolingType.SUM)
                for f, n in zip(columns.categorical, columns.cardinality)
            ],
            device=torch.device(device),
        )

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.ebc(features).to_dict()
        return torch.cat([pooled[f] for f in self.features], dim=1)  # [B, F*d]


def mlp(sizes: list[int], activation: str, dropout: float) -> nn.Sequential:
    """Linear -> activation -> dropout for each consecutive pair of sizes."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
        if dropout:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class Experts(nn.Module):
    """E expert MLPs evaluated together: one batched matmul per layer. [B, in] -> [E, B, out]."""

    def __init__(self, num_experts: int, sizes: list[int], activation: str, dropout: float):
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(sizes[:-1], sizes[1:]):
            w = torch.empty(num_experts, a, b)
            for e in range(num_experts):  # the same init as nn.Linear, one expert at a time
                nn.init.kaiming_uniform_(w[e].T, a=5 ** 0.5)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.empty(num_experts, 1, b).uniform_(-a ** -0.5, a ** -0.5)))
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(0).expand(self.weights[0].shape[0], -1, -1)  # [E, B, in]
        for w, b in zip(self.weights, self.biases):
            h = self.dropout(self.act(torch.baddbmm(b, h, w)))
        return h


class MMoE(nn.Module):
    """Multi-gate mixture of experts: one softmax gate per task.

    [B, in] -> ([B, T, out], gate weights [B, T, E]).
    """

    def __init__(self, in_dim: int, num_tasks: int, cfg: ModelConfig):
        super().__init__()
        self.num_tasks, self.num_experts = num_tasks, cfg.num_experts
        self.experts = Experts(cfg.num_experts, [in_dim, *cfg.expert_layers], cfg.activation, cfg.dropout)
        self.gates = nn.Linear(in_dim, num_tasks * cfg.num_experts)  # all tasks' gates in one matmul
        self.out_dim = cfg.expert_layers[-1]

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, E], each row sums to 1."""
        return self.gates(x).view(-1, self.num_tasks, self.num_experts).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gates = self.gate_weights(x)
        return torch.einsum("bte,ebh->bth", gates, self.experts(x)), gates


class SharedBottom(nn.Module):
    """One MLP shared by all tasks. [B, in] -> ([B, T, out], None: no gates)."""

    def __init__(self, in_dim: int, num_tasks: int, cfg: ModelConfig):
        super().__init__()
        self.num_tasks = num_tasks
        self.bottom = mlp([in_dim, *cfg.expert_layers], cfg.activation, cfg.dropout)
        self.out_dim = cfg.expert_layers[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.bottom(x).unsqueeze(1).expand(-1, self.num_tasks, -1), None


HEADS = {"mmoe": MMoE, "shared_bottom": SharedBottom}


class MultiTaskModel(nn.Module):
    """(dense [B, D], KJT) -> (logits [B, T], gate weights [B, T, E] or None).

    One tower per task, in config order.
    """

    def __init__(self, columns: Columns, tasks: dict[str, TaskConfig], cfg: ModelConfig,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.task_names = list(tasks)
        self.sparse = SparseArch(columns, cfg.embedding_dim)
        in_dim = len(columns.categorical) * cfg.embedding_dim + len(columns.dense)
        self.head = HEADS[cfg.head](in_dim, len(tasks), cfg).to(device)
        self.towers = nn.ModuleDict({
            name: nn.Sequential(mlp([self.head.out_dim, *cfg.tower_layers], cfg.activation, cfg.dropout),
                                nn.Linear(([self.head.out_dim, *cfg.tower_layers])[-1], 1))
            for name in tasks
        }).to(device)

    def forward(self, dense: torch.Tensor, features: KeyedJaggedTensor) -> torch.Tensor:
        x = torch.cat([self.sparse(features), dense], dim=1)
        h, gates = self.head(x)  # [B, T, H]
        logits = torch.cat([tower(h[:, t]) for t, tower in enumerate(self.towers.values())], dim=1)
        return logits, gates


class MultiTaskTrain(nn.Module):
    """Batch -> (weighted loss sum, Outputs).

    Predictions are probabilities for binary tasks and raw values for regression tasks.
    Rows of weight 0 (skipped as bad input) add nothing to any loss.
    """

    def __init__(self, model: MultiTaskModel, tasks: dict[str, TaskConfig]):
        super().__init__()
        self.model = model
        device = next(model.head.parameters()).device
        self.register_buffer("loss_weights", torch.tensor([t.weight for t in tasks.values()],
                                                          device=device), persistent=False)
        self.register_buffer("binary", torch.tensor([t.type == "binary" for t in tasks.values()],
                                                    device=device), persistent=False)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, Outputs]:
        logits, gates = self.model(batch.dense, batch.sparse_features)
        logits = logits.float()
        bce = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
        mse = (logits - batch.labels) ** 2
        per_row = torch.where(self.binary, bce, mse)  # [B, T]
        w = batch.weights.unsqueeze(1)
        losses = (per_row * w).sum(0) / w.sum().clamp(min=1.0)  # [T]
        preds = torch.where(self.binary, logits.sigmoid(), logits)
        loss = (losses * self.loss_weights).sum()
        return loss, Outputs(losses.detach(), preds.detach(), batch.labels, batch.weights,
                             _gate_stats(gates.detach(), w) if gates is not None else None,
                             batch.row_ids)


def _gate_stats(gates: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[T, E + 1]: each expert's mean gate weight per task, then the mean gate entropy."""
    w = w.unsqueeze(2) / w.sum().clamp(min=1.0)  # [B, 1, 1]
    entropy = -(gates * gates.clamp(min=1e-12).log()).sum(-1, keepdim=True)  # [B, T, 1]
    return (torch.cat([gates, entropy], dim=2) * w).sum(0)
