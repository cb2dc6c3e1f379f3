"""The sharded model and its optimizers, built the same way for training, scoring and the
benchmarks: the model with its tables on `meta`, the sparse optimizer fused into the tables'
backward, TorchRec's plan, `DistributedModelParallel`, and the dense optimizers."""
from __future__ import annotations

import torch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from app.config import Config
from app.data.layout import load_schema
from app.data.schema import Columns
from app.distributed import Env
from app.model import MultiTaskModel, MultiTaskTrain, table_name
from app.optimizers import DENSE_OPTIMIZERS, SPARSE_OPTIMIZERS, AveragingOptimizer, broadcast_from_first
from app.plan import sharders, training_plan
from app.plan_file import RunPlan


def resolve_columns(cfg: Config) -> Columns:
    schema, where = load_schema(cfg.data.path, (cfg.data.train_split, cfg.data.eval_split),
                                cfg.data.slot_size_array, cfg.data.keys_have_offsets)
    return Columns.resolve(schema, [t.label for t in cfg.tasks.values()], cfg.data.dense,
                           cfg.data.categorical, where=where)


def build(cfg: Config, env: Env, columns: Columns) -> tuple[DistributedModelParallel, AveragingOptimizer, RunPlan]:
    """Model on the device with its tables on `meta`, planned, sharded, with optimizers."""
    torch.manual_seed(cfg.train.seed)  # identical dense init on every rank
    model = MultiTaskModel(columns, cfg.tasks, cfg.model, device=env.device)
    wrapped = MultiTaskTrain(model, cfg.tasks, cfg.train.gate_stats)
    sparse_kwargs = {"lr": cfg.optim.sparse_lr}
    if cfg.optim.weight_decay:
        sparse_kwargs["weight_decay"] = cfg.optim.weight_decay
    apply_optimizer_in_backward(SPARSE_OPTIMIZERS[cfg.optim.sparse], model.sparse.ebc.parameters(),
                                dict(sparse_kwargs))  # it adds keys to the dict it gets
    plan = training_plan(cfg.plan, wrapped, [table_name(f) for f in columns.categorical],
                         env.world_size, env.device.type, cfg.data.batch_size, env.local_world_size)
    # No DDP: the optimizer averages the replicated parameters' gradients (`AveragingOptimizer`)
    dmp = DistributedModelParallel(wrapped, device=env.device, plan=plan, sharders=sharders(),
                                   init_data_parallel=False)
    # Tables the plan replicates (data_parallel) are plain parameters after sharding, outside
    # the fused optimizer: give them the sparse optimizer too, stepped after the averaging.
    unfused = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    replicated = {k: v for k, v in unfused.items() if ".sparse.ebc." in k}
    dense = {k: v for k, v in unfused.items() if k not in replicated}
    optimizers = [dmp.fused_optimizer]
    if replicated:
        optimizers.append(("replicated_tables", KeyedOptimizerWrapper(
            replicated, lambda ps: SPARSE_OPTIMIZERS[cfg.optim.sparse](ps, **sparse_kwargs))))
    # on a GPU, one fused kernel updates all dense weights (the per-tensor loops took 9% of the
    # GPU's time in a Criteo-shape step)
    fused = {"fused": True} if env.device.type == "cuda" else {}
    optimizers.append(("dense", KeyedOptimizerWrapper(
        dense, lambda ps: DENSE_OPTIMIZERS[cfg.optim.dense](ps, lr=cfg.optim.dense_lr,
                                                            weight_decay=cfg.optim.weight_decay, **fused))))
    held_by_all = list(unfused.values())
    broadcast_from_first(held_by_all)  # as DDP did: every rank starts from rank 0's values
    return dmp, AveragingOptimizer(optimizers, held_by_all), plan
