"""bench/criteo1tb.py's parts that the CPU smoke run cannot reach or check: ids drawn on the
device as the generator draws them, fbgemm's UVM cache counters (bench/uvm_cache.py), the
Checkpointer's lines, the checkpoint run's config."""
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)

from app.config import ConfigError, load_config
from app.data.schema import Columns
from app.plan import constraints
from app.sources.synthetic import SHAPES, zipf_ids

REPO = Path(__file__).resolve().parents[2]
ROWS, SIZES = SHAPES["criteo1tb"]


@pytest.fixture(scope="module")
def b1tb():
    spec = importlib.util.spec_from_file_location("bench_criteo1tb", REPO / "bench" / "criteo1tb.py")
    module = sys.modules["bench_criteo1tb"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cache(b1tb):
    """bench/uvm_cache.py, the module criteo1tb.py imports (its import put the repo on sys.path)."""
    return importlib.import_module("bench.uvm_cache")


@pytest.mark.parametrize("alpha", [1.05, 1.0, 1.5])
def test_ids_on_the_device_follow_the_generators_zipf_law(b1tb, alpha):
    u = np.random.default_rng(0).random(200_000)
    for card in (3, 1000, 40_000_000):
        want = zipf_ids(u, card, alpha)
        got = b1tb.zipf_ids_torch(torch.from_numpy(u), torch.full((len(u),), float(card), dtype=torch.float64),
                                  alpha).numpy()
        assert got.min() >= 0 and got.max() < card
        assert np.abs(got - want).max() <= 1 and (got == want).mean() > 0.9999, card  # pow may round apart


def test_multi_hot_batches_have_the_shapes_ids_a_row(b1tb):
    columns = Columns(labels=("click",), dense=(), categorical=tuple(f"c{i}" for i in range(26)),
                      cardinality=tuple(min(r, 50) for r in ROWS))
    sizes = b1tb.column_sizes(columns)
    assert sizes == SIZES and sum(sizes) == 214
    for distribution in ("zipf", "uniform"):
        batches = b1tb.MultiHotBatches(columns, sizes, 16, distribution, 1.05, torch.device("cpu"))
        first, second = batches(), batches()
        assert not torch.equal(first.values(), second.values())  # fresh ids every step
        for key, card, k in zip(columns.categorical, columns.cardinality, sizes):
            jt = first[key]
            assert jt.lengths().tolist() == [k] * 16
            assert 0 <= int(jt.values().min()) and int(jt.values().max()) < card


def cached_tbe(stats: list[int]) -> torch.nn.Module:
    """A module holding a TBE that gathers cache counters, in a plain list as TorchRec's sharded
    collection holds its lookups; the counters set to `stats`."""
    tbe = SplitTableBatchedEmbeddingBagsCodegen([(10, 8, EmbeddingLocation.HOST, ComputeDevice.CPU)],
                                                gather_uvm_cache_stats=True)
    tbe.uvm_cache_stats.copy_(torch.tensor(stats))
    holder = torch.nn.Module()
    holder.lookups = [torch.nn.ModuleList([tbe])]
    return holder


def test_cache_counters_are_read_summed_and_turned_into_a_hit_rate(cache):
    assert cache.can_gather_cache_stats()
    assert cache.stat_names() == cache.STAT_NAMES  # fbgemm's UVMCacheStatsIndex order
    model = torch.nn.Module()
    model.a, model.b = cached_tbe([2, 1000, 400, 100, 5, 7]), cached_tbe([2, 600, 200, 20, 1, 2])
    stats = cache.read_cache_stats(model)
    assert stats["num_requested_indices"] == 1600 and stats["num_unique_indices"] == 600
    assert stats["num_unique_misses"] == 120 and stats["cache_rows"] == 0
    assert cache.hit_rate(stats) == pytest.approx(0.8)
    before = dict(stats, num_unique_indices=100, num_unique_misses=70)
    assert cache.hit_rate(cache.stats_delta(stats, before)) == pytest.approx(1 - 50 / 500)
    note = cache.cache_note(stats, 80_000_000, "timed steps")
    assert note.startswith("cache hit rate 80.00% (timed steps: 1 - 120 unique misses / 600 unique ids")
    assert cache.hit_rate(dict(stats, num_unique_indices=0)) is None
    assert "not available" in cache.cache_note(dict(stats, num_unique_indices=0), 0, "x")
    assert cache.read_cache_stats(torch.nn.Linear(2, 2)) is None
    # counters that cannot be read are a note, not a failed phase
    broken = cached_tbe([0] * 6)
    broken.lookups[0][0].get_uvm_cache_stats = lambda: None
    problems = []
    assert cache.try_cache_stats(broken, problems) is None
    assert problems and problems[0].startswith("cache counters unreadable (AttributeError")


def test_uvm_rows_are_read_from_the_plan_file(b1tb, cache):
    assert cache.uvm_rows(b1tb.PLAN_UVM) == 80_000_000  # c20, c21
    assert cache.uvm_rows(b1tb.PLAN_HBM) == 0


def test_the_checkpointers_lines_are_parsed(b1tb):
    # as app/run_dir.py prints them
    text = ("step 3: eval/click/auc=0.5\n"
            "saved /tmp/x/run/checkpoints/step_3 (21.34 GiB, with checksums) in 17.2 s\n")
    assert b1tb.parse_saved(text) == (21.34, 17.2)
    assert b1tb.parse_saved("nothing") is None
    line = "resuming from /tmp/x/run/checkpoints/step_3 (step 3; checked and loaded in 12.5 s)\n"
    assert b1tb.parse_loaded(line) == 12.5
    assert b1tb.parse_loaded(text) is None


def test_the_checkpoint_run_keeps_c0_and_the_small_tables_unless_the_disk_is_small(b1tb, monkeypatch, tmp_path):
    args = SimpleNamespace(cardinalities=list(ROWS), checkpoint_tables="auto", work=str(tmp_path))
    monkeypatch.setattr(b1tb.shutil, "disk_usage", lambda path: SimpleNamespace(free=60e9))
    chosen, _ = b1tb.checkpoint_columns(args, 128)
    assert chosen == [f"c{i}" for i, r in enumerate(ROWS) if i == 0 or r < 4_000_000]
    assert {"c9", "c19", "c20", "c21"}.isdisjoint(chosen)
    assert sum(ROWS[int(c[1:])] for c in chosen) * 516 / 1e9 == pytest.approx(22.8, abs=0.2)  # "about 23 GB"
    monkeypatch.setattr(b1tb.shutil, "disk_usage", lambda path: SimpleNamespace(free=20e9))
    chosen, why = b1tb.checkpoint_columns(args, 128)
    assert "c0" not in chosen and "c1" in chosen and "c0 left out" in why
    args.checkpoint_tables = "c1, c2"
    assert b1tb.checkpoint_columns(args, 128)[0] == ["c1", "c2"]


def test_the_checkpoint_config_names_plan_tables_of_its_columns_only(b1tb, tmp_path):
    columns = ["c0", "c1", "c2", "c5"]
    tables = [f"t_{c}" for c in columns]
    # what made the last attempt fail: the config's [plan.tables] names columns the run lacks
    plain = load_config(b1tb.CONFIG, ["--data.categorical", str(columns)])
    with pytest.raises(ConfigError, match="plan.tables.c3: this run has no categorical column"):
        constraints(plain.plan, tables, 1, "cpu")
    cfg = load_config(b1tb.subset_config(columns, tmp_path / "subset.json"))
    assert cfg.name == "criteo1tb_mmoe" and cfg.data.categorical == columns
    assert {c: t.pooling_factor for c, t in cfg.plan.tables.items()} == {"c0": 3, "c1": 2}
    assert set(constraints(cfg.plan, tables, 1, "cpu")) == set(tables)
    full = load_config(b1tb.CONFIG)
    assert (cfg.model, cfg.optim, cfg.tasks) == (full.model, full.optim, full.tasks)


def test_e2e_runs_are_sized_from_the_measured_parts(b1tb):
    R = b1tb.Result
    results = [R("reader", rates=[3e6]), R("reader + copy to GPU", rates=[2.5e6]),
               R(b1tb.embedding_name("zipf", False), rates=[3e6]), R("dense head bf16", rates=[3e6])]
    assert b1tb.predicted_rate(results, b1tb.embedding_name("zipf", False)) == pytest.approx(1.5e6)
    assert b1tb.predicted_rate(results[:2], "x") == 2.5e6
    assert b1tb.predicted_rate([], "x") is None
    results.append(R("e2e hbm", rate=1.2e6, extra={"mean": 1.1e6}))
    assert b1tb.predicted_rate(results, "x", e2e="e2e hbm") == 1.1e6


@pytest.mark.parametrize("argv, cuda, planned", [
    ([], True, True), (["--plan-files", "off"], True, False), ([], False, False),
    (["--max-cardinality", "1000"], True, False)])
def test_plan_files_are_used_at_full_sizes_on_a_gpu_unless_turned_off(b1tb, argv, cuda, planned):
    args = b1tb.parse_args(argv)
    b1tb.fill_defaults(args, cuda)
    assert args.plans is planned
