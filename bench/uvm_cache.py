"""fbgemm's UVM cache counters for bench/criteo1tb.py's UVM phases, and the hook that asks for them.

The hit rate is 1 - unique misses / unique ids from fbgemm's `uvm_cache_stats`
(`SplitTableBatchedEmbeddingBagsCodegen(gather_uvm_cache_stats=True)`, passed through the
sharder's `fused_params`). These are fbgemm internals: every reader here checks that fbgemm has
them and falls back to "not available", and the trainer itself is never changed.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

import app.sharded as app_sharded
import app.train as app_train


STAT_NAMES = ("num_calls", "num_requested_indices", "num_unique_indices", "num_unique_misses",
              "num_conflict_unique_misses", "num_conflict_misses")


def _tbe_class():
    try:
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen
    except ImportError:
        return None
    return SplitTableBatchedEmbeddingBagsCodegen


def stat_names() -> tuple[str, ...]:
    """fbgemm's order of the counters (`UVMCacheStatsIndex`), or the one this script knows."""
    try:
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import UVMCacheStatsIndex
    except ImportError:
        return STAT_NAMES
    return tuple(i.name for i in sorted(UVMCacheStatsIndex, key=int))


def can_gather_cache_stats() -> bool:
    tbe = _tbe_class()
    return tbe is not None and "gather_uvm_cache_stats" in inspect.signature(tbe.__init__).parameters


def gathering_sharders() -> list:
    """The trainer's sharder, asking fbgemm for the UVM cache counters (`fused_params` reach
    the TBE's constructor)."""
    return [EmbeddingBagCollectionSharder(fused_params={"gather_uvm_cache_stats": True})]


class Builds:
    """While inside, every model `app.sharded.build` makes (the trainer's too) is kept in
    `models`, built with `gathering_sharders` when `gather` is set (and fbgemm has the
    option)."""

    def __init__(self, gather: bool = False):
        self.gather = gather and can_gather_cache_stats()
        self.models: list[torch.nn.Module] = []
        self.note = ""

    def __enter__(self) -> "Builds":
        self._saved = app_train.build, app_sharded.sharders
        original = self._saved[0]

        def recorded(*a, **k):
            if self.gather:
                app_sharded.sharders = gathering_sharders
            try:
                out = original(*a, **k)
            except TypeError as e:  # an fbgemm without the option after all: build as the trainer does
                if not self.gather:
                    raise
                self.gather, self.note = False, f"cache counters not available ({e})"
                app_sharded.sharders = self._saved[1]
                out = original(*a, **k)
            self.models.append(out[0])
            return out

        app_train.build = recorded
        return self

    def build(self, *a, **k):
        return app_train.build(*a, **k)

    def __exit__(self, *exc) -> None:
        app_train.build, app_sharded.sharders = self._saved


def all_modules(root: torch.nn.Module) -> list[torch.nn.Module]:
    """`root` and every module under it, those held in plain lists too: a sharded collection
    keeps its lookups (and so its TBEs) in a list, out of `modules()`."""
    seen, stack, out = set(), [root], []
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        stack.extend(c for c in m._modules.values() if c is not None)
        for value in vars(m).values():
            if isinstance(value, (list, tuple)):
                stack.extend(x for x in value if isinstance(x, torch.nn.Module))
    return out


def cache_tbes(model: torch.nn.Module) -> list:
    tbe = _tbe_class()
    if tbe is None:
        return []
    return [m for m in all_modules(model) if isinstance(m, tbe) and getattr(m, "gather_uvm_cache_stats", False)]


def read_cache_stats(model: torch.nn.Module) -> dict | None:
    """fbgemm's UVM cache counters summed over the model's TBEs that gather them (tables in
    HBM count nothing), and the cache's rows; None when no TBE gathers them."""
    tbes = cache_tbes(model)
    if not tbes:
        return None
    names, total = stat_names(), None
    for t in tbes:
        stats = t.get_uvm_cache_stats() if hasattr(t, "get_uvm_cache_stats") else t.uvm_cache_stats
        values = [float(v) for v in stats.tolist()]
        total = values if total is None else [a + b for a, b in zip(total, values)]
    out = dict(zip(names, total))
    weights = [getattr(t, "lxu_cache_weights", None) for t in tbes]
    out["cache_rows"] = sum(w.shape[0] for w in weights if w is not None and w.numel())
    return out


def try_cache_stats(model: torch.nn.Module, problems: list[str]) -> dict | None:
    """`read_cache_stats`, a failure noted in `problems` rather than raised: the phase's
    numbers stand without the counters."""
    try:
        return read_cache_stats(model)
    except Exception as e:  # an fbgemm whose counters look otherwise
        problems.append(f"cache counters unreadable ({type(e).__name__}: {e})")
        return None


def stats_delta(after: dict | None, before: dict | None) -> dict | None:
    if after is None or before is None:
        return after
    return {k: v - before.get(k, 0) if k != "cache_rows" else v for k, v in after.items()}


def hit_rate(stats: dict | None) -> float | None:
    """1 - unique misses / unique ids: the share of a batch's distinct ids (of the cached
    tables) that were in the HBM cache when the batch was prefetched."""
    if not stats or not stats.get("num_unique_indices"):
        return None
    return 1 - stats["num_unique_misses"] / stats["num_unique_indices"]


def cache_note(stats: dict | None, uvm_rows: int, window: str) -> str:
    rate = hit_rate(stats)
    if rate is None:
        return "cache hit rate: not available" + (" (no cache lookups counted)" if stats else "")
    requested = stats["num_requested_indices"]
    rows = stats.get("cache_rows", 0)
    size = f"{rows:,} cache rows ({rows / uvm_rows:.0%} of the UVM tables' {uvm_rows:,})" if rows and uvm_rows else ""
    return (f"cache hit rate {rate:.2%} ({window}: 1 - {stats['num_unique_misses']:,.0f} unique misses / "
            f"{stats['num_unique_indices']:,.0f} unique ids; {requested:,.0f} ids requested, "
            f"{stats['num_conflict_unique_misses']:,.0f} conflict misses)" + (f"; {size}" if size else ""))


def uvm_rows(plan_file: Path) -> int:
    """Rows of the tables `plan_file` puts behind an HBM cache."""
    try:
        plan = json.loads(plan_file.read_text())
    except (OSError, ValueError):
        return 0
    return sum(t["rows"] for tables in plan.get("modules", {}).values() for t in tables.values()
               if "uvm" in t.get("compute_kernel", ""))
