"""Dense heads: shared input [B, in] -> per-task representations [B, T, out] (+ gate weights).

Shapes: B rows, E experts, T tasks. Batched MLPs run all experts (or towers) as one
matmul per layer instead of a Python loop over modules.

Every head also names its `shared_weight`: the weight of the last layer all tasks share,
where GradNorm measures each task's gradient norm (app/model.py).
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
    """E expert MLPs on the same input. [B, in] -> [E, B, out].

    The first layer of all experts is one [B, in'] x [in', E*H] matmul (no [E, B, in] copy of
    the input, in the forward or in its gradient), with the input zero-padded to in' = a
    multiple of 8 columns so that tensor-core kernels apply (26*128 + 13 = 3341 is not).
    """

    def __init__(self, num_experts: int, sizes: list[int], activation: str, dropout: float):
        self.pad = -sizes[0] % 8
        super().__init__(num_experts, [sizes[0] + self.pad, *sizes[1:]], activation, dropout)
        with torch.no_grad():
            self.weights[0][:, sizes[0]:] = 0  # the padding's rows, never read by a real input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = nn.functional.pad(x, (0, self.pad))
        h = torch.einsum("bi,eih->ebh", x, self.weights[0]) + self.biases[0]
        h = self.dropout(self.act(h))
        for i in range(1, len(self.weights)):  # by index: a slice of a ParameterList builds a new module
            h = self.dropout(self.act(torch.baddbmm(self.biases[i], h, self.weights[i])))
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

    @property
    def shared_weight(self) -> nn.Parameter:
        return self.experts.weights[-1]


class OMoE(MMoE):
    """One-gate mixture of experts (the MMoE paper's baseline): one softmax gate, the same
    mixture for every task.

    [B, in] -> ([B, T, out], gate weights [B, T, E], equal across T).
    """

    def __init__(self, in_dim: int, num_tasks: int, cfg: ModelConfig):
        super().__init__(in_dim, num_tasks, cfg)
        self.gates = nn.Linear(in_dim, cfg.num_experts)

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        return self.gates(x).softmax(dim=-1).unsqueeze(1).expand(-1, self.num_tasks, -1)


class PLE(nn.Module):
    """Progressive layered extraction (Tang et al., RecSys 2020); one level is CGC.

    Each level has `num_task_experts` experts per task and `num_shared_experts` shared ones.
    Task t's gate mixes its own experts and the shared ones; below the last level a shared
    gate mixes all experts into the shared experts' input for the next level. Task t's
    experts and gate read task t's output of the level below. Every level's experts are
    MLPs of `expert_layers`.

    [B, in] -> ([B, T, out], last level's gate weights [B, T, num_task_experts +
    num_shared_experts]: per task its own experts first, then the shared ones).
    """

    def __init__(self, in_dim: int, num_tasks: int, cfg: ModelConfig, num_levels: int | None = None):
        super().__init__()
        self.num_tasks, self.mt, self.ms = num_tasks, cfg.num_task_experts, cfg.num_shared_experts
        self.num_levels = cfg.num_levels if num_levels is None else num_levels
        self.out_dim = cfg.expert_layers[-1]
        t, mt, ms = num_tasks, self.mt, self.ms
        self.task_experts = nn.ModuleList()  # level k: T * mt MLPs, task t's are rows t*mt..(t+1)*mt-1
        self.shared_experts = nn.ModuleList()
        self.task_gates = nn.ModuleList()  # one linear gate per task, batched: [T, B, mt + ms]
        self.shared_gates = nn.ModuleList()  # all levels but the last: [B, T * mt + ms]
        dim = in_dim
        for level in range(self.num_levels):
            sizes = [dim, *cfg.expert_layers]
            # level 1's task experts all read x: one Experts module, as the shared ones
            experts = Experts if level == 0 else BatchedMLP
            self.task_experts.append(experts(t * mt, sizes, cfg.activation, cfg.dropout))
            self.shared_experts.append(Experts(ms, sizes, cfg.activation, cfg.dropout))
            self.task_gates.append(BatchedMLP(t, [dim, mt + ms], cfg.activation, 0.0, last_activation=False))
            if level < self.num_levels - 1:
                self.shared_gates.append(nn.Linear(dim, t * mt + ms))
            dim = self.out_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t, mt = self.num_tasks, self.mt
        xt = x.unsqueeze(0).expand(t, -1, -1)  # [T, B, in]: every task's input, the same at level 1
        xs = x  # [B, in]: the shared experts' input
        for level in range(self.num_levels):
            # above level 1, task t's input repeated for each of its mt experts: [T * mt, B, in]
            own = self.task_experts[level](x if level == 0 else xt.repeat_interleave(mt, dim=0))  # [T * mt, B, H]
            shared = self.shared_experts[level](xs)  # [ms, B, H]
            own4 = own.unflatten(0, (t, mt))  # [T, mt, B, H]
            seen = torch.cat([own4, shared.unsqueeze(0).expand(t, -1, -1, -1)], dim=1)  # [T, mt + ms, B, H]
            gates = self.task_gates[level](xt).softmax(dim=-1)  # [T, B, mt + ms]
            out = torch.einsum("tbe,tebh->tbh", gates, seen)  # [T, B, H]
            if level < self.num_levels - 1:
                g = self.shared_gates[level](xs).softmax(dim=-1)  # [B, T * mt + ms]
                xs = torch.einsum("be,ebh->bh", g, torch.cat([own, shared], dim=0))
            xt = out
        return xt.transpose(0, 1), gates.transpose(0, 1)

    @property
    def shared_weight(self) -> nn.Parameter:
        return self.shared_experts[-1].weights[-1]


class CGC(PLE):
    """Customized gate control: PLE's single extraction level (`num_levels` is not read)."""

    def __init__(self, in_dim: int, num_tasks: int, cfg: ModelConfig):
        super().__init__(in_dim, num_tasks, cfg, num_levels=1)


class SharedBottom(nn.Module):
    """One MLP shared by all tasks. [B, in] -> ([B, T, out], None: no gates)."""

    def __init__(self, in_dim: int, num_tasks: int, cfg: ModelConfig):
        super().__init__()
        self.num_tasks = num_tasks
        self.bottom = mlp([in_dim, *cfg.expert_layers], cfg.activation, cfg.dropout)
        self.out_dim = cfg.expert_layers[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.bottom(x).unsqueeze(1).expand(-1, self.num_tasks, -1), None

    @property
    def shared_weight(self) -> nn.Parameter:
        return [m for m in self.bottom if isinstance(m, nn.Linear)][-1].weight


HEADS = {"mmoe": MMoE, "omoe": OMoE, "shared_bottom": SharedBottom, "cgc": CGC, "ple": PLE}
