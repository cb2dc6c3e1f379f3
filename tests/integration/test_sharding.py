"""Sharded (2 gloo ranks) against unsharded: same forward, same gradients, same update; and the
parameters every rank holds: the same start, the mean gradient."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from conftest import free_port  # noqa: E402

from app.config import load_config  # noqa: E402
from app.data.loader import iter_batches  # noqa: E402
from app.data.reader import ParquetBatches  # noqa: E402
from app.data.schema import Columns, Schema  # noqa: E402
from app.model import MultiTaskModel, MultiTaskTrain  # noqa: E402
from app.distributed import Env  # noqa: E402
from app.optimizers import broadcast_from_first, GradientMeans  # noqa: E402
from app.sharded import build  # noqa: E402
from torchrec.modules.embedding_modules import EmbeddingBagCollection  # noqa: E402

LR = 0.1


def full_table(name: str, rows: int, dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(rows, dim, generator=g) * 0.1


def set_sharded_tables(dmp: torch.nn.Module) -> None:
    """Writes each table's reference values into whichever shards this rank holds."""
    for key, value in dmp.state_dict().items():
        if not key.endswith(".weight") or "ebc.embedding_bags" not in key:
            continue
        name = key.split(".")[-2]
        shards = value.local_shards() if hasattr(value, "local_shards") else None
        if shards is None:  # replicated (data parallel)
            value.copy_(full_table(name, *value.shape))
            continue
        full = full_table(name, *value.size())
        for shard in shards:
            (r, c), (h, w) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            shard.tensor.copy_(full[r:r + h, c:c + w])


def gather_tables(dmp: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in dmp.state_dict().items():
        if not key.endswith(".weight") or "ebc.embedding_bags" not in key:
            continue
        name = key.split(".")[-2]
        if not hasattr(value, "local_shards"):
            out[name] = value.detach().clone()
            continue
        full = torch.zeros(value.size())
        for shard in value.local_shards():
            (r, c), (h, w) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            full[r:r + h, c:c + w] = shard.tensor
        dist.all_reduce(full)  # each entry lives on exactly one rank
        out[name] = full
    return out


def worker(rank: int, world: int, port: int, data: str, sharding: str, result: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo")
    cfg = load_config("configs/debug.toml", [
        "--data.path", data, "--plan.sharding_types", f"['{sharding}']",
        "--optim.sparse", "sgd", "--optim.sparse_lr", str(LR), "--optim.dense", "sgd",
        "--optim.dense_lr", str(LR)])
    schema = Schema.load(data)
    columns = Columns.resolve(schema, list(cfg.tasks), [], [], "test")
    env = Env(rank, world, rank, world, torch.device("cpu"))
    dmp, optimizer, plan = build(cfg, env, columns)
    types = {p.sharding_type for m in plan.plan.values() for p in m.values()}
    assert types == {sharding}, types
    # what every rank holds (dense weights, replicated tables) starts out the same everywhere
    for key, value in dmp.state_dict().items():
        if not hasattr(value, "local_shards"):
            gathered = [torch.empty_like(value) for _ in range(world)]
            dist.all_gather(gathered, value.contiguous())
            assert torch.equal(gathered[0], gathered[1]), key
    set_sharded_tables(dmp)

    # the global batch: 2 x 64 rows; this rank's half is rows [64 r, 64 r + 64)
    ds = ParquetBatches(data, "train", columns, ("binary", "binary"), 128, 0, 1, train=True, shuffle=False)
    full = next(iter_batches(ds, 0, False))
    lo, hi = 64 * rank, 64 * rank + 64
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    kjt = full.sparse_features
    mine = type(full)(
        dense=full.dense[lo:hi], labels=full.labels[lo:hi], weights=full.weights[lo:hi],
        row_ids=full.row_ids[lo:hi],
        sparse_features=KeyedJaggedTensor.from_jt_dict(
            {k: type(kjt[k]).from_dense([v for v in kjt[k].to_dense()[lo:hi]]) for k in kjt.keys()}),
    )

    # unsharded reference with the same dense init (seeded) and the same tables
    torch.manual_seed(cfg.train.seed)
    ref_model = MultiTaskModel(columns, cfg.tasks, cfg.model, device="cpu")
    configs = ref_model.sparse.ebc.embedding_bag_configs()
    ref_model.sparse.ebc = EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
    for name, p in ref_model.sparse.ebc.embedding_bags.items():
        p.weight.data.copy_(full_table(name, *p.weight.shape))
    ref = MultiTaskTrain(ref_model, cfg.tasks)

    dmp.train()
    optimizer.zero_grad()
    loss, out = dmp(mine)
    preds = out.preds
    loss.backward()
    ref_loss, ref_out = ref(full)
    ref_preds = ref_out.preds
    ref_loss.backward()
    torch.testing.assert_close(preds, ref_preds[lo:hi], rtol=1e-5, atol=1e-6)

    # dense gradients: each rank's half, until the optimizer averages them into the full
    # batch's gradient; after one step, every table (fused or replicated) and every dense
    # weight equals w - lr * grad of the full batch
    ref_params = dict(ref.named_parameters())
    dense = {n: p for n, p in dmp.named_parameters() if p.grad is not None and ".sparse.ebc." not in n}
    assert dense, "no dense gradients"
    assert not all(torch.allclose(p.grad, ref_params[n].grad, rtol=1e-4, atol=1e-6) for n, p in dense.items())
    optimizer.step()
    for name, p in dense.items():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(p.detach(), ref_params[name].detach() - LR * ref_params[name].grad,
                                   rtol=1e-5, atol=1e-6)
    tables = gather_tables(dmp)
    for name, p in ref_model.sparse.ebc.embedding_bags.items():
        expected = p.weight.detach() - LR * p.weight.grad
        torch.testing.assert_close(tables[name], expected, rtol=1e-5, atol=1e-6)
    result[rank] = True
    dist.destroy_process_group()


@pytest.mark.parametrize("sharding", ["table_wise", "column_wise", "data_parallel"])
def test_sharded_equals_unsharded(tiny_data, sharding):
    result = mp.Manager().dict()
    mp.spawn(worker, args=(2, free_port(), str(tiny_data), sharding, result), nprocs=2)
    assert dict(result) == {0: True, 1: True}


def replicas_worker(rank: int, world: int, port: int, result: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)  # each rank starts from values of its own
    shapes = [((3, 2), torch.float32), ((4,), torch.float64), ((5,), torch.float32), ((2,), torch.float32)]
    params = [torch.nn.Parameter(torch.randn(shape, dtype=dtype)) for shape, dtype in shapes]
    broadcast_from_first(params)
    torch.manual_seed(0)
    for p, (shape, dtype) in zip(params, shapes):
        torch.testing.assert_close(p.detach(), torch.randn(shape, dtype=dtype), rtol=0, atol=0)

    means = GradientMeans(params)
    for used in (4, 3):  # all parameters (the all-reduce starts in the backward), then one left out
        for p in params:
            p.grad = None
        # parameter i's gradient on this rank: (rank + 1) (i + 1) everywhere
        sum((rank + 1) * (i + 1) * p.sum() for i, p in enumerate(params[:used])).backward()
        assert bool(means._pending) == (used == len(params))
        means.wait()
        for i, p in enumerate(params[:used]):  # the mean of (1, 2) x (i + 1)
            torch.testing.assert_close(p.grad, torch.full(p.shape, 1.5 * (i + 1), dtype=p.dtype), rtol=0, atol=0)
        assert all(p.grad is None for p in params[used:])
    result[rank] = True
    dist.destroy_process_group()


def test_replicated_parameters_start_equal_and_step_on_mean_gradients():
    result = mp.Manager().dict()
    mp.spawn(replicas_worker, args=(2, free_port(), result), nprocs=2)
    assert dict(result) == {0: True, 1: True}
