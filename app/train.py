"""Training: process group -> sharded model -> pipelined loop -> metrics and summary.

`train(cfg)` is importable (tests call it) and runs unchanged on one CPU process, on gloo
ranks, and on NCCL GPUs under torchrun.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from tqdm import tqdm

from app.config import Config, save_config
from app.data import Batch, Columns, ParquetBatches, Position, Schema, iter_batches
from app.metrics import EvalMetrics, TrainMetrics
from app.model import MultiTaskModel, MultiTaskTrain, table_name
from app.plan import sharders, training_plan

log = logging.getLogger("app")

SPARSE_OPTIMIZERS = {"adagrad": torch.optim.Adagrad, "rowwise_adagrad": RowWiseAdagrad,
                     "sgd": torch.optim.SGD, "adam": torch.optim.Adam}
DENSE_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@dataclass
class Env:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str) -> Env:
    """Joins torchrun's process group, or makes a one-process group when run alone."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Env(rank, world, local_rank, local_world, dev)


def build(cfg: Config, env: Env, columns: Columns):
    """Model on the device with its tables on `meta`, planned, sharded, with optimizers."""
    torch.manual_seed(cfg.train.seed)  # identical dense init on every rank
    model = MultiTaskModel(columns, cfg.tasks, cfg.model, device=env.device)
    wrapped = MultiTaskTrain(model, cfg.tasks)
    sparse_kwargs = {"lr": cfg.optim.sparse_lr}
    if cfg.optim.weight_decay:
        sparse_kwargs["weight_decay"] = cfg.optim.weight_decay
    apply_optimizer_in_backward(SPARSE_OPTIMIZERS[cfg.optim.sparse], model.sparse.ebc.parameters(),
                                dict(sparse_kwargs))  # it adds keys to the dict it gets
    plan = training_plan(cfg.plan, wrapped, [table_name(f) for f in columns.categorical],
                         env.world_size, env.device.type, cfg.data.batch_size, env.local_world_size)
    dmp = DistributedModelParallel(wrapped, device=env.device, plan=plan, sharders=sharders())
    # Tables the plan replicates (data_parallel) are plain parameters after sharding, outside
    # the fused optimizer: give them the sparse optimizer too, stepped after DDP's all-reduce.
    unfused = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    replicated = {k: v for k, v in unfused.items() if ".sparse.ebc." in k}
    dense = {k: v for k, v in unfused.items() if k not in replicated}
    optimizers = [dmp.fused_optimizer]
    if replicated:
        optimizers.append(("replicated_tables", KeyedOptimizerWrapper(
            replicated, lambda ps: SPARSE_OPTIMIZERS[cfg.optim.sparse](ps, **sparse_kwargs))))
    optimizers.append(("dense", KeyedOptimizerWrapper(
        dense, lambda ps: DENSE_OPTIMIZERS[cfg.optim.dense](ps, lr=cfg.optim.dense_lr,
                                                            weight_decay=cfg.optim.weight_decay))))
    return dmp, CombinedOptimizer(optimizers), plan


def _datasets(cfg: Config, env: Env, columns: Columns) -> tuple[ParquetBatches, ParquetBatches]:
    kinds = tuple(t.type for t in cfg.tasks.values())
    common = dict(columns=columns, label_kinds=kinds, rank=env.rank, world_size=env.world_size,
                  seed=cfg.train.seed, on_bad_rows=cfg.data.on_bad_rows)
    train_data = ParquetBatches(cfg.data.path, cfg.data.train_split, batch_size=cfg.data.batch_size,
                                train=True, shuffle=cfg.data.shuffle, **common)
    eval_data = ParquetBatches(cfg.data.path, cfg.data.eval_split, batch_size=cfg.data.eval_batch_size,
                               train=False, **common)
    return train_data, eval_data


class Logger:
    """Rank 0 appends one JSON line per record to RUN_DIR/metrics.jsonl."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def run_pipeline(pipeline: TrainPipelineSparseDist, batches: Iterator[Batch]) -> Iterator:
    """Outputs of `pipeline.progress` until `batches` is exhausted (the pipeline drains)."""
    while True:
        try:
            yield pipeline.progress(batches)
        except StopIteration:
            return


def evaluate(pipeline: TrainPipelineSparseDist, dmp: torch.nn.Module, data: ParquetBatches,
             cfg: Config, env: Env, split: str = "eval") -> dict[str, float]:
    """Scores a whole split through the pipeline with the model in eval mode (no backward)."""
    metrics = EvalMetrics(cfg.tasks).to(env.device)
    dmp.eval()
    with torch.no_grad():
        for _, preds, labels, weights in run_pipeline(pipeline, iter_batches(data, cfg.data.num_workers,
                                                                             env.device.type == "cuda")):
            metrics.update(preds, labels, weights)
    dmp.train()
    return metrics.compute(split)


def _all_mean(values: dict[str, float], env: Env) -> dict[str, float]:
    if env.world_size == 1:
        return values
    t = torch.tensor(list(values.values()), device=env.device)
    dist.all_reduce(t)
    return dict(zip(values, (t / env.world_size).tolist()))


def train(cfg: Config) -> dict:
    """Trains and evaluates `cfg`; returns the summary that rank 0 writes to summary.json."""
    env = init_distributed(cfg.train.device)
    run_dir = cfg.run_dir
    is_main = env.rank == 0
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.json")
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    schema = Schema.load(cfg.data.path)
    columns = Columns.resolve(schema, [t.label for t in cfg.tasks.values()], cfg.data.dense,
                              cfg.data.categorical, where=str(Path(cfg.data.path) / "schema.json"))
    train_data, eval_data = _datasets(cfg, env, columns)
    dmp, optimizer, plan = build(cfg, env, columns)
    if is_main:
        (run_dir / "plan.txt").write_text(str(plan) + "\n")
    pipeline = TrainPipelineSparseDist(dmp, optimizer, env.device, execute_all_batches=True)
    logger = Logger(run_dir, is_main)
    tasks = list(cfg.tasks)
    train_metrics = TrainMetrics(tasks, env.device)

    steps_per_epoch = len(train_data)
    total = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    global_batch = cfg.data.batch_size * env.world_size
    bar = tqdm(total=total, disable=not is_main, unit="step", dynamic_ncols=True)
    step, train_time, samples = 0, 0.0, 0
    eval_result: dict[str, float] = {}
    for epoch in itertools.count():
        if step >= total:
            break
        train_data.set_position(Position(epoch))
        batches = iter_batches(train_data, cfg.data.num_workers, env.device.type == "cuda")
        while step < total:
            # a segment ends at the next evaluation or the end; the pipeline drains there
            every = cfg.train.eval_every or total
            end = min(total, (step // every + 1) * every)
            start_time, start_step = time.perf_counter(), step
            for losses, _, _, _ in run_pipeline(pipeline, itertools.islice(batches, end - step)):
                train_metrics.update(losses)
                step += 1
                bar.update()
                if step % cfg.train.log_every == 0:
                    record = _all_mean(train_metrics.read(), env)
                    rate = (step - start_step) * global_batch / (time.perf_counter() - start_time)
                    record.update(step=step, epoch=epoch, samples_per_sec=rate)
                    logger.write(record)
                    bar.set_postfix(loss=f"{sum(record[f'train/{t}/loss'] for t in tasks):.4f}",
                                    samples_s=f"{rate:,.0f}")
            if step == start_step:  # the epoch's data ran out
                break
            train_time += time.perf_counter() - start_time
            samples += (step - start_step) * global_batch
            if step % every == 0 or step == total:
                eval_result = evaluate(pipeline, dmp, eval_data, cfg, env)
                logger.write({"step": step, "epoch": epoch, **eval_result})
                if is_main:
                    bar.write(" ".join(f"{k}={v:.4f}" for k, v in eval_result.items()
                                       if k.endswith(("auc", "logloss", "rmse"))))
    bar.close()
    summary = {
        "config": cfg.name,
        "tasks": {t: {k.split("/")[2]: v for k, v in eval_result.items() if k.startswith(f"eval/{t}/")}
                  for t in tasks},
        "mean_auc": eval_result.get("eval/mean_auc"),
        "eval_rows": eval_result.get("eval/rows"),
        "skipped_rows": eval_result.get("eval/skipped_rows"),
        "samples_per_sec": samples / train_time if train_time else 0.0,
        "world_size": env.world_size,
        "device": str(env.device.type),
        "steps": step,
        "epochs": cfg.train.epochs,
    }
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
