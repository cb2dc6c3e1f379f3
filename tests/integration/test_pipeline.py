"""The trainer's pipeline (splits exchanged on the host, the ids' reordering kept; on one rank no
exchange at all) trains exactly as TorchRec's `TrainPipelineSparseDist` (splits through the
process group, the reordering made every step), on 1 and 2 gloo ranks whose multi-hot batches
carry different numbers of ids, with equal and with unequal batch sizes; and it leaves
TorchRec's module functions as they were."""
from __future__ import annotations

import functools
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
from app.data.loader import iter_batches  # noqa: E402
from app.data.reader import ParquetBatches  # noqa: E402
from app.data.schema import Columns, Schema  # noqa: E402
from app.distributed import Env  # noqa: E402
from app.evaluate import run_pipeline  # noqa: E402
from app.sharded import build  # noqa: E402

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
    recat = dist_data._get_recat
    cfg = load_config("configs/debug.toml", ["--data.path", data, "--plan.sharding_types", f"['{sharding}']"])
    columns = Columns.resolve(Schema.load(data), list(cfg.tasks), [], [], "test")
    env = Env(rank, world, rank, world, torch.device("cpu"), None if world == 1 else dist.group.WORLD)
    for batch_size in (64, 64 - 16 * rank):  # the same batch size on both ranks, then not
        theirs, none = _train(TrainPipelineSparseDist, cfg, env, columns, data, batch_size)
        ours, exchanges = _train(functools.partial(host_pipeline.HostSplitsPipeline, host_group=env.host_group),
                                 cfg, env, columns, data, batch_size)
        assert none == 0 and len(ours) == len(theirs) == STEPS
        # every batch after the first (which TorchRec distributes while setting up) goes through
        # it; one rank exchanges nothing
        assert exchanges == (STEPS - 1 if world > 1 else 0), exchanges
        assert dist_data._get_recat is recat  # patched only while TorchRec makes a reordering
        for step, (a, b) in enumerate(zip(ours, theirs)):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"rank {rank} step {step} batch {batch_size}")
    result[rank] = True
    dist.destroy_process_group()


def test_kept_recat_is_torchrecs_made_once():
    # (ids per rank, ranks, stagger, device, batch size per rank)
    for args in [(2, 4, 1, None, None), (3, 2, 1, None, [64, 64]), (3, 2, 1, None, [64, 48]),
                 (2, 4, 2, None, [8, 8, 6, 8]), (0, 2, 1, None, None)]:
        want = host_pipeline._torchrec_recat(*args)
        got = host_pipeline.kept_recat(*args)
        if want is None:
            assert got is None
            continue
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert host_pipeline.kept_recat(*args) is got  # made once


@pytest.mark.parametrize("world,sharding", [(2, "table_wise"), (2, "column_wise"), (1, "table_wise")])
def test_host_splits_train_as_torchrec_does(multi_hot_data, world, sharding):
    manager = mp.Manager()
    result = manager.dict()
    mp.start_processes(worker, args=(world, free_port(), str(multi_hot_data), sharding, result), nprocs=world,
                       join=True, start_method="spawn")
    assert dict(result) == {r: True for r in range(world)}


def test_make_pipeline_falls_back_to_torchrecs_on_other_releases(monkeypatch, caplog):
    import torchrec

    from app.pipeline import make_pipeline

    class Model(torch.nn.Module):
        def forward(self, batch):
            return batch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model, opt = Model(), torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        cpu = Env(0, 1, 0, 1, torch.device("cpu"))
        assert type(make_pipeline("host", model, opt, cpu)) is host_pipeline.HostSplitsPipeline
        assert type(make_pipeline("torchrec", model, opt, cpu)) is TrainPipelineSparseDist
        monkeypatch.setattr(torchrec, "__version__", "9.0.0")
        assert type(make_pipeline("host", model, opt, cpu)) is TrainPipelineSparseDist
        assert "this is 9.0.0, so TorchRec's own pipeline runs instead" in caplog.text
    finally:
        dist.destroy_process_group()
