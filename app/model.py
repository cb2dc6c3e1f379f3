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
from app.heads import HEADS, BatchedMLP

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
        # all towers in one batched MLP: tower t is slice t of each weight, in config order
        self.towers = BatchedMLP(len(tasks), [self.head.out_dim, *cfg.tower_layers, 1], cfg.activation,
                                 cfg.dropout, last_activation=False).to(device)
        self.autocast = cfg.precision == "bf16"
        self.device_type = torch.device(device).type  # a str, not read off a traced tensor

    def forward(self, dense: torch.Tensor, features: KeyedJaggedTensor):
        x = torch.cat([self.sparse(features), dense], dim=1)
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
            h, gates = self.head(x)  # [B, T, H]
            logits = self.towers(h.transpose(0, 1)).squeeze(2).T  # [T, B, 1] -> [B, T]
        return logits.float(), gates if gates is None else gates.float()


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
