"""The sharding planner's dry run (`mmoe plan`): a plan for any world size on any machine, no
GPU and no process group, with the planner's memory and step-time estimates per rank, and
when no plan fits, which table and by how much."""
from __future__ import annotations

import logging
import re
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from torch import nn
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.types import Perf, PlannerError, ShardingOption, Stats, Storage, StorageReservation

from app.config import Config, ConfigError, PlanConfig
from app.data.schema import SCHEMA_FILE, Columns, Schema
from app.model import MultiTaskModel, MultiTaskTrain, table_name
from app.plan import FULL_SEARCH_MAX_RANKS, constraints, make_planner, sharders, storage_reservation
from app.plan_file import PlanError, RunPlan, table_shapes


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
            "peak per rank (mean over ranks): " + ", ".join(
                f"{tier.upper()} {fmt_bytes(max(getattr(u, tier) for u in used))} "
                f"({fmt_bytes(statistics.mean(getattr(u, tier) for u in used))})" for tier in ("hbm", "ddr"))]
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
