"""Training: process group -> sharded model -> pipelined loop -> metrics and summary.

`train(cfg)` is importable (tests call it) and runs unchanged on one CPU process, on gloo
ranks, and on NCCL GPUs under torchrun.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.constants import default_pg_timeout
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from tqdm import tqdm

from app import checkpoint
from app.config import Config, save_config
from app.data import (Batch, Columns, ParquetBatches, Position, batches_in_flight, consume, iter_batches,
                      load_schema, span_rows)
from app.metrics import EvalMetrics, RunLog, TrainMetrics
from app.model import MultiTaskModel, MultiTaskTrain, Outputs, table_name
from app.pipeline import TrainPipeline
from app.plan import save_plan, sharders, training_plan

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
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None,
                                store=_attempt_store(world), rank=rank, world_size=world)
    return Env(rank, world, local_rank, local_world, dev)


def _attempt_store(world: int) -> dist.Store | None:
    """Under torchrun the agent's store outlives a restart of the workers, and the process
    group writes the same keys in every attempt: a restarted rank could read a dead rank's
    address and fail or hang connecting. Each attempt gets keys of its own."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # env:// makes a fresh store
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=False, timeout=default_pg_timeout)
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def resolve_columns(cfg: Config) -> Columns:
    schema, where = load_schema(cfg.data.path, (cfg.data.train_split, cfg.data.eval_split),
                                cfg.data.slot_size_array, cfg.data.keys_have_offsets)
    return Columns.resolve(schema, [t.label for t in cfg.tasks.values()], cfg.data.dense,
                           cfg.data.categorical, where=where)


def build(cfg: Config, env: Env, columns: Columns):
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


class AveragingOptimizer(CombinedOptimizer):
    """The combined optimizer, stepping after the gradients of the parameters every rank holds
    (dense head, replicated tables) are averaged over the ranks (`GradientMeans`)."""

    def __init__(self, optimizers: list, replicated: list[torch.nn.Parameter]):
        super().__init__(optimizers)
        self._means = GradientMeans(replicated) if dist.get_world_size() > 1 else None

    def step(self, closure=None) -> None:
        if self._means is not None:
            self._means.wait()
        super().step(closure)


def _flat_groups(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """`tensors` by dtype: each group flattens into one buffer."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())


class GradientMeans:
    """Replaces the gradients of `params` with their means over the ranks, in one flat all-reduce
    (per dtype) that starts as soon as the backward has accumulated the last of them, so that it
    overlaps the rest of the backward (the tables' update, the all-to-alls), as DDP's did. DDP
    got there with an autograd hook, a copy into its bucket and a division per parameter, whose
    host time a GPU step pays. Parameters without a gradient are left out; the model's graph is
    the same on every rank, so they are the same ones."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params, self._accumulated, self._pending = params, 0, []
        for p in params:
            p.register_post_accumulate_grad_hook(self._accumulate)

    def _accumulate(self, _: torch.Tensor) -> None:
        self._accumulated += 1
        if self._accumulated == len(self.params):
            self._start()

    def _start(self) -> None:
        nccl = dist.get_backend() == "nccl"  # gloo has no AVG
        for group in _flat_groups([p for p in self.params if p.grad is not None]):
            flat = _flatten_dense_tensors([p.grad for p in group])
            work = dist.all_reduce(flat, op=dist.ReduceOp.AVG if nccl else dist.ReduceOp.SUM, async_op=True)
            self._pending.append((group, flat, work, not nccl))

    def wait(self) -> None:
        """The means in place of the gradients (started here if some parameter got none)."""
        if not self._pending:
            self._start()
        for group, flat, work, divide in self._pending:
            work.wait()
            if divide:
                flat.div_(dist.get_world_size())
            for p, g in zip(group, _unflatten_dense_tensors(flat, [p.grad for p in group])):
                p.grad = g
        self._pending, self._accumulated = [], 0


def broadcast_from_first(params: list[torch.Tensor]) -> None:
    """Rank 0's values of `params` on every rank."""
    if dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for group in _flat_groups(params):
            flat = _flatten_dense_tensors(group)
            dist.broadcast(flat, src=0)
            torch._foreach_copy_(group, _unflatten_dense_tensors(flat, group))


def split_data(cfg: Config, env: Env, columns: Columns, split: str, train: bool) -> ParquetBatches:
    return ParquetBatches(cfg.data.path, split, columns, tuple(t.type for t in cfg.tasks.values()),
                          cfg.data.batch_size if train else cfg.data.eval_batch_size, env.rank,
                          env.world_size, train=train, seed=cfg.train.seed,
                          shuffle=cfg.data.shuffle, on_bad_rows=cfg.data.on_bad_rows)


def _datasets(cfg: Config, env: Env, columns: Columns) -> tuple[ParquetBatches, ParquetBatches]:
    return (split_data(cfg, env, columns, cfg.data.train_split, train=True),
            split_data(cfg, env, columns, cfg.data.eval_split, train=False))


@contextlib.contextmanager
def collecting_every(steps: int) -> Iterator[Callable[[int], None]]:
    """Python's collector runs when allocations pile up, which TorchRec's per-batch objects
    make it do several times a step, and now and then a full pass over every object the model
    and the compiler hold stalls a step. Instead: what exists now is left out of collections,
    and the caller collects young objects every `steps` steps (all of them every tenth time)."""
    if not steps:
        yield lambda step: None
        return
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield lambda step: None if step % steps else gc.collect(1 if step % (10 * steps) else 2)
    finally:
        gc.enable()
        gc.unfreeze()


def run_pipeline(pipeline: TrainPipeline, batches: Iterator[Batch]) -> Iterator[Outputs]:
    """Outputs of `pipeline.progress` until `batches` is exhausted (the pipeline drains)."""
    while True:
        try:
            yield pipeline.progress(batches)
        except StopIteration:
            return


class Feed:
    """The batches of one segment; `stop()` ends it early, at the same batch on every rank."""

    def __init__(self, batches: Iterator[Batch], count: int):
        self.batches, self.left = batches, count
        self.stopped = self.exhausted = False

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self.left <= 0 or self.stopped:
            raise StopIteration
        try:
            batch = next(self.batches)
        except StopIteration:
            self.exhausted = True  # the epoch's data ran out
            raise
        self.left -= 1
        return batch

    def stop(self) -> None:
        self.stopped = True


def evaluate(pipeline: TrainPipeline, dmp: torch.nn.Module, data: ParquetBatches,
             cfg: Config, env: Env, split: str = "eval") -> dict[str, float]:
    """Scores a whole split through the pipeline (see `scoring`)."""
    metrics = EvalMetrics(cfg.tasks).to(env.device)
    with scoring(dmp):
        for out in run_pipeline(pipeline, iter_batches(data, cfg.data.num_workers, env.device.type == "cuda")):
            metrics.update(out.preds, out.labels, out.weights)
    return metrics.compute(split)


@contextlib.contextmanager
def scoring(dmp: torch.nn.Module) -> Iterator[None]:
    """Eval mode (the pipeline then skips backward), no gradients, and the compiled parts
    (`model.compile`) run eagerly: each scoring batch size would compile again, for a pass
    made once per evaluation. Python's collector runs as usual (training may have stopped
    it: see `collecting_every`). Back to training mode after."""
    dmp.eval()
    collector_was_on = gc.isenabled()
    gc.enable()
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            yield
    finally:
        if not collector_was_on:
            gc.disable()
        dmp.train()


class StopSignal:
    """SIGTERM/SIGUSR1 (preemption, Slurm's warning) ask for a checkpoint and a clean exit."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def agreed(self, env: Env) -> bool:
        """True on every rank once any rank got the signal (a collective)."""
        flag = torch.tensor([float(self.raised)], device=env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _next_boundary(step: int, total: int, *intervals: int) -> int:
    """Segments end at evaluations, checkpoints and the end: the pipeline drains there."""
    return min([total] + [(step // n + 1) * n for n in intervals if n])


def _seed_segment(cfg: Config, env: Env, step: int) -> None:
    """RNG (dropout) depends only on (seed, step, rank), so a resumed run repeats exactly."""
    torch.manual_seed(hash((cfg.train.seed, step, env.rank)) % 2**63)


def _next_epoch(data: ParquetBatches, position: Position, cfg: Config, env: Env) -> Iterator[Batch]:
    """The next epoch's batches, their reader workers started now: while this epoch's last
    batches train, they decode its first ones (starting them at the epoch's end stalled
    training for 0.1-2 s an epoch)."""
    ahead = copy.copy(data)  # this epoch may still read through `data` (num_workers = 0)
    ahead.set_position(Position(position.epoch + 1))
    return iter_batches(ahead, cfg.data.num_workers, env.device.type == "cuda")


def train(cfg: Config) -> dict:
    """Trains and evaluates `cfg`; returns the summary that rank 0 writes to summary.json.

    Resumes from RUN_DIR/checkpoints/latest unless `train.resume` is false. A stop signal
    ends with a checkpoint and `{"stopped": True, ...}`, without summary.json.
    """
    env = init_distributed(cfg.train.device)
    run_dir, is_main = cfg.run_dir, env.rank == 0
    columns = resolve_columns(cfg)
    train_data, eval_data = _datasets(cfg, env, columns)
    dmp, optimizer, plan = build(cfg, env, columns)
    stop = StopSignal()
    resume_from = checkpoint.latest(run_dir) if cfg.train.resume else None
    step, position = 0, Position()
    if resume_from is not None:
        state = checkpoint.load(resume_from, dmp, optimizer)
        step, position = state["step"], Position.from_state_dict(state["position"])
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            (run_dir / "summary.json").unlink(missing_ok=True)
        else:
            print(f"resuming from {resume_from} (step {step})")
        save_config(cfg, run_dir / "config.json")
        (run_dir / "plan.txt").write_text(str(plan) + "\n")
        save_plan(plan, run_dir / "plan.json")  # reusable: --plan.file RUN_DIR/plan.json
    pipeline = TrainPipeline(dmp, optimizer, env.device, execute_all_batches=True)
    log = RunLog(run_dir, is_main, cfg.train.tensorboard)
    tasks = list(cfg.tasks)
    train_metrics = TrainMetrics(tasks, env.device)
    group_mean = (lambda t: t) if env.world_size == 1 else \
        (lambda t: (dist.all_reduce(t), t / env.world_size)[1])

    # steps still to run on this world size (a resume may change it)
    steps_per_epoch = len(train_data)
    train_data.set_position(position)
    total = step + len(train_data) + steps_per_epoch * (cfg.train.epochs - position.epoch - 1)
    if position.epoch >= cfg.train.epochs:
        total = step
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    global_batch = cfg.data.batch_size * env.world_size
    bar = tqdm(total=total, initial=step, disable=not is_main, unit="step", dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    train_time, samples, eval_result, last_log, stopped = 0.0, 0, {}, {}, False
    read_ahead = batches_in_flight(train_data, cfg.data.num_workers)
    # the next epoch's batches, started early; made only where this epoch runs to its end, so
    # the next pass of the loop below always starts that epoch
    upcoming: Iterator[Batch] | None = None
    with collecting_every(cfg.train.gc_every) as collect:
        while step < total and not stopped:
            train_data.set_position(position)
            epoch_spans = position.remaining or [(0, train_data.total_rows)]
            epoch_len, epoch_steps = len(train_data), 0
            batches = upcoming or iter_batches(train_data, cfg.data.num_workers, env.device.type == "cuda")
            upcoming = None
            while step < total:
                end = _next_boundary(step, total, cfg.train.eval_every, cfg.train.checkpoint_every)
                feed = Feed(batches, end - step)
                _seed_segment(cfg, env, step)
                start_time = log_time = time.perf_counter()
                start_step = log_step = step
                for out in run_pipeline(pipeline, feed):
                    train_metrics.update(out.losses, out.gates)  # gates: None unless train.gate_stats
                    step += 1
                    collect(step)
                    bar.update()
                    left = epoch_len - epoch_steps - (step - start_step)
                    if upcoming is None and left <= read_ahead and total - step > left:
                        upcoming = _next_epoch(train_data, position, cfg, env)
                    if step % cfg.train.log_every == 0:
                        now = time.perf_counter()
                        rate = (step - log_step) * global_batch / (now - log_time)
                        record = {"epoch": position.epoch, "samples_per_sec": rate,
                                  "step_time_ms": 1000 * (now - log_time) / (step - log_step),
                                  **train_metrics.read(group_mean)}
                        if env.device.type == "cuda":
                            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(env.device) / 2**30
                        log.write(step, record)
                        last_log, log_time, log_step = record, now, step
                        bar.set_postfix(loss=f"{sum(record[f'train/{t}/loss'] for t in tasks):.4f}",
                                        samples_s=f"{rate:,.0f}")
                        if stop.agreed(env):
                            feed.stop()  # the pipeline finishes the batches it holds, then drains
                epoch_steps += step - start_step
                train_time += time.perf_counter() - start_time
                samples += (step - start_step) * global_batch
                remaining = consume(epoch_spans, env.world_size, epoch_steps * cfg.data.batch_size)
                position = Position(position.epoch + 1) if feed.exhausted or span_rows(remaining) < env.world_size \
                    else Position(position.epoch, remaining)
                stopped = feed.stopped
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and not stopped or step == total:
                    eval_result = evaluate(pipeline, dmp, eval_data, cfg, env)
                    log.write(step, {"epoch": position.epoch, **eval_result})
                    if is_main:
                        bar.write(f"step {step}: " + " ".join(
                            f"{k}={v:.4f}" for k, v in eval_result.items() if k.endswith(("auc", "logloss", "rmse"))))
                if stopped or step == total or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0):
                    checkpoint.save(run_dir, step, dmp, optimizer,
                                    {"step": step, "position": position.state_dict(), "world_size": env.world_size},
                                    {"config.json": json.dumps(cfg.to_dict(), indent=2), "plan.txt": str(plan)},
                                    cfg.train.keep_checkpoints)
                if stopped or position.remaining is None:
                    break  # a new epoch (or the stop): new batches
    bar.close()
    log.close()
    summary = {
        "config": cfg.name,
        "tasks": {t: {k.split("/")[2]: v for k, v in eval_result.items() if k.startswith(f"eval/{t}/")}
                  for t in tasks},
        "mean_auc": eval_result.get("eval/mean_auc"),
        "eval_rows": eval_result.get("eval/rows"),
        "skipped_rows": eval_result.get("eval/skipped_rows"),
        # gate_e0, gate_e1, ... in expert order (not gate_entropy, not gate_e10 before gate_e2)
        "gates": {t: [last_log[f"train/{t}/gate_e{e}"] for e in
                      itertools.takewhile(lambda e, t=t: f"train/{t}/gate_e{e}" in last_log, itertools.count())]
                  for t in tasks} if any("/gate_e0" in k for k in last_log) else None,
        "samples_per_sec": samples / train_time if train_time else 0.0,
        "world_size": env.world_size,
        "device": env.device.type,
        "steps": step,
        "epochs": cfg.train.epochs,
        "stopped": stopped,
    }
    if is_main and not stopped:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
