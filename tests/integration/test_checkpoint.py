"""Checkpoints: exact resume, resharded resume, crash during a save, SIGKILL under torchrun."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import pyarrow.parquet as pq
import pytest
import torch

from conftest import PY, free_port, mmoe, train_args


def scores(path) -> torch.Tensor:
    table = pq.read_table(path)
    return torch.tensor([table.column(c).to_pylist() for c in table.column_names])


def test_stop_and_resume_equals_straight_run(tiny_data, tmp_path):
    """With reader workers, which the resumed run starts again at the saved position."""
    common = ["--train.checkpoint_every", "10", "--model.dropout", "0.1", "--data.batch_size", "128",
              "--data.num_workers", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    mmoe(*train_args(tiny_data, straight, *common, "--train.max_steps", "40"))
    first = mmoe(*train_args(tiny_data, resumed, *common, "--train.max_steps", "20"))
    assert "resuming" not in first.stdout
    second = mmoe(*train_args(tiny_data, resumed, *common, "--train.max_steps", "40"))
    assert "resuming from" in second.stdout and "(step 20;" in second.stdout
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((resumed / "summary.json").read_text())
    assert a["steps"] == b["steps"] == 40
    assert a["tasks"] == b["tasks"], "resumed metrics differ from the straight run's"
    for run in (straight, resumed):
        mmoe("predict", "--checkpoint", run, "--out", run / "pred", "--merge")
    assert torch.equal(scores(straight / "pred/predictions.parquet"),
                       scores(resumed / "pred/predictions.parquet")), "weights differ bitwise"


@pytest.mark.parametrize("saved,loaded,sharding", [(2, 1, "table_wise"), (1, 2, "column_wise")])
def test_resume_on_another_world_size_and_plan(tiny_data, tmp_path, saved, loaded, sharding):
    run = tmp_path / "run"
    mmoe(*train_args(tiny_data, run, "--train.max_steps", "10", "--plan.sharding_types", "['table_wise']"),
         ranks=saved)
    mmoe("predict", "--checkpoint", run, "--out", tmp_path / "a", "--merge", ranks=saved)
    mmoe("predict", "--checkpoint", run, "--out", tmp_path / "b", "--merge",
         "--plan.sharding_types", f"['{sharding}']", ranks=loaded)
    a, b = scores(tmp_path / "a/predictions.parquet"), scores(tmp_path / "b/predictions.parquet")
    assert a.shape == b.shape and a.shape[1] == 1000
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and training continues from it on the new world size
    mmoe(*train_args(tiny_data, run, "--train.max_steps", "14", "--plan.sharding_types", f"['{sharding}']"),
         ranks=loaded)
    assert json.loads((run / "summary.json").read_text())["world_size"] == loaded


def two_steps_through(code: str, data, run) -> subprocess.CompletedProcess:
    """`python -c code` with the arguments of a 2-step training run on one rank."""
    proc = subprocess.run([PY, "-c", code, *map(str, train_args(data, run, "--train.max_steps", "2"))],
                          capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_a_finished_command_has_left_its_process_group(tiny_data, tmp_path):
    # left to the interpreter's exit, gloo's threads once aborted a 2-rank predict that had
    # written its output (exit code -6)
    proc = two_steps_through("import sys, torch.distributed as dist; from app.cli import main; main(sys.argv[1:]); "
                             "print('joined' if dist.is_initialized() else 'left')", tiny_data, tmp_path)
    assert proc.stdout.splitlines()[-1] == "left"


def test_the_program_ends_a_rank_without_finalizing_the_interpreter(tiny_data, tmp_path):
    # where gloo's threads may still need the GIL (8 `mmoe eval` runs in 53 on two ranks aborted, -6);
    # its output is flushed first
    proc = two_steps_through("import atexit; atexit.register(print, 'finalized'); from app.cli import program; "
                             "print('before', end=''); program()", tiny_data, tmp_path)
    assert proc.stdout.startswith("before") and proc.stdout.splitlines()[-1].startswith("done: 2 steps")
    assert "finalized" not in proc.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2


def test_interrupted_save_leaves_latest_on_the_previous_one(tmp_path, one_rank_group, monkeypatch):
    from app import checkpoint

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    checkpoint.save(tmp_path, 5, model, optimizer, {"step": 5}, {"config.json": "{}"}, keep=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def crash(state, checkpoint_id):  # writes part of the files, then the process "dies"
        (tmp_path / "checkpoints/.step_9.tmp/__0_0.distcp").write_bytes(b"partial")
        raise RuntimeError("killed mid-save")

    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setattr(checkpoint.dcp, "save", crash)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        checkpoint.save(tmp_path, 9, model, optimizer, {"step": 9}, {}, keep=3)
    monkeypatch.undo()
    assert checkpoint.latest(tmp_path) == tmp_path / "checkpoints/step_5"
    state = checkpoint.load(checkpoint.latest(tmp_path), model, optimizer)
    assert state == {"step": 5}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_keeps_the_newest_checkpoints(tmp_path, one_rank_group):
    from app import checkpoint

    model = torch.nn.Linear(2, 1)
    for step in range(1, 6):
        checkpoint.save(tmp_path, step, model, None, {"step": step}, {}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_4", "step_5"]
    assert checkpoint.latest(tmp_path).name == "step_5"


def test_a_restarted_torchrun_attempt_resumes_even_with_resume_false(tmp_path, one_rank_group, monkeypatch):
    """`train.resume = false` (or `overwrite`) asks to start over once; an attempt torchrun
    restarts after a failure continues its own job instead of starting at step 0 again."""
    from app import checkpoint
    from app.checkpoint import CheckpointError
    from app.run_dir import Checkpointer

    model = torch.nn.Linear(2, 1)
    config = {"model": {"head": "mmoe"}}
    checkpoint.save(tmp_path, 7, model, None, {"step": 7}, {"config.json": json.dumps(config)}, keep=2)
    first = Checkpointer(tmp_path, keep=2, is_main=True)
    with pytest.raises(CheckpointError, match="train.resume is false"):
        first.resume(config, model, None, resume=False, overwrite=False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    for overwrite in (False, True):
        assert first.resume(config, model, None, resume=False, overwrite=overwrite) == {"step": 7}
    assert checkpoint.latest(tmp_path).name == "step_7"


def test_sigkill_under_torchrun_restarts_from_checkpoint(tiny_data, tmp_path):
    """Through the launcher users run; the agent's store outlives the restart (stale keys of
    the first attempt once made restarted ranks fail or hang while connecting)."""
    common = ["--train.checkpoint_every", "8", "--data.batch_size", "64", "--train.epochs", "2"]
    mmoe(*train_args(tiny_data, tmp_path / "clean", *common), ranks=2)
    run = tmp_path / "killed"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": PY, "NPROC_PER_NODE": "2",
           "MAX_RESTARTS": "2", "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}"}
    with open(tmp_path / "output.txt", "w+") as output:  # a file: a full pipe would stall the ranks
        agent = subprocess.Popen(["bash", "launch/torchrun.sh", *map(str, train_args(tiny_data, run, *common)[1:])],
                                 stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            _kill_one_rank_and_compare(agent, run, tmp_path, output)
        finally:  # never leave the agent or its ranks behind
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()


KILL_SEED = 26  # draws the step and the rank to kill: a failure repeats with the same draw


def _kill_one_rank_and_compare(agent, run, tmp_path, output):
    rng = random.Random(KILL_SEED)
    kill_at = rng.randint(10, 45)
    deadline, killed = time.time() + 300, None
    while killed is None and time.time() < deadline and agent.poll() is None:
        log = run / "metrics.jsonl"
        steps = [json.loads(line)["step"] for line in log.read_text().splitlines()] if log.exists() else []
        if steps and max(steps) >= kill_at:
            workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True)
            victim = rng.choice(sorted(map(int, workers.stdout.split())))
            os.kill(victim, signal.SIGKILL)
            killed = (victim, max(steps))
        time.sleep(0.05)
    agent.wait(timeout=600)
    output.seek(0)
    output = output.read()
    assert killed, f"the run ended before step {kill_at}:\n{output[-3000:]}"
    assert agent.returncode == 0, output[-3000:]
    assert "resuming from" in output
    clean = json.loads((tmp_path / "clean/summary.json").read_text())
    after = json.loads((run / "summary.json").read_text())
    assert after["steps"] == clean["steps"]
    assert after["tasks"] == clean["tasks"], f"killed at step {killed[1]}: metrics differ"
