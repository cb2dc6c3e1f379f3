"""Plan files: a sharding plan as JSON (`mmoe plan --out`, applied with `plan.file`), read
back into an equal plan and checked against the run before training applies it.

Format: world_size, local_world_size, compute_device, batch_size_per_rank, and per module
path, per table: rows, dim, sharding_type, compute_kernel, ranks, and (except for
data_parallel, which has a full replica on every rank) its shards as rank, offsets, sizes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner.utils import placement
from torchrec.distributed.types import (
    CacheParams,
    EmbeddingModuleShardingPlan,
    EnumerableShardingSpec,
    ParameterSharding,
    ShardingPlan,
    ShardingType,
    ShardMetadata,
)
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from app.config import ConfigError

SHARDING_TYPES = [t.value for t in ShardingType]
COMPUTE_KERNELS = [k.value for k in EmbeddingComputeKernel]
FORMAT_VERSION = 1


class PlanError(ConfigError):
    """A plan that cannot be made, or a plan file that does not fit the run."""


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
