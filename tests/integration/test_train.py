"""A tiny end-to-end run learns: AUC well above chance on a learnable synthetic set."""
import json
import subprocess
import sys

import torch


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


RECORD_ROWS = """
import json, sys
import app.train as T
from app.config import load_config

seen, started, run_pipeline, iter_batches = [], [], T.run_pipeline, T.iter_batches


def recording(pipeline, batches):
    for out in run_pipeline(pipeline, batches):
        seen.append(out.row_ids.tolist())
        yield out


def starting(*args):
    started.append(len(seen))  # batches trained when a reader starts
    return iter_batches(*args)


T.run_pipeline, T.iter_batches = recording, starting
T.train(load_config("configs/debug.toml", sys.argv[2:]))
json.dump({"seen": seen, "started": started}, open(sys.argv[1], "w"))
"""


def test_each_epoch_trains_on_its_own_rows_in_order_when_read_ahead(tiny_data, tmp_path):
    """The next epoch's reader workers start before the current epoch ends: training still
    sees every epoch's batches exactly as that epoch's reader alone yields them."""
    from app.config import load_config
    from app.data import Position, iter_batches
    from app.train import Env, resolve_columns, split_data

    args = ["--data.path", str(tiny_data), "--train.run_dir", str(tmp_path / "run"), "--train.epochs", "3",
            "--data.num_workers", "2", "--train.eval_every", "0", "--train.tensorboard", "false"]
    subprocess.run([sys.executable, "-c", RECORD_ROWS, str(tmp_path / "rows.json"), *args], check=True,
                   capture_output=True)
    cfg = load_config("configs/debug.toml", args)
    data = split_data(cfg, Env(0, 1, 0, 1, None), resolve_columns(cfg), cfg.data.train_split, train=True)
    want = []
    for epoch in range(3):
        data.set_position(Position(epoch))
        want += [b.row_ids.tolist() for b in iter_batches(data, 0, pin_memory=False)]
    record = json.loads((tmp_path / "rows.json").read_text())
    assert len(want) == 3 * len(data) and record["seen"][:len(want)] == want
    # readers of epochs 1 and 2 (and the evaluation's, last) started before their epoch did
    started = record["started"]
    assert len(started) == 4 and started[1] < len(data) and started[2] < 2 * len(data), started


def test_training_collects_garbage_every_n_steps_and_scoring_as_usual():
    import gc

    from app.train import collecting_every, scoring

    collections = []

    def seen(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    gc.callbacks.append(seen)
    try:
        with collecting_every(5) as collect:
            assert not gc.isenabled()
            with scoring(torch.nn.Linear(1, 1)):
                assert gc.isenabled()
            assert not gc.isenabled()
            start = len(collections)
            for step in range(1, 51):
                collect(step)
            assert collections[start:] == [1] * 9 + [2]  # steps 5, 10, ..., 45, then all at 50
        assert gc.isenabled()
        with collecting_every(0) as collect:
            assert gc.isenabled()
    finally:
        gc.callbacks.remove(seen)
