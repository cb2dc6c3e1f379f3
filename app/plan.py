"""Embedding sharding plans: the one place that builds TorchRec's planner.

Training (collectively, on its process group) and the dry-run command (alone, no GPU)
both call `make_planner`, so a reviewed dry-run plan is the plan training would make.
"""
from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ModuleSharder, ShardingPlan

from app.config import PlanConfig


def sharders() -> list[ModuleSharder[nn.Module]]:
    return [EmbeddingBagCollectionSharder()]


def constraints(cfg: PlanConfig, tables: list[str]) -> dict[str, ParameterConstraints]:
    """The config's allowed sharding types and kernels, applied to every table."""
    if not cfg.sharding_types and not cfg.compute_kernels:
        return {}
    return {
        t: ParameterConstraints(sharding_types=cfg.sharding_types or None,
                                compute_kernels=cfg.compute_kernels or None)
        for t in tables
    }


def make_planner(cfg: PlanConfig, tables: list[str], world_size: int, compute_device: str,
                 batch_size: int, local_world_size: int | None = None,
                 hbm_cap: int | None = None, ddr_cap: int | None = None) -> EmbeddingShardingPlanner:
    topology = Topology(world_size=world_size, compute_device=compute_device,
                        local_world_size=local_world_size, hbm_cap=hbm_cap, ddr_cap=ddr_cap)
    return EmbeddingShardingPlanner(topology=topology, batch_size=batch_size,
                                    constraints=constraints(cfg, tables))


def training_plan(cfg: PlanConfig, model: nn.Module, tables: list[str], world_size: int,
                  compute_device: str, batch_size: int, local_world_size: int) -> ShardingPlan:
    """The plan training applies: planned collectively on the default process group."""
    planner = make_planner(cfg, tables, world_size, compute_device, batch_size,
                           local_world_size=local_world_size)
    return planner.collective_plan(model, sharders(), dist.GroupMember.WORLD)
