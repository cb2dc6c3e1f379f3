"""Embedding sharding plans: the one place that builds TorchRec's planner.

Training (collectively, on its process group) and the dry-run command (`app.dry_run`, alone,
no GPU) both call `make_planner`, so a reviewed dry-run plan is the plan training would make.
A plan file (`app.plan_file`) makes that exact: training checks it against the run and applies
it instead of planning.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.proposers import GreedyProposer, UniformProposer
from torchrec.distributed.planner.types import ParameterConstraints, Stats, StorageReservation
from torchrec.distributed.types import CacheParams, ModuleSharder, ShardingType

from app.config import ConfigError, PlanConfig
from app.model import table_name
from app.plan_file import COMPUTE_KERNELS, SHARDING_TYPES, RunPlan, check_plan, load_plan, table_shapes

try:  # torchrec 1.8 deprecates the heuristic reservation; keep the fallback for old releases
    from torchrec.distributed.planner.storage_reservations import (
        FixedPercentageStorageReservation as StorageReservationPolicy,
    )
except ImportError:  # pragma: no cover
    from torchrec.distributed.planner.storage_reservations import (
        HeuristicalStorageReservation as StorageReservationPolicy,
    )

# Above this many ranks the search is smaller, so that planning 1024 ranks takes seconds, not
# minutes: (1) row_wise and data_parallel are left out unless plan.sharding_types or
# plan.tables.<column>.sharding_types lists them: their options hold a shard on every rank,
# so estimating and partitioning them grows with the world size, and at that scale
# table_row_wise (row-wise inside a host, table-wise across hosts) beats them for all but
# tiny tables; (2) two proposers instead of four: the greedy one that searches by depth and
# the uniform one (the grid search is skipped at this size anyway, and the other greedy
# one found no better plan for the Criteo shapes at 256 and 1024 ranks).
FULL_SEARCH_MAX_RANKS = 128
LARGE_WORLD_SHARDING_TYPES = [ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value,
                              ShardingType.TABLE_COLUMN_WISE.value, ShardingType.TABLE_ROW_WISE.value]


def sharders() -> list[ModuleSharder[nn.Module]]:
    return [EmbeddingBagCollectionSharder()]


def _check_names(values: list[str], allowed: list[str], key: str) -> None:
    for v in values:
        if v not in allowed:
            raise ConfigError(f"{key}: {v!r} is not one of {', '.join(allowed)}")


def _check_choices(key: str, types: list[str], kernels: list[str], device: str) -> None:
    """Fails early (not inside the planner, on rank 0 only) when nothing allowed runs on `device`."""
    sharder = sharders()[0]
    usable = [t for t in types or sharder.sharding_types(device) if t in sharder.sharding_types(device)]
    if not any(not kernels or set(kernels) & set(sharder.compute_kernels(t, device)) for t in usable):
        choices = "; ".join(f"{t}: {', '.join(sharder.compute_kernels(t, device))}"
                            for t in sharder.sharding_types(device))
        raise ConfigError(f"{key}: no allowed sharding type and compute kernel runs on {device} "
                          f"(sharding types {types or 'any'}, kernels {kernels or 'any'}); "
                          f"on {device} the choices are {choices}")


def constraints(cfg: PlanConfig, tables: list[str], world_size: int,
                compute_device: str = "cuda") -> dict[str, ParameterConstraints]:
    """Per-table planner constraints: plan.tables.<column> over the global lists over defaults."""
    _check_names(cfg.sharding_types, SHARDING_TYPES, "plan.sharding_types")
    _check_names(cfg.compute_kernels, COMPUTE_KERNELS, "plan.compute_kernels")
    by_table = {table_name(column): (column, t) for column, t in cfg.tables.items()}
    for column, t in cfg.tables.items():
        key = f"plan.tables.{column}"
        if table_name(column) not in tables:
            known = ", ".join(sorted(c for c in cfg.tables if table_name(c) in tables)) or "none"
            raise ConfigError(f"{key}: this run has no categorical column {column!r} "
                              f"(its tables: {', '.join(tables)}; configured and present: {known})")
        _check_names(t.sharding_types, SHARDING_TYPES, f"{key}.sharding_types")
        _check_names(t.compute_kernels, COMPUTE_KERNELS, f"{key}.compute_kernels")
        if t.pooling_factor < 0:
            raise ConfigError(f"{key}.pooling_factor is {t.pooling_factor}; use a mean number of ids "
                              "per row (> 0), or 0 for the planner's default of 1")
        if not 0 <= t.cache_load_factor <= 1:
            raise ConfigError(f"{key}.cache_load_factor is {t.cache_load_factor}; use a share of rows "
                              "in (0, 1], or 0 for the kernel's default")
    # data_parallel only when asked for: replicated tables leave the fused optimizer, so their
    # optimizer state would not load into a plan that shards them (resume on another plan)
    default_types = cfg.sharding_types or (
        LARGE_WORLD_SHARDING_TYPES if world_size > FULL_SEARCH_MAX_RANKS else
        [t for t in sharders()[0].sharding_types(compute_device) if t != ShardingType.DATA_PARALLEL.value])
    out = {}
    for table in tables:
        column, t = by_table.get(table, (None, None))
        types = (t and t.sharding_types) or default_types
        kernels = (t and t.compute_kernels) or cfg.compute_kernels
        _check_choices(f"plan.tables.{column}" if t else "plan", types, kernels, compute_device)
        out[table] = ParameterConstraints(
            sharding_types=types or None,
            compute_kernels=kernels or None,
            **({"pooling_factors": [t.pooling_factor]} if t and t.pooling_factor else {}),
            **({"cache_params": CacheParams(load_factor=t.cache_load_factor)}
               if t and t.cache_load_factor else {}),
        )
    return out


def storage_reservation(cfg: PlanConfig) -> StorageReservation:
    if not 0 <= cfg.storage_reservation < 1:
        raise ConfigError(f"plan.storage_reservation is {cfg.storage_reservation}; use a share of "
                          "each rank's memory in [0, 1), e.g. 0.15")
    return StorageReservationPolicy(percentage=cfg.storage_reservation)


def host_memory() -> int:
    """Bytes of this machine's memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def make_topology(world_size: int, compute_device: str, local_world_size: int | None = None,
                  hbm_cap: int | None = None, ddr_cap: int | None = None) -> Topology:
    """`hbm_cap`/`ddr_cap` are bytes per rank; None takes TorchRec's defaults."""
    return Topology(world_size=world_size, compute_device=compute_device,
                    local_world_size=local_world_size, hbm_cap=hbm_cap, ddr_cap=ddr_cap)


def make_planner(cfg: PlanConfig, tables: list[str], topology: Topology, batch_size: int,
                 stats: list[Stats] | None = None) -> EmbeddingShardingPlanner:
    """`batch_size` is per rank; `stats` None keeps TorchRec's (verbose) stats log."""
    large = topology.world_size > FULL_SEARCH_MAX_RANKS
    return EmbeddingShardingPlanner(topology=topology, batch_size=batch_size,
                                    proposer=[GreedyProposer(), UniformProposer()] if large else None,
                                    storage_reservation=storage_reservation(cfg),
                                    constraints=constraints(cfg, tables, topology.world_size,
                                                            topology.compute_device),
                                    stats=stats)


def training_plan(cfg: PlanConfig, model: nn.Module, tables: list[str], world_size: int,
                  compute_device: str, batch_size: int, local_world_size: int) -> RunPlan:
    """The plan training applies: `plan.file` when set (checked against this run), otherwise
    planned collectively on the default process group."""
    if cfg.file:
        plan = load_plan(cfg.file, local_world_size=local_world_size)
        check_plan(plan, model, world_size, compute_device, where=cfg.file)
        return plan
    hbm = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory \
        if compute_device == "cuda" else None
    # this machine's memory, not TorchRec's defaults (32 GiB of HBM a rank): large tables would
    # be planned into host memory (or not at all) on a GPU that holds them
    topology = make_topology(world_size, compute_device, local_world_size, hbm_cap=hbm,
                             ddr_cap=host_memory() // local_world_size)
    planner = make_planner(cfg, tables, topology, batch_size)
    plan = planner.collective_plan(model, sharders(), dist.GroupMember.WORLD)
    return RunPlan(plan.plan, world_size, local_world_size, compute_device, batch_size,
                   table_shapes(model))
