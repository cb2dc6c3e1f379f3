"""Run directories and checkpoints kept whole: pointers that stay inside the run, pruning that
keeps what `latest` and `best` name, configs compared on resume, metadata read without
running code, early stopping."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from app import checkpoint
from app.checkpoint import CheckpointError
from app.config import load_config
from app.early_stop import EarlyStop
from app.run_dir import config_changes


def fake_checkpoints(run, steps, latest):
    for s in steps:
        (run / "checkpoints" / f"step_{s}").mkdir(parents=True)
        (run / "checkpoints" / f"step_{s}" / checkpoint.STATE).write_text("{}")
    (run / "checkpoints" / checkpoint.LATEST).write_text(f"step_{latest}\n")


def kept(run):
    return sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*"))


def test_pruning_keeps_latest_best_and_anything_newer(tmp_path):
    fake_checkpoints(tmp_path, [2, 4, 6, 8, 10, 12], latest=8)
    checkpoint.prune(tmp_path, keep=2)
    assert kept(tmp_path) == [6, 8, 10, 12]  # newest 2 up to latest; 10 and 12 are not ours
    checkpoint.set_pointer(tmp_path, checkpoint.BEST, tmp_path / "checkpoints/step_6")
    checkpoint.set_pointer(tmp_path, checkpoint.LATEST, tmp_path / "checkpoints/step_12")
    checkpoint.prune(tmp_path, keep=1)
    assert kept(tmp_path) == [6, 12]
    checkpoint.prune(tmp_path, keep=0)  # 0 keeps all
    assert kept(tmp_path) == [6, 12]


@pytest.mark.parametrize("text,message", [("../../elsewhere", "not a step_<N> checkpoint"),
                                          ("/tmp/step_1", "not a step_<N> checkpoint"),
                                          ("step_9", "names step_9, which is missing or incomplete")])
def test_latest_must_name_a_complete_checkpoint_of_the_run(tmp_path, text, message):
    fake_checkpoints(tmp_path, [2], latest=2)
    (tmp_path / "checkpoints" / checkpoint.LATEST).write_text(text)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.latest(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.resolve(tmp_path)


def test_resume_compares_model_optimizer_and_order_keys_only():
    base = load_config("configs/debug.toml").to_dict()
    allowed = load_config("configs/debug.toml", ["--train.epochs", "9", "--train.log_every", "3",
                                                 "--data.num_workers", "2", "--plan.sharding_types",
                                                 "['column_wise']", "--model.precision", "bf16"]).to_dict()
    assert config_changes(base, allowed) == []
    changed = load_config("configs/debug.toml", ["--model.num_experts", "3", "--model.activation", "gelu",
                                                 "--optim.dense", "sgd", "--train.seed", "1",
                                                 "--tasks.click.weight", "2"]).to_dict()
    assert config_changes(base, changed) == [
        "model.activation: 'relu' -> 'gelu'", "model.num_experts: 2 -> 3", "optim.dense: 'adam' -> 'sgd'",
        "tasks.click.weight: 1.0 -> 2.0", "train.seed: 0 -> 1"]


class Payload:
    def __reduce__(self):
        return os.system, ("touch payload-ran",)


def test_checkpoint_metadata_is_read_without_running_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        state = {"model": {"w": torch.arange(6.0).view(2, 3)}}
        dcp.save(state, checkpoint_id=str(tmp_path / "ckpt"))
        names = {p.name for p in (tmp_path / "ckpt").iterdir()}
        metadata = checkpoint.read_metadata(tmp_path / "ckpt", names)
        target = {"model": {"w": torch.zeros(2, 3)}}
        dcp.load(target, storage_reader=checkpoint.TrustedReader(tmp_path / "ckpt", metadata))
        assert torch.equal(target["model"]["w"], state["model"]["w"])  # the real thing loads
        with pytest.raises(CheckpointError, match=r"points at '__0_0.distcp', which is not a file of this"):
            checkpoint.read_metadata(tmp_path / "ckpt", names - {"__0_0.distcp"})
        (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(Payload()))
        with pytest.raises(CheckpointError, match=r"\.metadata: not loaded \(it refers to posix.system"):
            checkpoint.read_metadata(tmp_path / "ckpt", names)
        assert not (tmp_path / "payload-ran").exists()
    finally:
        dist.destroy_process_group()


def test_early_stop_keeps_the_best_and_stops_after_patience():
    stop = EarlyStop("click/logloss", patience=2)
    assert stop.update(10, {"eval/click/logloss": 0.5})
    assert stop.update(20, {"eval/click/logloss": 0.4})
    assert not stop.update(30, {"eval/click/logloss": 0.45}) and not stop.stopped
    assert not stop.update(40, {"eval/click/logloss": 0.4}) and stop.stopped  # equal is no better
    assert (stop.step, stop.value) == (20, 0.4)
    resumed = EarlyStop("click/logloss", 2, json.loads(json.dumps(stop.state())))
    assert (resumed.step, resumed.value, resumed.stopped) == (20, 0.4, True)
    higher = EarlyStop("mean_auc", patience=1)
    assert higher.update(5, {"eval/mean_auc": 0.7}) and higher.update(6, {"eval/mean_auc": 0.71})
    assert not higher.update(7, {"eval/mean_auc": 0.69}) and higher.stopped
    assert not EarlyStop("", 3).update(5, {})  # off
