"""Shared fixtures and helpers: small synthetic data sets and a trained run, the census data
set, free ports for real gloo ranks, a one-process group, and the `mmoe` command run alone or
under torchrun."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist

from app.sources import census as census_source
from app.sources.synthetic import SyntheticSpec, generate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PY = sys.executable


def mmoe(*args, ranks: int = 1, check: bool = True, extra_env: dict | None = None):
    """Runs `python -m app ...` alone or under torchrun with `ranks` gloo processes."""
    launcher = [PY, "-m", "app"] if ranks == 1 else [
        PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m", "app"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(extra_env or {})}
    proc = subprocess.run([*launcher, *map(str, args)], capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed:\n{proc.stderr[-4000:]}")
    return proc


def train_args(data, run_dir, *more):
    return ["train", "--config", "configs/debug.toml", "--data.path", data, "--train.run_dir", run_dir,
            "--train.log_every", "5", "--train.tensorboard", "false", *more]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """4 categorical (50 ids), 3 dense, tasks click/convert; learnable (best AUC ~0.8)."""
    out = tmp_path_factory.mktemp("tiny") / "data"
    generate(out, SyntheticSpec(rows={"train": 4000, "test": 1000}, cardinalities=[50] * 4,
                                num_dense=3, row_group_size=512, files_per_split=2))
    return out


@pytest.fixture(scope="session")
def multi_hot_data(tmp_path_factory):
    """tiny_data's shape, smaller, with multi-hot columns c1 (3 ids a row on average) and c3 (2)."""
    out = tmp_path_factory.mktemp("multi_hot") / "data"
    generate(out, SyntheticSpec(rows={"train": 1024, "test": 256}, cardinalities=[50] * 4, num_dense=3,
                                multi_hot={1: 3.0, 3: 2.0}, row_group_size=256))
    return out


@pytest.fixture(scope="session")
def mixed_run(tiny_data, tmp_path_factory):
    """debug.toml trained 4 epochs on tiny_data with convert a regression task (squared error on
    its 0/1 label) beside the binary click."""
    run = tmp_path_factory.mktemp("mixed") / "run"
    mmoe(*train_args(tiny_data, run, "--train.epochs", "4", "--tasks.convert.type", "regression"))
    return run


@pytest.fixture(scope="session")
def census(tmp_path_factory):
    """UCI census: the raw tables and the converted data set (downloaded once a session)."""
    root = tmp_path_factory.mktemp("census")
    raw = {split: census_source.read_raw(path) for split, path in census_source.fetch_raw(root).items()}
    census_source.convert(raw, root / "data")
    return raw, root / "data"


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
