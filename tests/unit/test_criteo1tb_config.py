"""configs/criteo1tb_mmoe.toml has the Criteo 1TB shape, and the plans in bench/plans/ fit it."""
from pathlib import Path

import pytest

from app import dry_run
from app.config import load_config
from app.data.schema import Columns
from app.model import MultiTaskModel, MultiTaskTrain
from app.plan_file import check_plan, load_plan
from app.sources.synthetic import SHAPES

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "criteo1tb_mmoe.toml"
ROWS, SIZES = SHAPES["criteo1tb"]


def test_config_hints_the_multi_hot_sizes_to_the_planner():
    cfg = load_config(CONFIG)
    assert {c: t.pooling_factor for c, t in cfg.plan.tables.items()} == {
        f"c{i}": k for i, k in enumerate(SIZES) if k > 1}
    assert (cfg.model.embedding_dim, cfg.model.num_experts, list(cfg.tasks)) == (128, 8, ["click", "convert"])


@pytest.mark.parametrize("path", sorted((REPO / "bench" / "plans").glob("criteo1tb_*gpu_*.json")), ids=lambda p: p.stem)
def test_saved_plans_fit_the_config(path):
    cfg = load_config(CONFIG)
    schema, where = dry_run.planning_schema("", ["click", "convert"], cardinality=",".join(map(str, ROWS)))
    columns = Columns.resolve(schema, ["click", "convert"], [], [], where)
    model = MultiTaskTrain(MultiTaskModel(columns, cfg.tasks, cfg.model, device="meta"), cfg.tasks)
    plan = load_plan(path)
    check_plan(plan, model, plan.world_size, "cuda", where=str(path))
    assert f"_{plan.world_size}gpu_" in path.name and plan.batch_size == cfg.data.batch_size
