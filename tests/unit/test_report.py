import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from app import cli
from app.report import ReportError, Run, gate_matrix, write_report
from app.sources.synthetic import SyntheticSpec, generate

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(run_dir: Path, records: list[dict], summary: dict | None, config: dict) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


def _config(head: str, tasks: dict[str, str]) -> dict:
    return {"name": "hand", "model": {"head": head, "num_experts": 3},
            "tasks": {t: {"type": kind, "label": t, "weight": 1.0} for t, kind in tasks.items()},
            "data": {"path": "nowhere", "eval_split": "test"}}


def _gates(rows: dict[str, list[float]]) -> dict:
    return {f"train/{t}/gate_e{k}": w for t, ws in rows.items() for k, w in enumerate(ws)}


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert path.stat().st_size > 5_000, f"{path} is suspiciously small"
    height, width, _ = matplotlib.image.imread(path).shape
    assert height > 200 and width > 300


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A real 12-step debug run; trained in a subprocess so its process group stays there."""
    tmp = tmp_path_factory.mktemp("report")
    generate(tmp / "data", SyntheticSpec(rows={"train": 2000, "test": 500}, cardinalities=[50] * 4,
                                         num_dense=3))
    run_dir = tmp / "run"
    subprocess.run([sys.executable, "-m", "app", "train", "--config", "configs/debug.toml",
                    "--data.path", str(tmp / "data"), "--train.run_dir", str(run_dir),
                    "--train.max_steps", "12", "--train.eval_every", "6", "--train.log_every", "3",
                    "--train.device", "cpu"],
                   cwd=REPO, check=True, capture_output=True, timeout=120)
    return run_dir


def test_report_of_a_trained_run(trained_run, capsys):
    cli.COMMANDS["report"]([str(trained_run)])
    assert f"wrote {trained_run / 'report.md'}" in capsys.readouterr().out
    md = (trained_run / "report.md").read_text()
    for name in ("loss.png", "auc.png", "throughput.png"):
        _assert_png(trained_run / name)
        assert f"]({name})" in md
    summary = json.loads((trained_run / "summary.json").read_text())
    events = EventAccumulator(str(trained_run / "tb"))
    events.Reload()
    for task, metrics in summary["tasks"].items():
        row = " | ".join(f"{metrics[k]:.4f}" for k in ("auc", "logloss", "ne", "calibration", "label_mean",
                                                          "pred_mean"))
        assert f"| {task} | binary | {row} |" in md
        assert {f"eval/{task}/ne", f"eval/{task}/calibration"} <= set(events.Tags()["scalars"])
    assert f"{summary['mean_auc']:.4f}" in md
    # debug.toml's head is an MMoE: the run logged its gates, and the report draws them
    gates = gate_matrix(Run.load(trained_run))
    assert gates is not None and gates.tasks == list(summary["tasks"])
    assert "](gates.png)" in md
    _assert_png(trained_run / "gates.png")


def test_gate_matrix_prefers_the_summary_and_rows_sum_to_one(tmp_path):
    config = _config("mmoe", {"click": "binary", "watch_time": "regression"})
    records = [
        {"step": 3, "epoch": 0, "samples_per_sec": 900.0, "train/click/loss": 0.7,
         "train/watch_time/loss": 2.0, **_gates({"click": [0.2, 0.3, 0.5], "watch_time": [0.4, 0.4, 0.2]}),
         "train/click/gate_entropy": 1.03, "lr/dense": 1e-3, "some/unknown/key": "x"},
        {"step": 6, "epoch": 0, "eval/click/auc": 0.61, "eval/click/logloss": 0.68,
         "eval/watch_time/rmse": 1.3, "eval/mean_auc": 0.61, "eval/rows": 100},
    ]
    summary = {"config": "hand", "tasks": {"click": {"auc": 0.61, "logloss": 0.68},
                                           "watch_time": {"rmse": 1.3}},
               "mean_auc": 0.61, "samples_per_sec": 900.0, "world_size": 2, "steps": 6,
               # summary order differs from config order: rows still follow the config
               "gates": {"watch_time": [0.1, 0.1, 0.8], "click": [0.6, 0.3, 0.1]}}
    run_dir = _write_run(tmp_path / "run", records, summary, config)

    gates = gate_matrix(Run.load(run_dir))
    assert gates.tasks == ["click", "watch_time"]
    assert gates.source == "summary.json"
    np.testing.assert_allclose(gates.weights, [[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    np.testing.assert_allclose(gates.weights.sum(axis=1), 1.0)

    md = write_report(run_dir).read_text()
    assert "](gates.png)" in md and "| watch_time | regression |" in md and "| world size | 2 |" in md
    for name in ("loss.png", "auc.png", "throughput.png", "gates.png"):
        _assert_png(run_dir / name)


def test_gate_matrix_falls_back_to_the_last_train_record(tmp_path):
    records = [
        {"step": 3, "train/a/loss": 0.7, **_gates({"a": [0.5, 0.5], "b": [0.9, 0.1]})},
        {"step": 6, "train/a/loss": 0.6, **_gates({"a": [0.25, 0.75], "b": [0.7, 0.3]})},
        {"step": 6, "eval/a/auc": 0.7},
    ]
    config = _config("mmoe", {"a": "binary", "b": "binary"})
    run_dir = _write_run(tmp_path / "run", records, {"tasks": {}}, config)
    gates = gate_matrix(Run.load(run_dir))
    assert gates.source == "train log, step 6"
    np.testing.assert_allclose(gates.weights, [[0.25, 0.75], [0.7, 0.3]])
    np.testing.assert_allclose(gates.weights.sum(axis=1), 1.0)


NO_EVAL_SUMMARY = {"config": "hand", "tasks": {"a": {}, "b": {}}, "mean_auc": None,
                   "samples_per_sec": 1010.0, "world_size": 1, "steps": 30}


@pytest.mark.parametrize("summary, says", [(None, "No summary.json"),
                                           (NO_EVAL_SUMMARY, "No evaluation results")])
def test_report_without_gates_or_eval(tmp_path, summary, says):
    records = [{"step": s, "epoch": 0, "samples_per_sec": 1000.0 + s, "train/a/loss": 1.0 / s,
                "train/b/loss": 2.0 / s} for s in (10, 20, 30)]
    config = _config("shared_bottom", {"a": "binary", "b": "binary"})
    run_dir = _write_run(tmp_path / "run", records, summary, config)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "train/a/lo')  # a run killed mid-write
    (run_dir / "gates.png").write_bytes(b"stale")  # from an earlier report: must not survive

    md = write_report(run_dir).read_text()
    assert gate_matrix(Run.load(run_dir)) is None
    assert "The `shared_bottom` head has no per-task gates" in md
    assert says in md and "No eval AUC was logged" in md
    assert not (run_dir / "auc.png").exists() and not (run_dir / "gates.png").exists()
    for name in ("loss.png", "throughput.png"):
        _assert_png(run_dir / name)


def test_report_of_a_directory_that_is_no_run(tmp_path):
    with pytest.raises(ReportError, match="holds neither metrics.jsonl nor summary.json"):
        write_report(tmp_path)
