"""A reviewed plan file is the plan that runs: 2 gloo ranks under torchrun shard as the file says.

Run by torchrun, this file is also the rank script: it builds the model as training does
(app.train.build), writes the shards each table really got, then trains through the CLI.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from app import dry_run as dry, plan as planning, plan_file
from app.config import load_config

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _rank_main(seen_path: str, args: list[str]) -> None:
    from app.cli import main
    from app.config import load_config
    from app.data.schema import Columns, Schema
    from app.distributed import init_distributed
    from app.sharded import build

    assert args[0] == "--config", args  # then the config file, then overrides: `mmoe train` arguments
    cfg = load_config(args[1], args[2:])
    env = init_distributed(cfg.train.device)
    columns = Columns.resolve(Schema.load(cfg.data.path), [t.label for t in cfg.tasks.values()],
                              cfg.data.dense, cfg.data.categorical, where=cfg.data.path)
    dmp, _, _ = build(cfg, env, columns)
    seen = {}
    for key, value in dmp.state_dict().items():
        if key.endswith(".weight") and ".embedding_bags." in key:
            table = key.split(".")[-2]
            seen[table] = (sorted([s.placement.rank(), list(s.shard_offsets), list(s.shard_sizes)]
                                  for s in value.metadata().shards_metadata)
                           if hasattr(value, "metadata") else "replicated")  # data parallel
    if env.rank == 0:
        Path(seen_path).write_text(json.dumps(seen))
    main(["train", *args])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)


def test_two_ranks_shard_exactly_as_the_plan_file_says(tiny_data, tmp_path):
    # what `mmoe plan --world-size 2 --compute-device cpu --out plan.json` does
    cfg = load_config("configs/debug.toml", ["--data.path", str(tiny_data),
                                             "--plan.tables.c2.sharding_types", "['data_parallel']"])
    schema, where = dry.planning_schema(cfg.data.path, [t.label for t in cfg.tasks.values()])
    made = dry.dry_run_config(cfg, schema, where, planning.make_topology(2, "cpu", 2), 256)
    reviewed = tmp_path / "plan.json"
    plan_file.save_plan(made.plan, reviewed)

    # the reviewer puts t_c0 whole on rank 1 and splits t_c1 by columns across both ranks
    doc = json.loads(reviewed.read_text())
    tables = doc["modules"]["model.sparse.ebc"]
    assert tables["t_c2"]["sharding_type"] == "data_parallel"
    tables["t_c0"].update(sharding_type="table_wise", compute_kernel="fused", ranks=[1],
                          shards=[{"rank": 1, "offsets": [0, 0], "sizes": [50, 8]}])
    tables["t_c1"].update(sharding_type="column_wise", compute_kernel="fused", ranks=[0, 1], shards=[
        {"rank": 0, "offsets": [0, 0], "sizes": [50, 4]}, {"rank": 1, "offsets": [0, 4], "sizes": [50, 4]}])
    reviewed.write_text(json.dumps(doc, indent=2))

    seen, run = tmp_path / "seen.json", tmp_path / "run"
    proc = subprocess.run([*TORCHRUN, __file__, str(seen), "--config", "configs/debug.toml", "--data.path",
                           str(tiny_data), "--plan.file", str(reviewed), "--train.max_steps", "4",
                           "--train.run_dir", str(run), "--train.device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "",
                               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = {name: sorted([s["rank"], s["offsets"], s["sizes"]] for s in t["shards"]) if "shards" in t
                else "replicated" for name, t in tables.items()}
    assert json.loads(seen.read_text()) == expected
    assert json.loads((run / "summary.json").read_text())["steps"] == 4

    # the same file on one process is refused before training, naming what differs
    alone = _cli("train", "--config", "configs/debug.toml", "--data.path", str(tiny_data), "--plan.file",
                 str(reviewed), "--train.max_steps", "1", "--train.run_dir", str(tmp_path / "alone"),
                 "--train.device", "cpu")
    assert alone.returncode == 1
    assert "made for world size 2, this run has 1 ranks" in alone.stderr, alone.stderr[-3000:]


if __name__ == "__main__":
    _rank_main(sys.argv[1], sys.argv[2:])
