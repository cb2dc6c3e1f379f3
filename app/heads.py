"""Dense heads: shared input [B, in] -> per-task representations [B, T, out] (+ gate weights).

Shapes: B rows, E experts, T tasks. Batched MLPs run all experts (or towers) as one
matmul per layer instead of a Python loop over modules.
"""
from __future__ import annotations

import torch
from torch import nn

from app.config import ModelConfig

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def mlp(sizes: list[int], activation: str, dropout: float) -> nn.Sequential:
    """Linear -> activation -> dropout for each consecutive pair of sizes."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
        if dropout:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class BatchedMLP(nn.Module):
    """n independent MLPs evaluated together, one batched matmul per layer.

    [n, B, in] -> [n, B, out]. Each MLP is initialized as `mlp` would be (nn.Linear's init).
    """

    def __init__(self, n: int, sizes: list[int], activation: str, dropout: float,
                 last_activation: bool = True):
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(sizes[:-1], sizes[1:]):
            w = torch.empty(n, a, b)
            for i in range(n):
                nn.init.kaiming_uniform_(w[i].T, a=5 ** 0.5)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.empty(n, 1, b).uniform_(-a ** -0.5, a ** -0.5)))
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.last_activation = last_activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < last or self.last_activation:
                x = self.dropout(self.act(x))
        return x


class Experts(BatchedMLP):
    """E expert MLPs on the same input. [B, in] -> [E, B, out]."""

    def __init__(self, num_experts: int, sizes: list[int], activation: str, dropout: float):
        super().__init__(num_experts, sizes, activation, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.unsqueeze(0).expand(self.weights[0].shape[0], -1, -1))


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
