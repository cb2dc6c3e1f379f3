"""Sharded (2 gloo ranks) against unsharded: same forward, same gradients, same update; the same
training over many steps with the configs' optimizers; and the parameters every rank holds: the
same start, the mean gradient."""
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
from app.model import MultiTaskModel, MultiTaskTrain, table_name  # noqa: E402
from app.distributed import Env  # noqa: E402
from app.evaluate import run_pipeline  # noqa: E402
from app.optimizers import broadcast_from_first, GradientMeans  # noqa: E402
from app.pipeline import make_pipeline  # noqa: E402
from app.sharded import build  # noqa: E402
from torchrec.modules.embedding_modules import EmbeddingBagCollection  # noqa: E402
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad  # noqa: E402

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


def join(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo")


def reference_module(cfg, columns: Columns) -> MultiTaskTrain:
    """The unsharded model: the dense init of `build` (seeded alike), the tables of
    `set_sharded_tables`, all on the CPU."""
    torch.manual_seed(cfg.train.seed)
    model = MultiTaskModel(columns, cfg.tasks, cfg.model, device="cpu")
    configs = model.sparse.ebc.embedding_bag_configs()
    model.sparse.ebc = EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
    for name, p in model.sparse.ebc.embedding_bags.items():
        p.weight.data.copy_(full_table(name, *p.weight.shape))
    return MultiTaskTrain(model, cfg.tasks)


def sharded_model(cfg, columns: Columns, sharding: dict[str, str]):
    """`build` on this rank, and its `Env`; checks that the plan shards each table as `sharding`
    says."""
    rank, world = dist.get_rank(), dist.get_world_size()
    env = Env(rank, world, rank, world, torch.device("cpu"), dist.group.WORLD)
    dmp, optimizer, plan = build(cfg, env, columns)
    types = {table: p.sharding_type for m in plan.plan.values() for table, p in m.items()}
    assert types == sharding, types
    return dmp, optimizer, env


def worker(rank: int, world: int, port: int, data: str, sharding: str, result: dict) -> None:
    join(rank, world, port)
    cfg = load_config("configs/debug.toml", [
        "--data.path", data, "--plan.sharding_types", f"['{sharding}']",
        "--optim.sparse", "sgd", "--optim.sparse_lr", str(LR), "--optim.dense", "sgd",
        "--optim.dense_lr", str(LR)])
    schema = Schema.load(data)
    columns = Columns.resolve(schema, list(cfg.tasks), [], [], "test")
    dmp, optimizer, _ = sharded_model(cfg, columns, {table_name(c): sharding for c in columns.categorical})
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

    ref = reference_module(cfg, columns)

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
    for name, p in ref.model.sparse.ebc.embedding_bags.items():
        expected = p.weight.detach() - LR * p.weight.grad
        torch.testing.assert_close(tables[name], expected, rtol=1e-5, atol=1e-6)
    result[rank] = True
    dist.destroy_process_group()


@pytest.mark.parametrize("sharding", ["table_wise", "column_wise", "data_parallel"])
def test_sharded_equals_unsharded(tiny_data, sharding):
    result = mp.Manager().dict()
    mp.spawn(worker, args=(2, free_port(), str(tiny_data), sharding, result), nprocs=2)
    assert dict(result) == {0: True, 1: True}


STEPS, BATCH = 20, 16  # per rank: 2 x 20 x 16 = 640 of multi_hot_data's 1024 rows
# one plan, both kinds of sharding, each with a single-hot and a multi-hot column
SHARDING = {"c0": "table_wise", "c1": "table_wise", "c2": "column_wise", "c3": "column_wise"}
# float32 rounding reached 6e-8 (predictions) and 2.4e-7 (tables that moved by up to 1.4) in 24
# steps; a wrong learning rate, eps or gradient scale is off by 1e-3 and more
RTOL, ATOL = 1e-5, 1e-6


def training_worker(rank: int, world: int, port: int, data: str, result: dict) -> None:
    """STEPS steps of the trainer's pipeline against the unsharded model stepping on the mean loss
    of both ranks' batches, each with the optimizer the sharded one gives it."""
    join(rank, world, port)
    flags = [f for c, kind in SHARDING.items() for f in (f"--plan.tables.{c}.sharding_types", f"['{kind}']")]
    cfg = load_config("configs/debug.toml", ["--data.path", data, "--data.batch_size", str(BATCH), *flags])
    assert (cfg.optim.sparse, cfg.optim.dense) == ("rowwise_adagrad", "adam")  # those of every shipped config
    columns = Columns.resolve(Schema.load(data), list(cfg.tasks), [], [], "test")
    assert set(columns.multi_hot) == {"c1", "c3"}
    dmp, optimizer, env = sharded_model(cfg, columns, {table_name(c): kind for c, kind in SHARDING.items()})
    set_sharded_tables(dmp)
    batches = [list(iter_batches(ParquetBatches(data, "train", columns, ("binary", "binary"), BATCH, r, world,
                                                train=True, shuffle=False), 0, False))[:STEPS]
               for r in range(world)]
    outs = list(run_pipeline(make_pipeline(cfg.train.pipeline, dmp, optimizer, env), iter(batches[rank])))
    assert len(outs) == STEPS

    ref = reference_module(cfg, columns)
    params = dict(ref.named_parameters())
    tables = [p for n, p in params.items() if ".sparse.ebc." in n]
    optimizers = [RowWiseAdagrad(tables, lr=cfg.optim.sparse_lr, eps=1e-8),  # FBGEMM's eps
                  torch.optim.Adam([p for p in params.values() if all(p is not t for t in tables)],
                                   lr=cfg.optim.dense_lr)]
    for step in range(STEPS):
        for o in optimizers:
            o.zero_grad()
        steps = [ref(b[step]) for b in batches]
        (sum(loss for loss, _ in steps) / world).backward()  # equal batches: the mean of the ranks' losses
        for o in optimizers:
            o.step()
        torch.testing.assert_close(outs[step].preds, steps[rank][1].preds, rtol=RTOL, atol=ATOL,
                                   msg=f"rank {rank}, step {step}")
    for name, p in dmp.named_parameters():
        if ".sparse.ebc." not in name:
            torch.testing.assert_close(p.detach(), params[name].detach(), rtol=RTOL, atol=ATOL, msg=name)
    for name, table in gather_tables(dmp).items():
        assert not torch.allclose(table, full_table(name, *table.shape), atol=0.1), f"{name} did not train"
        torch.testing.assert_close(table, ref.model.sparse.ebc.embedding_bags[name].weight.detach(),
                                   rtol=RTOL, atol=ATOL, msg=name)
    result[rank] = True
    dist.destroy_process_group()


def test_sharded_trains_as_unsharded_over_many_steps(multi_hot_data):
    result = mp.Manager().dict()
    mp.spawn(training_worker, args=(2, free_port(), str(multi_hot_data), result), nprocs=2)
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
