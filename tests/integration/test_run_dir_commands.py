"""Nothing lost, nothing run, through the commands users type: crafted or damaged checkpoints
are refused in one line without running anything, a run directory keeps what it holds, a
resume needs the config it was trained with, bad input found mid-run ends with a checkpoint,
skipped rows are counted and bounded, early stopping keeps the best checkpoint."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import mmoe, train_args


def one_line_error(proc) -> str:
    """The command failed with exactly one line on stderr that starts with 'error:'."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[-1]


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A finished 6-step run with checkpoints at steps 2, 4 and 6."""
    run = tmp_path_factory.mktemp("trained") / "run"
    mmoe(*train_args(tiny_data, run, "--train.max_steps", "6", "--train.checkpoint_every", "2"))
    return run


def copy_run(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


class Payload:
    def __reduce__(self):
        return os.system, ("touch payload-ran",)


def test_a_crafted_metadata_file_runs_nothing(tiny_data, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    step = run / "checkpoints/step_6"
    (step / ".metadata").write_bytes(pickle.dumps(Payload()))
    line = one_line_error(mmoe("eval", "--checkpoint", run, check=False))
    assert "step_6/.metadata: its contents differ from the checksum written at save" in line
    # a crafter who also rewrites the checksums gets no further
    sums = json.loads((step / "checksums.json").read_text())
    sums[".metadata"] = hashlib.sha256((step / ".metadata").read_bytes()).hexdigest()
    (step / "checksums.json").write_text(json.dumps(sums))
    for command in (["eval", "--checkpoint", run], ["predict", "--checkpoint", run, "--out", tmp_path / "p"],
                    ["export", run, "--out", tmp_path / "x"], train_args(tiny_data, run, "--train.max_steps", "8")):
        line = one_line_error(mmoe(*command, check=False))
        assert ".metadata: not loaded (it refers to posix.system, which checkpoint metadata never holds)" in line
    assert not (tmp_path / "payload-ran").exists() and not os.path.exists("payload-ran")


@pytest.mark.parametrize("damage,named", [("overwrite", "__0_0.distcp"), ("delete", "__0_0.distcp"),
                                          ("cut", ".metadata")])
def test_a_damaged_checkpoint_is_refused_naming_the_file(trained, tmp_path, damage, named):
    run = copy_run(trained, tmp_path)
    target = run / "checkpoints/step_6" / named
    data = target.read_bytes()
    if damage == "overwrite":  # same size, 4 KiB in the middle replaced
        middle = len(data) // 2
        target.write_bytes(data[:middle] + np.random.default_rng(0).bytes(4096) + data[middle + 4096:])
    elif damage == "delete":
        target.unlink()
    else:
        target.write_bytes(data[:len(data) // 2])
    line = one_line_error(mmoe("predict", "--checkpoint", run, "--out", tmp_path / "p", check=False))
    assert f"step_6/{named}: " in line and not (tmp_path / "p").exists()


def test_running_a_finished_run_again_changes_nothing(tiny_data, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    before = {name: (run / name).read_bytes() for name in ("summary.json", "metrics.jsonl")}
    proc = mmoe(*train_args(tiny_data, run, "--train.max_steps", "6", "--train.checkpoint_every", "2"))
    assert "finished at step 6: nothing to train" in proc.stdout
    assert {name: (run / name).read_bytes() for name in before} == before
    assert json.loads(before["summary.json"])["tasks"]["click"]["auc"] > 0.5


def test_starting_over_in_a_used_run_dir_needs_overwrite(tiny_data, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    again = train_args(tiny_data, run, "--train.max_steps", "4", "--train.checkpoint_every", "2",
                       "--train.resume", "false")
    line = one_line_error(mmoe(*again, check=False))
    assert "holds checkpoints (latest step_6) and train.resume is false" in line and "--train.overwrite" in line
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_2", "step_4", "step_6"]
    assert (run / "checkpoints/latest").read_text().strip() == "step_6"
    mmoe(*again, "--train.overwrite", "true")
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_2", "step_4"]
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


def test_resume_refuses_another_model_or_optimizer(tiny_data, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    common = train_args(tiny_data, run, "--train.max_steps", "8")
    line = one_line_error(mmoe(*common, "--model.num_experts", "3", "--model.activation", "gelu", check=False))
    assert "resuming needs the config it was trained with, but model.activation: 'relu' -> 'gelu'; " \
           "model.num_experts: 2 -> 3; put them back" in line
    line = one_line_error(mmoe(*common, "--optim.dense", "sgd", check=False))
    assert "optim.dense: 'adam' -> 'sgd'" in line
    mmoe(*common, "--train.log_every", "2")  # how long and how often may change
    assert json.loads((run / "summary.json").read_text())["steps"] == 8


def write_with_nan(source, target, group):
    """`source`'s rows with a NaN in d0 of row group `group`, same row groups."""
    table = pq.read_table(source)
    meta = pq.ParquetFile(source).metadata
    size = meta.row_group(0).num_rows
    d0 = table.column("d0").to_numpy().copy()
    d0[group * size] = np.nan
    pq.write_table(table.set_column(table.schema.get_field_index("d0"), "d0", pa.array(d0)), target,
                   row_group_size=size)


@pytest.mark.parametrize("ranks", [1, 2])
def test_bad_rows_late_in_an_epoch_end_with_a_checkpoint(tiny_data, tmp_path, ranks):
    """The last row group read holds a NaN: the run saves where it got to, stops with the one-line
    error (every rank at the same step), and once the data is fixed resumes to the same end as a
    run that never saw the NaN."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    last = sorted((data / "train").glob("*.parquet"))[-1]
    clean = tmp_path / "clean.parquet"
    shutil.copy(last, clean)
    groups = pq.ParquetFile(last).metadata.num_row_groups
    write_with_nan(clean, last, groups - 1)
    common = ["--data.shuffle", "false", "--data.batch_size", "128", "--train.epochs", "1"]
    proc = mmoe(*train_args(data, tmp_path / "run", *common), ranks=ranks, check=False)
    assert proc.returncode != 0
    assert f"{last}: row group {groups - 1}, column 'd0'" in proc.stderr and "NaN" in proc.stderr
    state = json.loads((tmp_path / "run/checkpoints/latest").parent.joinpath(
        (tmp_path / "run/checkpoints/latest").read_text().strip(), "train_state.json").read_text())
    assert 0 < state["step"] < 4000 // (128 * ranks)  # the work up to the bad group is kept
    shutil.copy(clean, last)
    mmoe(*train_args(data, tmp_path / "run", *common), ranks=ranks)
    mmoe(*train_args(tiny_data, tmp_path / "straight", *common), ranks=ranks)
    resumed, straight = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("run", "straight"))
    assert resumed["steps"] == straight["steps"] and resumed["tasks"] == straight["tasks"]


def test_skipped_rows_are_counted_and_bounded(tiny_data, tmp_path):
    """A schema whose cardinalities are too small zero-weights most rows: counted in the log
    and summary, a warning past 1%, and a stop past data.max_skipped_fraction."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    schema = json.loads((data / "schema.json").read_text())
    schema["categorical"]["c0"]["cardinality"] = 30  # ids go to 49 (skewed low): about 16% of the rows
    (data / "schema.json").write_text(json.dumps(schema))
    skip = ["--data.on_bad_rows", "skip", "--train.max_steps", "20"]
    proc = mmoe(*train_args(data, tmp_path / "stopped", *skip), check=False)
    line = one_line_error(proc)
    assert "train rows read so far were skipped as bad input, more than data.max_skipped_fraction 0.05" \
        in line and (tmp_path / "stopped/checkpoints/latest").exists()
    proc = mmoe(*train_args(data, tmp_path / "run", *skip, "--data.max_skipped_fraction", "0.5"))
    assert proc.stderr.count("of the train rows read so far were skipped as bad input") == 1  # warned once
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert 0.02 < summary["train_skipped_fraction"] < 0.5 and summary["train_skipped_rows"] > 0
    assert summary["skipped_rows"] > 0  # eval rows too
    logged = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert logged[-2]["train/skipped_rows"] == summary["train_skipped_rows"]


def test_early_stop_keeps_the_best_checkpoint(tiny_data, tmp_path):
    run = tmp_path / "run"
    mmoe(*train_args(tiny_data, run, "--train.epochs", "30", "--train.eval_every", "8", "--train.early_stop",
                     "click/logloss", "--train.patience", "2", "--optim.dense_lr", "0.05",
                     "--train.keep_checkpoints", "1"))
    summary = json.loads((run / "summary.json").read_text())
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if "eval/click/logloss" in line]
    best = min(evals, key=lambda r: r["eval/click/logloss"])
    assert summary["early_stopped"] and summary["steps"] < 30 * 16  # it stopped early
    assert summary["best"]["step"] == best["step"] == evals[-3]["step"]  # then two worse ones
    assert summary["tasks"]["click"]["logloss"] == best["eval/click/logloss"]
    assert (run / "checkpoints/best").read_text().strip() == f"step_{best['step']}"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == \
        sorted({f"step_{best['step']}", f"step_{summary['steps']}"})  # keep 1, and the best
    assert "finished at step" in mmoe(*train_args(tiny_data, run, "--train.epochs", "30", "--train.eval_every",
                                                  "8", "--train.early_stop", "click/logloss", "--train.patience",
                                                  "2", "--optim.dense_lr", "0.05",
                                                  "--train.keep_checkpoints", "1")).stdout
    scored = json.loads(mmoe("eval", "--checkpoint", run, "--split", "test").stdout)
    assert scored["test/click/logloss"] == pytest.approx(best["eval/click/logloss"], rel=1e-6)
