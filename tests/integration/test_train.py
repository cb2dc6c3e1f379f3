"""A tiny end-to-end run learns: AUC well above chance on a learnable synthetic set."""
import json
import subprocess
import sys


def test_tiny_run_learns(tiny_data, tmp_path):
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "app", "train", "--config", "configs/debug.toml",
                    "--data.path", str(tiny_data), "--train.run_dir", str(run), "--train.epochs", "4",
                    "--train.tensorboard", "false"], check=True, capture_output=True)
    summary = json.loads((run / "summary.json").read_text())
    best = json.loads((tiny_data / "schema.json").read_text())["meta"]["best_auc"]["test"]
    for task, metrics in summary["tasks"].items():
        assert metrics["auc"] > 0.65, (task, metrics, best[task])  # chance is 0.5, the best ~0.8
        assert metrics["auc"] <= best[task] + 0.02
