"""The trainer's pipeline (splits exchanged on the host, the ids' reordering kept) trains exactly
as TorchRec's `TrainPipelineSparseDist` (splits through the process group, the reordering made
every step), on 2 gloo ranks whose multi-hot batches carry different numbers of ids, with equal
and with unequal batch sizes."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec.distributed import dist_data
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from conftest import free_port  # noqa: E402

from app import pipeline as host_pipeline  # noqa: E402
from app.config import load_config  # noqa: E402
from app.data import Columns, ParquetBatches, Schema, iter_batches  # noqa: E402
from app.synthetic import SyntheticSpec, generate  # noqa: E402
from app.train import Env, build, run_pipeline  # noqa: E402

STEPS = 6


def _train(pipeline_type, cfg, env, columns, data, batch_size: int) -> tuple[list[torch.Tensor], int]:
    """Per-step losses and predictions of STEPS steps, and how many host exchanges ran; checks
    that each distributed KJT's ids per feature (given, not read from the GPU) are its own."""
    dmp, optimizer, _ = build(cfg, env, columns)
    made = []
    exchange, known = host_pipeline.HostSplitsAwaitable.__init__, host_pipeline.KnownLengthsAwaitable._wait_impl

    def counted(self, *args):
        made.append(1)
        exchange(self, *args)

    def checked(self):
        kjt = known(self)
        given = kjt.length_per_key()
        assert given == kjt.lengths().view(len(kjt.keys()), -1).sum(1).tolist(), given
        return kjt

    host_pipeline.HostSplitsAwaitable.__init__ = counted
    host_pipeline.KnownLengthsAwaitable._wait_impl = checked
    try:
        ds = ParquetBatches(data, "train", columns, ("binary", "binary"), batch_size, env.rank, env.world_size,
                            train=True, shuffle=False)
        batches = iter(list(iter_batches(ds, 0, False))[:STEPS])
        outs = [torch.cat([o.losses, o.preds.flatten()])
                for o in run_pipeline(pipeline_type(dmp, optimizer, env.device, execute_all_batches=True),
                                      batches)]
    finally:
        host_pipeline.HostSplitsAwaitable.__init__ = exchange
        host_pipeline.KnownLengthsAwaitable._wait_impl = known
    return outs, len(made)


def worker(rank: int, world: int, port: int, data: str, sharding: str, result: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo")
    cfg = load_config("configs/debug.toml", ["--data.path", data, "--plan.sharding_types", f"['{sharding}']"])
    columns = Columns.resolve(Schema.load(data), list(cfg.tasks), [], [], "test")
    env = Env(rank, world, rank, world, torch.device("cpu"))
    for batch_size in (64, 64 - 16 * rank):  # the same batch size on both ranks, then not
        dist_data._get_recat = host_pipeline._torchrec_recat  # the trainer's pipeline replaces it
        theirs, none = _train(TrainPipelineSparseDist, cfg, env, columns, data, batch_size)
        ours, exchanges = _train(host_pipeline.TrainPipeline, cfg, env, columns, data, batch_size)
        assert none == 0 and len(ours) == len(theirs) == STEPS
        # every batch after the first (which TorchRec distributes while setting up) goes through it
        assert exchanges == STEPS - 1, exchanges
        for step, (a, b) in enumerate(zip(ours, theirs)):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"rank {rank} step {step} batch {batch_size}")
    result[rank] = True
    dist.destroy_process_group()


def test_kept_recat_is_torchrecs_made_once():
    # (ids per rank, ranks, stagger, device, batch size per rank)
    for args in [(2, 4, 1, None, None), (3, 2, 1, None, [64, 64]), (3, 2, 1, None, [64, 48]),
                 (2, 4, 2, None, [8, 8, 6, 8]), (0, 2, 1, None, None)]:
        want = host_pipeline._torchrec_recat(*args)
        got = host_pipeline._kept_recat(*args)
        if want is None:
            assert got is None
            continue
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert host_pipeline._kept_recat(*args) is got  # made once


@pytest.fixture(scope="module")
def multi_hot_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("multi_hot") / "data"
    generate(out, SyntheticSpec(rows={"train": 1024, "test": 256}, cardinalities=[50] * 4, num_dense=3,
                                multi_hot={1: 3.0, 3: 2.0}, row_group_size=256))
    return out


@pytest.mark.parametrize("sharding", ["table_wise", "column_wise"])
def test_host_splits_train_as_torchrec_does(multi_hot_data, sharding):
    manager = mp.Manager()
    result = manager.dict()
    mp.start_processes(worker, args=(2, free_port(), str(multi_hot_data), sharding, result), nprocs=2,
                       join=True, start_method="spawn")
    assert dict(result) == {0: True, 1: True}
