"""Embedding sharding plans: the one place that builds TorchRec's planner, and plan files.

Training (collectively, on its process group) and the dry-run command (alone, no GPU)
both call `make_planner`, so a reviewed dry-run plan is the plan training would make. A plan
file (`mmoe plan --out plan.json`, applied with `plan.file`) makes that exact: training checks
it against the run and applies it instead of planning.

Plan file (JSON): world_size, local_world_size, compute_device, batch_size_per_rank, and per
module path, per table: rows, dim, sharding_type, compute_kernel, ranks, and (except for
data_parallel, which has a full replica on every rank) its shards as rank, offsets, sizes.
"""
from __future__ import annotations

import json
import logging
import re
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.proposers import GreedyProposer, UniformProposer
from torchrec.distributed.planner.types import (
    ParameterConstraints,
    Perf,
    PlannerError,
    ShardingOption,
    Stats,
    Storage,
    StorageReservation,
)
from torchrec.distributed.planner.utils import placement
from torchrec.distributed.types import (
    CacheParams,
    EmbeddingModuleShardingPlan,
    EnumerableShardingSpec,
    ModuleSharder,
    ParameterSharding,
    ShardingPlan,
    ShardingType,
    ShardMetadata,
)
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from app.config import Config, ConfigError, PlanConfig
from app.data import SCHEMA_FILE, Columns, Schema
from app.model import MultiTaskModel, MultiTaskTrain, table_name

try:  # torchrec 1.8 deprecates the heuristic reservation; keep the fallback for old releases
    from torchrec.distributed.planner.storage_reservations import (
        FixedPercentageStorageReservation as StorageReservationPolicy,
    )
except ImportError:  # pragma: no cover
    from torchrec.distributed.planner.storage_reservations import (
        HeuristicalStorageReservation as StorageReservationPolicy,
    )

SHARDING_TYPES = [t.value for t in ShardingType]
COMPUTE_KERNELS = [k.value for k in EmbeddingComputeKernel]
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
FORMAT_VERSION = 1


class PlanError(ConfigError):
    """A plan that cannot be made, or a plan file that does not fit the run."""


def sharders() -> list[ModuleSharder[nn.Module]]:
    return [EmbeddingBagCollectionSharder()]


# ---------------------------------------------------------------------------------------
# Planner


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


def table_shapes(model: nn.Module) -> dict[str, dict[str, tuple[int, int]]]:
    """Module path -> table -> (rows, dim) of every EmbeddingBagCollection in `model`."""
    return {path: {c.name: (c.num_embeddings, c.embedding_dim) for c in m.embedding_bag_configs()}
            for path, m in model.named_modules() if isinstance(m, EmbeddingBagCollection)}


@dataclass
class RunPlan(ShardingPlan):
    """A ShardingPlan (what DistributedModelParallel applies) plus what it was made for."""

    world_size: int
    local_world_size: int
    compute_device: str
    batch_size: int  # per rank; informs the perf estimate only
    tables: dict[str, dict[str, tuple[int, int]]]  # module path -> table -> (rows, dim)


def training_plan(cfg: PlanConfig, model: nn.Module, tables: list[str], world_size: int,
                  compute_device: str, batch_size: int, local_world_size: int) -> RunPlan:
    """The plan training applies: `plan.file` when set (checked against this run), otherwise
    planned collectively on the default process group."""
    if cfg.file:
        plan = load_plan(cfg.file, local_world_size=local_world_size)
        check_plan(plan, model, world_size, compute_device, where=cfg.file)
        return plan
    topology = make_topology(world_size, compute_device, local_world_size)
    planner = make_planner(cfg, tables, topology, batch_size)
    plan = planner.collective_plan(model, sharders(), dist.GroupMember.WORLD)
    return RunPlan(plan.plan, world_size, local_world_size, compute_device, batch_size,
                   table_shapes(model))


# ---------------------------------------------------------------------------------------
# Plan files


def _shard_rank(shard: ShardMetadata) -> int:
    return shard.placement.rank()


def plan_to_dict(plan: RunPlan) -> dict[str, Any]:
    modules: dict[str, Any] = {}
    for path, module_plan in plan.plan.items():
        shapes = plan.tables.get(path, {})
        out = modules[path] = {}
        for name, ps in module_plan.items():
            if name not in shapes:
                raise PlanError(f"the plan shards {path}.{name}, but its table shapes do not list it")
            rows, dim = shapes[name]
            entry: dict[str, Any] = {"rows": rows, "dim": dim, "sharding_type": ps.sharding_type,
                                     "compute_kernel": ps.compute_kernel, "ranks": list(ps.ranks or [])}
            if ps.sharding_spec is not None:
                entry["shards"] = [{"rank": _shard_rank(s), "offsets": list(s.shard_offsets),
                                    "sizes": list(s.shard_sizes)} for s in ps.sharding_spec.shards]
            if ps.cache_params is not None:
                cp = ps.cache_params
                extra = [f for f in ("algorithm", "precision", "stats", "multipass_prefetch_config")
                         if getattr(cp, f, None) is not None]
                if extra:
                    raise PlanError(f"{path}.{name}: cache_params.{extra[0]} cannot be written to a plan file")
                entry["cache_params"] = {k: v for k in ("load_factor", "reserved_memory", "prefetch_pipeline")
                                         if (v := getattr(cp, k, None)) is not None}
            for field in ("enforce_hbm", "stochastic_rounding", "bounds_check_mode", "output_dtype",
                          "key_value_params"):
                if getattr(ps, field, None) is not None:
                    raise PlanError(f"{path}.{name}: {field} cannot be written to a plan file")
            out[name] = entry
    return {"format": FORMAT_VERSION, "world_size": plan.world_size,
            "local_world_size": plan.local_world_size, "compute_device": plan.compute_device,
            "batch_size_per_rank": plan.batch_size, "modules": modules}


def _format(value: Any, depth: int = 0, in_list: bool = False) -> str:
    """JSON with lists of scalars, and records inside lists (shards), on one line each."""
    scalar = lambda v: not isinstance(v, (dict, list))  # noqa: E731
    record = isinstance(value, dict) and all(scalar(v) or isinstance(v, list) for v in value.values())
    if scalar(value) or isinstance(value, list) and all(map(scalar, value)) or in_list and record:
        return json.dumps(value)
    inner, pad = "  " * (depth + 1), "  " * depth
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {_format(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    return "[\n" + ",\n".join(f"{inner}{_format(v, depth + 1, True)}" for v in value) + f"\n{pad}]"


def save_plan(plan: RunPlan, path: str | Path) -> None:
    """Writes `plan` as JSON that `load_plan` reads back into an equal plan."""
    if not isinstance(plan, RunPlan):
        raise TypeError(f"save_plan needs the RunPlan that training_plan or dry_run returns, "
                        f"got {type(plan).__name__}")
    Path(path).write_text(_format(plan_to_dict(plan)) + "\n")


def _get(doc: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in doc:
        raise PlanError(f"{where}: missing {key!r}")
    if not isinstance(doc[key], kind) or isinstance(doc[key], bool) and kind is int:
        raise PlanError(f"{where}: {key!r} is {doc[key]!r}, expected {getattr(kind, '__name__', kind)}")
    return doc[key]


def _ints(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise PlanError(f"{where}: expected a list of integers, got {value!r}")
    return value


def _table_sharding(entry: dict, compute_device: str, world_size: int, local_world_size: int,
                    where: str) -> tuple[tuple[int, int], ParameterSharding]:
    rows, dim = _get(entry, "rows", int, where), _get(entry, "dim", int, where)
    sharding_type = _get(entry, "sharding_type", str, where)
    kernel = _get(entry, "compute_kernel", str, where)
    if sharding_type not in SHARDING_TYPES:
        raise PlanError(f"{where}: sharding_type {sharding_type!r} is not one of {', '.join(SHARDING_TYPES)}")
    if kernel not in COMPUTE_KERNELS:
        raise PlanError(f"{where}: compute_kernel {kernel!r} is not one of {', '.join(COMPUTE_KERNELS)}")
    ranks = _ints(_get(entry, "ranks", list, where), f"{where}.ranks")
    bad = [r for r in ranks if not 0 <= r < world_size]
    if bad:
        raise PlanError(f"{where}: rank {bad[0]} is outside the plan's {world_size} ranks")
    spec = None
    if sharding_type == ShardingType.DATA_PARALLEL.value:
        if sorted(ranks) != list(range(world_size)):
            raise PlanError(f"{where}: data_parallel puts a replica on every rank; "
                            f"ranks must be 0..{world_size - 1}")
    else:
        shards = []
        for i, s in enumerate(_get(entry, "shards", list, where)):
            at = f"{where}.shards[{i}]"
            if not isinstance(s, dict):
                raise PlanError(f"{at}: expected {{rank, offsets, sizes}}, got {s!r}")
            rank = _get(s, "rank", int, at)
            offsets, sizes = (_ints(_get(s, k, list, at), f"{at}.{k}") for k in ("offsets", "sizes"))
            if len(offsets) != 2 or len(sizes) != 2 or min(*offsets, *sizes) < 0 \
                    or offsets[0] + sizes[0] > rows or offsets[1] + sizes[1] > dim:
                raise PlanError(f"{at}: offsets {offsets} and sizes {sizes} do not lie inside the "
                                f"{rows}x{dim} table")
            shards.append(ShardMetadata(shard_offsets=offsets, shard_sizes=sizes,
                                        placement=placement(compute_device, rank, local_world_size)))
        if [_shard_rank(s) for s in shards] != ranks:
            raise PlanError(f"{where}: ranks {ranks} differ from the shards' ranks "
                            f"{[_shard_rank(s) for s in shards]}")
        covered = sum(s.shard_sizes[0] * s.shard_sizes[1] for s in shards)
        if covered != rows * dim:
            raise PlanError(f"{where}: the shards cover {covered:,} of the table's {rows * dim:,} values")
        spec = EnumerableShardingSpec(shards)
    cache = entry.get("cache_params")
    if cache is not None and not isinstance(cache, dict):
        raise PlanError(f"{where}: cache_params must be a table, got {cache!r}")
    try:
        cache_params = CacheParams(**cache) if cache is not None else None
    except TypeError as e:
        raise PlanError(f"{where}: cache_params: {e}") from e
    return (rows, dim), ParameterSharding(sharding_type=sharding_type, compute_kernel=kernel, ranks=ranks,
                                          sharding_spec=spec, cache_params=cache_params)


def plan_from_dict(doc: dict, where: str, local_world_size: int | None = None) -> RunPlan:
    if not isinstance(doc, dict):
        raise PlanError(f"{where}: expected a JSON object")
    if doc.get("format") != FORMAT_VERSION:
        raise PlanError(f"{where}: format {doc.get('format')!r} is not {FORMAT_VERSION}; "
                        "make the plan again with `mmoe plan ... --out`")
    world_size = _get(doc, "world_size", int, where)
    device = _get(doc, "compute_device", str, where)
    # placements name the device of each rank (cuda:<rank % local world size>), so they follow
    # the launching run's local world size; the sharding itself does not depend on it
    local = local_world_size or _get(doc, "local_world_size", int, where)
    modules: dict[str, EmbeddingModuleShardingPlan] = {}
    shapes: dict[str, dict[str, tuple[int, int]]] = {}
    for path, tables in _get(doc, "modules", dict, where).items():
        if not isinstance(tables, dict):
            raise PlanError(f"{where}: modules.{path} must map table names to their sharding")
        modules[path], shapes[path] = EmbeddingModuleShardingPlan(), {}
        for name, entry in tables.items():
            at = f"{where}: {path}.{name}"
            if not isinstance(entry, dict):
                raise PlanError(f"{at}: expected a table of sharding fields, got {entry!r}")
            shapes[path][name], modules[path][name] = _table_sharding(entry, device, world_size, local, at)
    return RunPlan(modules, world_size, local, device, _get(doc, "batch_size_per_rank", int, where), shapes)


def load_plan(path: str | Path, local_world_size: int | None = None) -> RunPlan:
    """Reads a plan file; `local_world_size` (the run's) sets the shards' device placements."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"plan file {path} does not exist; make one with `mmoe plan --out {path} ...`")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: not valid JSON ({e})") from e
    return plan_from_dict(doc, str(path), local_world_size)


def check_plan(plan: RunPlan, model: nn.Module, world_size: int, compute_device: str, where: str) -> None:
    """Raises PlanError naming every way `plan` does not fit this run and model."""
    problems = []
    if plan.world_size != world_size:
        problems.append(f"it was made for world size {plan.world_size}, this run has {world_size} ranks")
    if plan.compute_device != compute_device:
        problems.append(f"it was made for compute device {plan.compute_device!r}, "
                        f"this run uses {compute_device!r}")
    model_shapes = table_shapes(model)
    for path in sorted(model_shapes.keys() | plan.tables.keys()):
        mine, theirs = model_shapes.get(path, {}), plan.tables.get(path, {})
        for name in sorted(mine.keys() | theirs.keys()):
            if name not in theirs:
                problems.append(f"table {path}.{name} ({mine[name][0]}x{mine[name][1]}) is not in the plan")
            elif name not in mine:
                problems.append(f"the plan shards {path}.{name}, which the model does not have")
            elif mine[name] != theirs[name]:
                problems.append(f"table {path}.{name} is {mine[name][0]}x{mine[name][1]} (rows x dim) in the "
                                f"model but {theirs[name][0]}x{theirs[name][1]} in the plan")
    if problems:
        raise PlanError(f"plan file {where} does not fit this run: " + "; ".join(problems)
                        + f". Make a new plan (`mmoe plan --world-size {world_size} --compute-device "
                        f"{compute_device} --config ... --out {where}`), "
                        "or plan at start-up with --plan.file ''")


# ---------------------------------------------------------------------------------------
# Dry run


class _KeepBestPlan(Stats):
    """Keeps what the planner chose, with each shard's storage and perf estimate."""

    def __init__(self) -> None:
        self.best_plan: list[ShardingOption] = []
        self.num_proposals = self.num_plans = 0
        self.available: Storage | None = None  # per rank, after the storage reservation

    def log(self, best_plan: list[ShardingOption] | None = None, num_proposals: int = 0,
            num_plans: int = 0, storage_reservation: StorageReservation | None = None, **_: Any) -> None:
        # keyword arguments only, some of them absent in older releases
        self.best_plan, self.num_proposals, self.num_plans = best_plan or [], num_proposals, num_plans
        reserved = getattr(storage_reservation, "last_reserved_topology", None)
        self.available = reserved.devices[0].storage if reserved is not None else None


@contextmanager
def _quiet() -> Iterator[None]:
    """The planner warns through the root logger (e.g. once per data-parallel table)."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


@dataclass
class DryRun:
    """A plan made without a process group, with the planner's estimates for the report."""

    plan: RunPlan
    options: list[ShardingOption]  # the chosen option per table, shards carrying rank/storage/perf
    topology: Topology
    available: Storage | None  # per rank after the reservation; None if the policy does not say
    reservation: float
    num_proposals: int
    num_plans: int
    seconds: float


def dry_run(cfg: PlanConfig, model: nn.Module, topology: Topology, batch_size: int) -> DryRun:
    """Plans `model` (built on meta) for `topology`; PlanError says why when nothing fits."""
    shapes = table_shapes(model)
    tables = [t for module in shapes.values() for t in module]
    keep = _KeepBestPlan()
    planner = make_planner(cfg, tables, topology, batch_size, stats=[keep])
    start = time.perf_counter()
    with _quiet():
        try:
            plan = planner.plan(model, sharders())
        except PlannerError as e:
            raise PlanError(_explain_no_fit(cfg, model, tables, topology, batch_size, e)) from None
    seconds = time.perf_counter() - start
    run_plan = RunPlan(plan.plan, topology.world_size, topology.local_world_size,
                       topology.compute_device, batch_size, shapes)
    return DryRun(run_plan, keep.best_plan, topology, keep.available, cfg.storage_reservation,
                  keep.num_proposals, keep.num_plans, seconds)


def _max_shard(option: ShardingOption) -> Storage:
    return Storage(hbm=max(s.storage.hbm for s in option.shards),
                   ddr=max(s.storage.ddr for s in option.shards))


def _explain_no_fit(cfg: PlanConfig, model: nn.Module, tables: list[str], topology: Topology,
                    batch_size: int, error: PlannerError) -> str:
    """Names the tables that fit no rank in any allowed sharding, and by how much."""
    cons = constraints(cfg, tables, topology.world_size, topology.compute_device)
    options = EmbeddingEnumerator(topology=topology, batch_size=batch_size,
                                  constraints=cons).enumerate(model, sharders())
    reserved = storage_reservation(cfg).reserve(topology, batch_size, model, sharders(), cons)
    cap = reserved.devices[0].storage
    tier = "hbm" if topology.compute_device == "cuda" else "ddr"
    shapes = {o.name: tuple(o.tensor.shape) for o in options}
    smallest: dict[str, ShardingOption] = {}
    for o in options:  # per table, the option whose largest shard needs the least memory
        best = smallest.get(o.name)
        if best is None or getattr(_max_shard(o), tier) < getattr(_max_shard(best), tier):
            smallest[o.name] = o
    lines = [str(error).strip().splitlines()[0].strip()]
    what = f"{tier.upper()} after the {cfg.storage_reservation:.0%} reservation"
    culprits = []
    for name, o in sorted(smallest.items(), key=lambda kv: -getattr(_max_shard(kv[1]), tier)):
        need = _max_shard(o)
        if need.fits_in(cap):
            continue
        rows, dim = shapes[name]
        culprits.append(_column(name))
        need, have = getattr(need, tier), getattr(cap, tier)
        lines.append(f"table {name} ({rows:,} x {dim}, {fmt_bytes(rows * dim * 4)} of fp32 weights) needs "
                     f"at least {fmt_bytes(need)} on one rank in any allowed sharding (smallest: "
                     f"{o.sharding_type}/{o.compute_kernel}), but a rank has {fmt_bytes(have)} of {what}: "
                     f"{fmt_bytes(need - have)} short")
    if not culprits:
        largest = max(shapes, key=lambda n: shapes[n][0] * shapes[n][1])
        total = sum(min(getattr(_total(o), tier) for o in options if o.name == n) for n in smallest)
        lines.append(f"every table fits a rank on its own (largest: {largest}, {shapes[largest][0]:,} x "
                     f"{shapes[largest][1]}, needs {fmt_bytes(getattr(_max_shard(smallest[largest]), tier))} "
                     f"of the {fmt_bytes(getattr(cap, tier))} of {what}), but together the tables need at "
                     f"least {fmt_bytes(total)} against {fmt_bytes(getattr(cap, tier) * topology.world_size)} "
                     f"on {topology.world_size} ranks")
    column = culprits[0] if culprits else "<column>"
    if culprits and smallest[table_name(column)].compute_kernel == "fused_uvm_caching":
        lines.append(f"{table_name(column)} already caches rows in HBM: a smaller plan.tables.{column}."
                     "cache_load_factor (the share of rows cached; 0.2 by default) needs less")
    lines.append(f"fixes: more ranks (--world-size), more memory per rank (--hbm/--ddr), a smaller "
                 f"plan.storage_reservation, or wider per-table choices, e.g. plan.tables.{column}."
                 "compute_kernels = [\"fused_uvm_caching\"] (rows cached in HBM, the rest in host memory) "
                 "or sharding_types that split the table (row_wise, table_row_wise, column_wise)")
    return "no sharding plan fits:\n  " + "\n  ".join(lines)


def _column(table: str) -> str:
    """The categorical column of a table named by app.model.table_name ("t_<column>")."""
    column = table.removeprefix("t_")
    return column if table_name(column) == table else table


def _total(option: ShardingOption) -> Storage:
    total = Storage(0, 0)
    for s in option.shards:
        total += s.storage
    return total


# ---------------------------------------------------------------------------------------
# Report


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GiB' -> 85899345920; units B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (of 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{text!r} is not a size; write e.g. 80GiB, 512GiB, 1.5TB or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def rank_ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out: list[str] = []
    for r in sorted(set(ranks)):
        if out and r == last + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{r}"
        else:
            out.append(str(r))
        last = r
    return ",".join(out)


def _shard_summary(option: ShardingOption) -> str:
    counts: dict[tuple[int, ...], int] = {}
    for s in option.shards:
        counts[tuple(s.size)] = counts.get(tuple(s.size), 0) + 1
    return ", ".join(f"{n}x[{'x'.join(map(str, size))}]" for size, n in counts.items())


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w)
                      for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


def report(run: DryRun, max_groups: int = 12) -> str:
    """Per table: sharding; per rank (ranks with equal use grouped): memory and step estimate."""
    topo, ws = run.topology, run.topology.world_size
    cap = topo.devices[0].storage
    out = [f"{len(run.options)} tables on {ws} ranks ({topo.compute_device}, {topo.local_world_size} per host; "
           f"per rank: HBM {fmt_bytes(cap.hbm)}, DDR {fmt_bytes(cap.ddr)}; batch {run.plan.batch_size:,} "
           f"rows per rank)",
           f"planner: {run.num_proposals} proposals, {run.num_plans} plans, {run.seconds:.1f} s"
           + ("" if ws <= FULL_SEARCH_MAX_RANKS else
              f"; above {FULL_SEARCH_MAX_RANKS} ranks the search is smaller (app/plan.py): row_wise and "
              "data_parallel only where plan.sharding_types or plan.tables.<column>.sharding_types "
              "lists them"), ""]
    rows = [["table", "rows x dim", "sharding", "kernel", "ranks", "shards", "HBM", "DDR", "ms (shards)"]]
    natural = lambda o: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", o.name)]  # noqa: E731
    for o in sorted(run.options, key=natural):
        total = _total(o)
        r, d = o.tensor.shape
        rows.append([o.name, f"{r:,} x {d}", o.sharding_type, o.compute_kernel,
                     rank_ranges([s.rank for s in o.shards]), _shard_summary(o), fmt_bytes(total.hbm),
                     fmt_bytes(total.ddr), f"{o.total_perf:.3f}"])
    out += _table(rows, {1, 6, 7, 8})

    used = [Storage(0, 0) for _ in range(ws)]
    perf = [Perf(0.0, 0.0, 0.0, 0.0) for _ in range(ws)]
    for o in run.options:
        for s in o.shards:
            used[s.rank] += s.storage
            perf[s.rank] += s.perf
    avail = run.available or cap
    groups: dict[tuple, list[int]] = {}
    for r in range(ws):  # group ranks whose use agrees to the MiB and the microsecond
        groups.setdefault((used[r].hbm >> 20, used[r].ddr >> 20, round(perf[r].total, 3)), []).append(r)
    order = sorted(groups.values(), key=lambda rs: -perf[rs[0]].total)
    pct = lambda a, b: f" ({a / b:.0%})" if b else ""  # noqa: E731
    out += ["", f"per rank: embedding shards (weights, optimizer state, kernel buffers) against what the "
                f"{run.reservation:.0%} reservation leaves for them"]
    rows = [["ranks", "HBM used", "of", "DDR used", "of", "est ms", "fwd comp", "fwd comms", "bwd comp",
             "bwd comms"]]
    for rs in order[:max_groups]:
        u, p = used[rs[0]], perf[rs[0]]
        rows.append([rank_ranges(rs), fmt_bytes(u.hbm) + pct(u.hbm, avail.hbm), fmt_bytes(avail.hbm),
                     fmt_bytes(u.ddr) + pct(u.ddr, avail.ddr), fmt_bytes(avail.ddr), f"{p.total:.3f}",
                     *(f"{x:.3f}" for x in (p.fwd_compute, p.fwd_comms, p.bwd_compute, p.bwd_comms))])
    out += _table(rows, set(range(1, 10)))
    if len(order) > max_groups:
        rest = [r for rs in order[max_groups:] for r in rs]
        out.append(f"... {len(order) - max_groups} more groups ({len(rest)} ranks) with less estimated time")
    totals = [p.total for p in perf]
    critical = max(range(ws), key=lambda r: totals[r])
    mean = statistics.mean(totals)
    out += ["", f"estimated embedding time per step (planner's model; dense layers not included): "
                f"{totals[critical]:.3f} ms on critical-path rank {critical}; mean over ranks {mean:.3f} ms"
                + (f" (critical is {(totals[critical] / mean - 1):.0%} above)" if mean else ""),
            f"peak per rank: HBM {fmt_bytes(max(u.hbm for u in used))}, "
            f"DDR {fmt_bytes(max(u.ddr for u in used))}"]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# The dry-run command's inputs


CRITEO_DENSE, CRITEO_CATEGORICAL = 13, 26


def planning_schema(data_path: str, labels: list[str], schema: str | None = None,
                    cardinality: str | None = None) -> tuple[Schema, str]:
    """The columns to plan, and where they came from.

    `cardinality` "N" plans the Criteo shape without data: 26 categorical columns c0..c25 of N
    rows and 13 dense d0..d12; "N0,N1,..." gives one column per value, and "cK=M" entries change
    column cK (e.g. "100000,c3=100000000": one large table). Otherwise `schema`, or
    else the config's data path: a data set folder, a folder holding only schema.json, or the
    schema.json file itself.
    """
    if cardinality:
        sizes: list[int] = []
        named: dict[str, int] = {}
        for item in cardinality.split(","):
            key, _, value = item.strip().rpartition("=")
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--cardinality {cardinality!r}: {item!r} is not a row count; write "
                                  "N, N0,N1,..., or add cK=M to change column cK, e.g. 100000,c3=100000000")
            if key:
                named[key] = int(value)
            else:
                sizes.append(int(value))
        if not sizes:
            raise ConfigError(f"--cardinality {cardinality!r}: give the row count of every column first, "
                              "e.g. 100000,c3=100000000")
        if len(sizes) == 1:
            sizes *= CRITEO_CATEGORICAL
        categorical = {f"c{i}": n for i, n in enumerate(sizes)}
        for key, n in named.items():
            if key not in categorical:
                raise ConfigError(f"--cardinality: there is no column {key!r}; "
                                  f"columns are c0..c{len(sizes) - 1}")
            categorical[key] = n
        return Schema(labels=list(labels), dense=[f"d{i}" for i in range(CRITEO_DENSE)],
                      categorical=categorical), f"--cardinality {cardinality}"
    path = Path(schema or data_path)
    if path.is_file():
        if path.name != SCHEMA_FILE:
            raise ConfigError(f"{path}: a schema file must be named {SCHEMA_FILE}; pass it or its folder")
        path = path.parent
    return Schema.load(path), str(path / SCHEMA_FILE)


def dry_run_config(cfg: Config, schema: Schema, where: str, topology: Topology, batch_size: int) -> DryRun:
    """Builds the training module tree on meta (same parameter paths as training) and plans it."""
    columns = Columns.resolve(schema, [t.label for t in cfg.tasks.values()], cfg.data.dense,
                              cfg.data.categorical, where=where)
    model = MultiTaskTrain(MultiTaskModel(columns, cfg.tasks, cfg.model, device="meta"), cfg.tasks)
    return dry_run(cfg.plan, model, topology, batch_size)
