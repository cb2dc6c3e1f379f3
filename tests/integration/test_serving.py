"""`mmoe export`: the artifact scores like `mmoe predict`, loads with torch alone, does not
depend on the world size or plan a run trained on, and bad input stops it with one line."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from typing import Iterator

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from app import checkpoint
from app.artifact import FORMAT, Artifact, ArtifactError
from app.cli import main
from app.config import load_config
from app.data.batch import Batch
from app.data.loader import iter_batches
from app.distributed import Env
from app.export import export
from app.feed import split_data
from app.sharded import build, resolve_columns
from conftest import mmoe, train_args
from test_checkpoint import scores

# What a server runs: torch, and none of this package, torchrec or fbgemm_gpu (importing any of
# them fails). argv: inputs.pt, out.pt, artifact folders.
TORCH_ONLY = """
import json, sys
sys.modules.update(app=None, torchrec=None, fbgemm_gpu=None)
import torch
batches = torch.load(sys.argv[1])
out = {}
for folder in sys.argv[3:]:
    meta = json.load(open(folder + "/meta.json"))
    model = torch.export.load(folder + "/model.pt2").module()
    with torch.inference_mode():
        out[meta["quantize"]] = torch.cat([model(b["dense"], b["values"], b["lengths"]) for b in batches])
torch.save(out, sys.argv[2])
"""


def read_test_split(config_json) -> Iterator[Batch]:
    """The test split, read by the trainer's reader as the run's config says."""
    cfg = load_config(config_json)
    data = split_data(cfg, Env(0, 1, 0, 1, torch.device("cpu")), resolve_columns(cfg), "test", train=False)
    return iter_batches(data, 0, pin_memory=False)


def as_tensors(batch: Batch) -> dict[str, torch.Tensor]:
    """A reader batch's inputs to the artifact, labels and row ids, copied: they are views of one
    buffer, which torch.save would not store apart."""
    features = batch.sparse_features
    return {"dense": batch.dense.clone(), "values": features.values().clone(), "lengths": features.lengths().clone(),
            "labels": batch.labels.clone(), "row_ids": batch.row_ids.clone()}


def test_census_artifact_scores_as_predict_without_this_package(census, tmp_path):
    """A small census head (the checks do not depend on its size), 40 steps."""
    run = tmp_path / "run"
    mmoe("train", "--config", "configs/census_mmoe.toml", "--data.path", census[1], "--train.run_dir", run,
         "--train.max_steps", "40", "--train.tensorboard", "false", "--model.expert_layers", "[64, 32]",
         "--model.tower_layers", "[16]", "--data.eval_batch_size", "16384")
    mmoe("predict", "--checkpoint", run, "--out", tmp_path / "pred", "--merge")
    for quantize in ("none", "int8"):
        export(run, tmp_path / quantize, quantize)
    batches = [as_tensors(b) for b in read_test_split(tmp_path / "none/config.json")]
    torch.save([{k: b[k] for k in ("dense", "values", "lengths")} for b in batches], tmp_path / "inputs.pt")
    fresh = subprocess.run([sys.executable, "-c", TORCH_ONLY, tmp_path / "inputs.pt", tmp_path / "out.pt",
                            tmp_path / "none", tmp_path / "int8"], capture_output=True, text=True, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")

    expected = scores(tmp_path / "pred/predictions.parquet")  # [row_id + T, rows], in row order
    order = torch.cat([b["row_ids"] for b in batches]).argsort()
    assert torch.equal(expected[0].long(), torch.cat([b["row_ids"] for b in batches])[order])
    assert expected.shape[1] == 99_762
    torch.testing.assert_close(got["none"][order], expected[1:].T, rtol=0, atol=1e-5)

    labels = torch.cat([b["labels"] for b in batches]).long()
    for t in range(2):
        fp32, int8 = (binary_auroc(got[q][:, t], labels[:, t]).item() for q in ("none", "int8"))
        assert fp32 > 0.85 and abs(int8 - fp32) <= 1e-3, (t, fp32, int8)

    # and `mmoe predict --artifact` scores with the same program
    main(["predict", "--artifact", str(tmp_path / "none"), "--out", str(tmp_path / "pred_artifact")])
    torch.testing.assert_close(scores(tmp_path / "pred_artifact/predictions.parquet"), expected, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def two_rank_run(tiny_data, tmp_path_factory):
    """Trained on 2 ranks, each table split by columns over both (dim 256: two 128-wide shards)."""
    run = tmp_path_factory.mktemp("two_ranks") / "run"
    mmoe(*train_args(tiny_data, run, "--train.max_steps", "6", "--model.embedding_dim", "256",
                     "--plan.sharding_types", "['column_wise']"), ranks=2)
    assert "column_wise" in (run / "plan.txt").read_text()
    return run


def resume_on_one_rank(run, out) -> torch.nn.Module:
    """What a 1-rank resume does with the checkpoint (build, load with the optimizer), saved
    again into `out`; returns the model."""
    found = checkpoint.latest(run)
    cfg = load_config(found / "config.json", ["--plan.file", ""])
    dmp, optimizer, _ = build(cfg, Env(0, 1, 0, 1, torch.device("cpu")), resolve_columns(cfg))
    state = checkpoint.load(found, dmp, optimizer)
    checkpoint.save(out, state["step"], dmp, optimizer, state, {"config.json": (found / "config.json").read_text()},
                    keep=1)
    return dmp.eval()


def test_export_of_a_two_rank_run_equals_that_of_its_one_rank_resume(two_rank_run, tmp_path, one_rank_group):
    resumed = resume_on_one_rank(two_rank_run, tmp_path / "one_rank")
    export(two_rank_run, tmp_path / "a")
    export(tmp_path / "one_rank", tmp_path / "b")
    a, b = (torch.export.load(str(tmp_path / x / "model.pt2")).state_dict for x in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and both score as the resumed model does
    batch = next(read_test_split(tmp_path / "a/config.json"))
    with torch.no_grad():
        _, expected = resumed(batch)
    features = batch.sparse_features
    got = Artifact(tmp_path / "a")(batch.dense, features.values(), features.lengths())
    torch.testing.assert_close(got, expected.preds, rtol=0, atol=1e-6)


def one_line_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([*map(str, argv)])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_stops_with_one_line(two_rank_run, tmp_path, capsys):
    err = one_line_error(capsys, "export", tmp_path, "--out", tmp_path / "x")
    assert str(tmp_path) in err and "train first" in err

    # in a process of its own: nothing else on stderr either (warnings are log lines there)
    proc = mmoe("export", two_rank_run, "--out", tmp_path / "x", "--model.embedding_dim", "16", check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "step_6: its tensors do not fit" in proc.stderr and "--model.embedding_dim 16" in proc.stderr
    assert "[50, 256]" in proc.stderr

    edited = tmp_path / "edited"
    shutil.copytree(checkpoint.latest(two_rank_run), edited)
    config = json.loads((edited / "config.json").read_text())
    config["model"]["expert_layers"] = [64, 16]
    (edited / "config.json").write_text(json.dumps(config))
    err = one_line_error(capsys, "export", edited, "--out", tmp_path / "x")  # its config.json no longer its own
    assert f"{edited}/config.json: its contents differ from the checksum" in err

    export(two_rank_run, tmp_path / "art")
    meta = json.loads((tmp_path / "art/meta.json").read_text())
    (tmp_path / "art/meta.json").write_text(json.dumps({**meta, "format": FORMAT + 1}))
    err = one_line_error(capsys, "predict", "--artifact", tmp_path / "art", "--out", tmp_path / "p")
    assert f"artifact format {FORMAT + 1} is newer than this reader's {FORMAT}" in err
    with pytest.raises(ArtifactError, match="missing or not an artifact's meta.json"):
        Artifact(tmp_path / "x")
