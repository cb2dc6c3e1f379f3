"""Sharding plans without a process group: constraints, the dry run, plan files and their checks."""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from app import dry_run as dry, plan as planning, plan_file
from app.cli import main
from app.config import ConfigError, load_config
from app.data.schema import Columns
from app.model import MultiTaskModel, MultiTaskTrain
from app.plan_file import PlanError

REPO = Path(__file__).resolve().parents[2]
MIXED = ["--plan.tables.c0.sharding_types", "['table_wise']",
         "--plan.tables.c1.sharding_types", "['column_wise']",
         "--plan.tables.c2.sharding_types", "['row_wise']",
         "--plan.tables.c2.compute_kernels", "['fused_uvm_caching']",
         "--plan.tables.c2.cache_load_factor", "0.5",
         "--plan.tables.c3.sharding_types", "['data_parallel']"]


def meta_model(cfg, cardinalities=(50, 50, 50, 50)):
    columns = Columns(labels=("click", "convert"), dense=("d0", "d1", "d2"),
                      categorical=tuple(f"c{i}" for i in range(len(cardinalities))),
                      cardinality=tuple(cardinalities))
    return MultiTaskTrain(MultiTaskModel(columns, cfg.tasks, cfg.model, device="meta"), cfg.tasks)


def dry_run(overrides=(), world_size=4, device="cuda", cardinalities=(50, 50, 50, 50), **caps):
    cfg = load_config("configs/debug.toml", list(overrides))
    topology = planning.make_topology(world_size, device, min(world_size, 8), **caps)
    return cfg, dry.dry_run(cfg.plan, meta_model(cfg, cardinalities), topology, 64)


def test_plan_file_round_trips(tmp_path):
    _, run = dry_run(MIXED)
    types = {n: p.sharding_type for n, p in run.plan.plan["model.sparse.ebc"].items()}
    assert types == {"t_c0": "table_wise", "t_c1": "column_wise", "t_c2": "row_wise",
                     "t_c3": "data_parallel"}
    plan_file.save_plan(run.plan, tmp_path / "plan.json")
    loaded = plan_file.load_plan(tmp_path / "plan.json")
    assert loaded == run.plan
    doc = json.loads((tmp_path / "plan.json").read_text())
    t_c2 = doc["modules"]["model.sparse.ebc"]["t_c2"]
    assert (t_c2["rows"], t_c2["dim"], t_c2["compute_kernel"]) == (50, 8, "fused_uvm_caching")
    assert t_c2["cache_params"] == {"load_factor": 0.5}
    assert [s["rank"] for s in t_c2["shards"]] == t_c2["ranks"] == [0, 1, 2, 3]
    assert "shards" not in doc["modules"]["model.sparse.ebc"]["t_c3"]  # a replica on every rank
    # placements follow the launching run's ranks per host; the sharding stays the same
    two_per_host = plan_file.load_plan(tmp_path / "plan.json", local_world_size=2)
    shard = two_per_host.plan["model.sparse.ebc"]["t_c2"].sharding_spec.shards[3]
    assert str(shard.placement) == "rank:3/cuda:1"


def test_training_plan_applies_the_file_when_set(tmp_path):
    cpu_mix = ["--plan.tables.c1.sharding_types", "['column_wise']",
               "--plan.tables.c3.sharding_types", "['data_parallel']"]
    cfg, run = dry_run(cpu_mix, world_size=2, device="cpu")
    plan_file.save_plan(run.plan, tmp_path / "plan.json")
    cfg.plan.file = str(tmp_path / "plan.json")
    model = meta_model(cfg)
    got = planning.training_plan(cfg.plan, model, ["t_c0", "t_c1", "t_c2", "t_c3"], 2, "cpu", 64, 2)
    assert got == run.plan


@pytest.mark.parametrize("change, message", [
    (dict(world_size=4), r"made for world size 2, this run has 4 ranks"),
    (dict(device="cuda"), r"made for compute device 'cpu', this run uses 'cuda'"),
    (dict(cardinalities=(50, 60, 50, 50)), r"model\.sparse\.ebc\.t_c1 is 60x8 \(rows x dim\) in the model but 50x8"),
    (dict(cardinalities=(50, 50, 50, 50, 7)), r"table model\.sparse\.ebc\.t_c4 \(7x8\) is not in the plan"),
])
def test_a_plan_that_does_not_fit_the_run_is_rejected(tmp_path, change, message):
    cfg, run = dry_run(world_size=2, device="cpu")
    plan_file.save_plan(run.plan, tmp_path / "plan.json")
    plan = plan_file.load_plan(tmp_path / "plan.json")
    model = meta_model(cfg, change.get("cardinalities", (50, 50, 50, 50)))
    with pytest.raises(PlanError, match=message) as e:
        plan_file.check_plan(plan, model, change.get("world_size", 2), change.get("device", "cpu"),
                            where="plan.json")
    assert "mmoe plan --world-size" in str(e.value)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t["t_c0"]["shards"][0].update(sizes=[40, 8]), r"t_c0: the shards cover 320 of the table's 400"),
    (lambda t: t["t_c0"]["shards"][0].update(sizes=[51, 8]), r"do not lie inside the 50x8 table"),
    (lambda t: t["t_c0"].update(ranks=[5]), r"t_c0: rank 5 is outside the plan's 4 ranks"),
    (lambda t: t["t_c0"].update(sharding_type="rowwise"), r"sharding_type 'rowwise' is not one of"),
    (lambda t: t["t_c1"].pop("dim"), r"t_c1: missing 'dim'"),
])
def test_a_damaged_plan_file_names_the_table(tmp_path, edit, message):
    _, run = dry_run(MIXED)
    doc = plan_file.plan_to_dict(run.plan)
    edit(doc["modules"]["model.sparse.ebc"])
    (tmp_path / "plan.json").write_text(json.dumps(doc))
    with pytest.raises(PlanError, match=message):
        plan_file.load_plan(tmp_path / "plan.json")


def test_table_constraints_override_the_global_lists():
    cfg = load_config("configs/debug.toml", [
        "--plan.sharding_types", "['table_wise']", "--plan.compute_kernels", "['fused']",
        "--plan.tables.c1.sharding_types", "['column_wise']", "--plan.tables.c1.pooling_factor", "3"])
    cons = planning.constraints(cfg.plan, ["t_c0", "t_c1"], 8)
    assert (cons["t_c0"].sharding_types, cons["t_c0"].compute_kernels) == (["table_wise"], ["fused"])
    assert (cons["t_c1"].sharding_types, cons["t_c1"].compute_kernels) == (["column_wise"], ["fused"])
    assert cons["t_c1"].pooling_factors == [3.0]
    # above FULL_SEARCH_MAX_RANKS, unconstrained tables leave out row_wise and data_parallel
    big = planning.constraints(load_config("configs/debug.toml").plan, ["t_c0"], 1024)
    assert big["t_c0"].sharding_types == planning.LARGE_WORLD_SHARDING_TYPES


@pytest.mark.parametrize("overrides, message", [
    (["--plan.tables.zz.sharding_types", "['table_wise']"], r"plan\.tables\.zz: this run has no categorical column 'zz'"),
    (["--plan.tables.c0.compute_kernels", "['fast']"], r"plan\.tables\.c0\.compute_kernels: 'fast' is not one of"),
    (["--plan.sharding_types", "['rows']"], r"plan\.sharding_types: 'rows' is not one of"),
    (["--plan.storage_reservation", "1.5"], r"plan\.storage_reservation is 1\.5"),
    (["--plan.tables.c0.sharding_types", "['row_wise']"],  # gloo CPU ranks have no row_wise
     r"plan\.tables\.c0: no allowed sharding type and compute kernel runs on cpu .* table_wise: fused"),
    (["--plan.compute_kernels", "['fused_uvm_caching']"], r"plan: no allowed sharding type .* on cpu"),
])
def test_bad_plan_config_is_an_error_naming_the_key(overrides, message):
    cfg = load_config("configs/debug.toml", overrides)
    with pytest.raises(ConfigError, match=message):
        planning.make_planner(cfg.plan, ["t_c0"], planning.make_topology(2, "cpu"), 64)


def test_unknown_table_constraint_key_is_rejected_by_the_loader():
    with pytest.raises(ConfigError, match=r"unknown key plan\.tables\.c0\.kernels"):
        load_config("configs/debug.toml", ["--plan.tables.c0.kernels", "['fused']"])


def test_oversized_table_fails_with_its_size_then_fits_with_uvm_caching():
    gpu_only = ["--model.embedding_dim", "64", "--plan.compute_kernels", "['fused', 'dense']"]
    sizes = (100, 100, 100, 20_000_000)
    with pytest.raises(PlanError) as e:
        dry_run(gpu_only, world_size=2, cardinalities=sizes, hbm_cap=2**30)
    message = str(e.value)
    assert "table t_c3 (20,000,000 x 64, 4.77 GiB of fp32 weights) needs at least" in message
    assert "870.40 MiB of HBM after the 15% reservation" in message and "short" in message
    assert "plan.tables.c3.compute_kernels" in message

    _, run = dry_run([*gpu_only, "--plan.tables.c3.compute_kernels", "['fused_uvm_caching']"],
                     world_size=2, cardinalities=sizes, hbm_cap=2**30)
    (big,) = [o for o in run.options if o.name == "t_c3"]
    assert big.compute_kernel == "fused_uvm_caching"
    assert sum(s.storage.ddr for s in big.shards) > 4 * 2**30  # the table itself lives in host memory
    text = dry.report(run)
    assert "fused_uvm_caching" in text and "DDR used" in text and "critical-path rank" in text


def test_tables_that_fit_alone_but_not_together_are_explained():
    with pytest.raises(PlanError, match=r"every table fits a rank on its own \(largest: t_c0, 2,500,000 x 64.*"
                                        r"together the tables need at least"):
        dry_run(["--model.embedding_dim", "64", "--plan.compute_kernels", "['fused', 'dense']"],
                world_size=1, cardinalities=(2_500_000,) * 4, hbm_cap=2**30)


def test_report_groups_ranks_and_names_the_critical_rank():
    _, run = dry_run(world_size=16)
    text = dry.report(run)
    assert "4 tables on 16 ranks (cuda, 8 per host" in text
    assert "estimated embedding time per step" in text
    busiest = max(range(16), key=lambda r: sum(s.perf.total for o in run.options for s in o.shards
                                                if s.rank == r))
    assert f"critical-path rank {busiest};" in text
    hbm = [sum(s.storage.hbm for o in run.options for s in o.shards if s.rank == r) for r in range(16)]
    assert f"peak per rank (mean over ranks): HBM {dry.fmt_bytes(max(hbm))} ({dry.fmt_bytes(sum(hbm) / 16)})" in text


def test_cli_plan_writes_a_plan_training_can_load(tmp_path, capsys):
    out = tmp_path / "plan.json"
    main(["plan", "--config", "configs/criteo_mmoe.toml", "--cardinality", "1000", "--world-size", "2",
          "--out", str(out)])
    text = capsys.readouterr().out
    assert "26 tables on 2 ranks" in text and "t_c25" in text and f"--plan.file {out}" in text
    plan = plan_file.load_plan(out)
    assert (plan.world_size, plan.compute_device) == (2, "cuda")
    assert plan.tables["model.sparse.ebc"]["t_c0"] == (1000, 128)


def test_cli_plan_exits_nonzero_naming_the_oversized_table(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--config", "configs/criteo_mmoe.toml", "--cardinality", "1000,c3=30000000",
              "--world-size", "8", "--hbm", "1GiB", "--plan.compute_kernels", "['fused', 'dense']"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "error: no sharding plan fits" in err and "table t_c3 (30,000,000 x 128" in err


def test_planning_schema_sources(tmp_path):
    schema, _ = dry.planning_schema("unused", ["click"], cardinality="1000")
    assert list(schema.categorical.values()) == [1000] * 26 and len(schema.dense) == 13
    schema, _ = dry.planning_schema("unused", ["click"], cardinality="5,6,c1=7")
    assert schema.categorical == {"c0": 5, "c1": 7}
    with pytest.raises(ConfigError, match="no column 'c9'"):
        dry.planning_schema("unused", ["click"], cardinality="5,6,c9=1")
    schema.save(tmp_path)  # a folder holding only schema.json stands in for the data
    for path in (tmp_path, tmp_path / "schema.json"):
        assert dry.planning_schema(str(path), ["click"])[0].categorical == {"c0": 5, "c1": 7}
    assert dry.planning_schema("nowhere", [], schema=str(tmp_path))[0].dense == schema.dense


def test_sizes_and_ranges():
    assert dry.parse_bytes("80GiB") == 80 * 2**30
    assert dry.parse_bytes("1.5TB") == 1_500_000_000_000
    assert dry.parse_bytes("4096") == 4096
    with pytest.raises(ConfigError, match="not a size"):
        dry.parse_bytes("80 gigs")
    assert dry.rank_ranges([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"


def test_make_plan_runs_the_plan_command():
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    lines = subprocess.run(["make", "-n", "-s", "plan", "GPUS=64", "CONFIG=configs/criteo_mmoe.toml",
                            "ARGS=--cardinality 1000000"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    (line,) = [ln for ln in lines if " app plan " in ln]
    assert shlex.split(line)[1:] == ["-m", "app", "plan", "--config", "configs/criteo_mmoe.toml",
                                     "--world-size", "64", "--cardinality", "1000000"]
