"""End-to-end runs learn: two binary tasks, a binary and a regression task together, and the MMoE
paper's regression pair, each measured against the best a model can do or a constant prediction."""
import json
import math

import torch

from app.data.schema import Schema
from app.sources.mmoe_paper import PaperSpec, generate as generate_paper
from conftest import mmoe, train_args


def test_tiny_run_learns(tiny_data, tmp_path):
    run = tmp_path / "run"
    mmoe(*train_args(tiny_data, run, "--train.epochs", "4"))
    summary = json.loads((run / "summary.json").read_text())
    meta = Schema.load(tiny_data).meta
    best, rate = meta["best_auc"]["test"], meta["label_rate"]["test"]
    for task, metrics in summary["tasks"].items():
        # it reached 0.036 below the best AUC (0.76, 0.79) and 0.06 and 0.09 below the logloss of
        # predicting the label rate everywhere
        assert best[task] - 0.06 < metrics["auc"] <= best[task] + 0.02, (task, metrics, best[task])
        constant = -(rate[task] * math.log(rate[task]) + (1 - rate[task]) * math.log(1 - rate[task]))
        assert metrics["logloss"] < constant - 0.03, (task, metrics, constant)


def test_binary_and_regression_tasks_learn_together(mixed_run, tiny_data):
    """click binary, convert a regression on its 0/1 label: RMSE and no AUC for convert."""
    summary = json.loads((mixed_run / "summary.json").read_text())
    meta = Schema.load(tiny_data).meta
    click, convert = summary["tasks"]["click"], summary["tasks"]["convert"]
    assert set(click) == {"auc", "logloss", "ne", "calibration", "label_mean", "pred_mean"}
    assert set(convert) == {"rmse", "label_mean", "pred_mean"}
    assert summary["mean_auc"] == click["auc"]
    # it reached click AUC 0.740 (the best 0.763) and convert RMSE 0.440, where predicting the
    # label rate everywhere gives 0.478
    assert click["auc"] > meta["best_auc"]["test"]["click"] - 0.06, click
    rate = meta["label_rate"]["test"]["convert"]
    assert convert["rmse"] < math.sqrt(rate * (1 - rate)) - 0.02, (convert, rate)


def test_regression_tasks_learn(tmp_path):
    """The MMoE paper's regression pair (8 inputs) with its shipped config, in 96 steps of a
    larger learning rate."""
    data, run = tmp_path / "data", tmp_path / "run"
    var = generate_paper(data, PaperSpec(rows={"train": 4000, "test": 1000}, dim=8)).meta["label_var"]["test"]
    mmoe("train", "--config", "configs/synthetic_paper.toml", "--data.path", data, "--train.run_dir", run,
         "--train.epochs", "3", "--data.batch_size", "128", "--optim.dense_lr", "1e-2")
    summary = json.loads((run / "summary.json").read_text())
    for task in ("y1", "y2"):
        metrics = summary["tasks"][task]
        assert set(metrics) == {"rmse", "label_mean", "pred_mean"}
        # they reached 0.39 and 0.36 of the labels' standard deviation, the RMSE of predicting
        # their mean
        assert metrics["rmse"] < 0.55 * math.sqrt(var[task]), (task, metrics, var[task])


def test_each_epoch_feeds_its_own_rows_in_order_when_read_ahead(tiny_data):
    """The next epoch's reader workers start before the current epoch ends: the feed still hands
    out every epoch's batches exactly as that epoch's reader alone yields them, in segments
    that end at the trainer's boundaries and at epoch ends, and ends at the last epoch."""
    from app.config import load_config
    from app.data.loader import iter_batches
    from app.data.order import Position
    from app.distributed import Env
    from app.feed import EpochFeed, split_data
    from app.sharded import resolve_columns
    from app.train import next_boundary

    cfg = load_config("configs/debug.toml", ["--data.path", str(tiny_data)])
    env = Env(0, 1, 0, 1, torch.device("cpu"))
    data = split_data(cfg, env, resolve_columns(cfg), cfg.data.train_split, train=True)
    want = []
    for epoch in range(3):
        data.set_position(Position(epoch))
        want.append([b.row_ids.tolist() for b in iter_batches(data, 0, pin_memory=False)])
    feed = EpochFeed(split_data(cfg, env, resolve_columns(cfg), cfg.data.train_split, train=True), Position(),
                     step=0, epochs=3, max_steps=0, num_workers=2, pin_memory=False)
    assert feed.total == 3 * len(data)
    seen, ahead, step, segments = [[], [], []], [None] * 3, 0, 0
    while step < feed.total:
        epoch = feed.position.epoch
        segment = feed.segment(next_boundary(step, feed.total, 7) - step)
        for batch in segment:
            seen[epoch].append(batch.row_ids.tolist())
            step += 1
            if feed.reading_ahead and ahead[epoch] is None:
                ahead[epoch] = len(seen[epoch])
        feed.done(segment)
        segments += 1
    assert seen == want
    assert feed.position == Position(3)
    assert segments > 3 * len(data) // 7  # segments end at the boundaries and at epoch ends
    # the next epoch's readers started inside epochs 0 and 1; none after the last
    assert ahead[0] <= len(data) and ahead[1] <= len(data) and ahead[2] is None, ahead


def test_training_collects_garbage_every_n_steps_and_scoring_as_usual():
    import gc

    from app.evaluate import scoring
    from app.train import collecting_every

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
            start, frozen = len(collections), gc.get_freeze_count()
            made_early = [[] for _ in range(100)]  # as the first steps' compiled code
            for step in range(1, 51):
                collect(step)
            assert collections[start:] == [1] * 9 + [2]  # steps 5, 10, ..., 45, then all at 50
            # what the first full pass kept stays out of later ones; later passes freeze nothing
            assert gc.get_freeze_count() >= frozen + len(made_early)
            frozen, made_later = gc.get_freeze_count(), [[] for _ in range(100)]
            for step in range(51, 101):
                collect(step)
            assert collections[start:] == ([1] * 9 + [2]) * 2 and gc.get_freeze_count() == frozen
            del made_early, made_later
        assert gc.isenabled()
        with collecting_every(0) as collect:
            assert gc.isenabled()
    finally:
        gc.callbacks.remove(seen)
