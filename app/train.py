"""Training: process group -> sharded model -> pipelined loop -> metrics and summary.

`train(cfg)` is importable (tests call it) and runs unchanged on one CPU process, on gloo
ranks, and on NCCL GPUs under torchrun. The loop is TorchRec's: `pipeline.progress` ->
metrics -> log -> evaluation and checkpoint where due.

A script that calls `train` needs the `if __name__ == "__main__":` guard: reader workers
start from a fork server, which runs the script's top level again, as Python's
multiprocessing does for every start method but fork.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import os
from typing import Callable, Iterator

import torch

from app.config import Config
from app.data.errors import DataError
from app.data.loader import start_worker_server
from app.data.order import Position
from app.distributed import Env, StopSignal, init_distributed
from app.early_stop import EarlyStop
from app.evaluate import evaluate, run_pipeline
from app.feed import EpochFeed, split_data
from app.pipeline import make_pipeline
from app.progress import Progress
from app.run_dir import Checkpointer
from app.sharded import build, resolve_columns


def train(cfg: Config) -> dict:
    """Trains and evaluates `cfg`; returns the summary that rank 0 writes to summary.json.

    Resumes from RUN_DIR/checkpoints/latest unless `train.resume` is false (`app.run_dir`). A
    stop signal ends with a checkpoint and `{"stopped": True, ...}`, without summary.json; bad
    input found mid-run ends with a checkpoint, then its `DataError`.
    """
    t = cfg.train
    env = init_distributed(t.device)
    if cfg.data.num_workers:
        start_worker_server()  # its imports overlap the model's building
    columns = resolve_columns(cfg)
    train_data = split_data(cfg, env, columns, cfg.data.train_split, train=True)
    eval_data = split_data(cfg, env, columns, cfg.data.eval_split, train=False)
    dmp, optimizer, plan = build(cfg, env, columns)
    checkpoints = Checkpointer(cfg.run_dir, t.keep_checkpoints, env.rank == 0, t.checkpoints)
    state = checkpoints.resume(cfg.to_dict(), dmp, optimizer, t.resume, t.overwrite)
    step, position = (state["step"], Position.from_state_dict(state["position"])) if state else (0, Position())
    feed = EpochFeed(train_data, position, step, t.epochs, t.max_steps, cfg.data.num_workers,
                     pin_memory=env.device.type == "cuda", host_group=env.host_group)
    stopper = EarlyStop(t.early_stop, t.patience, state)
    if state and (step >= feed.total or stopper.stopped) and (done := checkpoints.summary()) is not None:
        return already_finished(cfg, step, done)
    checkpoints.start(cfg.to_dict(), plan, resumed=state is not None)
    pipeline = make_pipeline(t.pipeline, dmp, optimizer, env)
    progress = Progress(cfg.run_dir, env, list(cfg.tasks), cfg.data.batch_size, t.log_every, t.tensorboard,
                        step, feed.total, cfg.data.max_skipped_fraction if cfg.data.on_bad_rows == "skip" else None)
    stop, stopped, failure, eval_result = StopSignal(), False, None, {}
    with collecting_every(t.gc_every) as collect, progress:
        while step < feed.total and not stopped and not stopper.stopped:
            segment = feed.segment(next_boundary(step, feed.total, t.eval_every, t.checkpoint_every) - step)
            seed_segment(cfg, env, step)
            progress.start(step)
            for out in run_pipeline(pipeline, segment):
                step += 1
                collect(step)
                if progress.update(step, out, feed.position.epoch) and (stop.agreed(env) or progress.failure):
                    segment.stop()  # the pipeline finishes the batches it holds, then drains
            feed.done(segment)
            progress.end(step)
            failure = segment.error or progress.failure
            stopped = segment.stopped or failure is not None
            best = False
            if t.eval_every and step % t.eval_every == 0 and not stopped or step == feed.total:
                eval_result, eval_failure = evaluated(pipeline, dmp, eval_data, cfg, env, progress, step, feed)
                failure = failure or eval_failure
                best = eval_failure is None and stopper.update(step, eval_result)
            if stopped or failure or step == feed.total or best or stopper.stopped or \
                    (t.checkpoint_every and step % t.checkpoint_every == 0):
                saved = checkpoints.save(step, dmp, optimizer, {"step": step, "position": feed.position.state_dict(),
                                                                "world_size": env.world_size, **stopper.state()})
                if best:
                    checkpoints.mark_best(saved)
            if failure is not None:
                raise failure
        if not eval_result and not stopped:  # resumed at the end of a run that wrote no summary
            eval_result = evaluate(pipeline, dmp, eval_data, cfg, env)
            progress.evaluated(step, feed.position.epoch, eval_result)
    summary = run_summary(cfg, env, progress, eval_result, step, stopped, stopper)
    if not stopped:
        checkpoints.finish(summary)
    return summary


def evaluated(pipeline, dmp, data, cfg: Config, env: Env, progress: Progress, step: int,
              feed: EpochFeed) -> tuple[dict[str, float], DataError | None]:
    """(metrics, None), or ({}, the bad input found in the evaluation split)."""
    try:
        result = evaluate(pipeline, dmp, data, cfg, env)
    except DataError as e:
        return {}, e
    progress.evaluated(step, feed.position.epoch, result)
    return result, None


def already_finished(cfg: Config, step: int, summary: dict) -> dict:
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{cfg.run_dir} finished at step {step}: nothing to train. Its results are in "
              f"{cfg.run_dir / 'summary.json'}; to train on, raise --train.epochs (or --train.max_steps); to "
              f"start over, --train.resume false --train.overwrite true")
    return summary


def next_boundary(step: int, total: int, *intervals: int) -> int:
    """Segments end at evaluations, checkpoints and the end: the pipeline drains there."""
    return min([total] + [(step // n + 1) * n for n in intervals if n])


def seed_segment(cfg: Config, env: Env, step: int) -> None:
    """RNG (dropout) depends only on (seed, step, rank), so a resumed run repeats exactly."""
    torch.manual_seed(hash((cfg.train.seed, step, env.rank)) % 2**63)


@contextlib.contextmanager
def collecting_every(steps: int) -> Iterator[Callable[[int], None]]:
    """Python's collector runs when allocations pile up, which TorchRec's per-batch objects
    make it do several times a step, and now and then a full pass over every object the model
    and the compiler hold stalls a step. Instead: what exists now is left out of collections,
    and the caller collects young objects every `steps` steps (all of them every tenth time).
    What the first full pass keeps is left out of later ones too: mostly what the first steps
    made (compiled code, the pipeline's modules), which made each full pass stall a step for
    about 60 ms (H100 machine, Criteo shape)."""
    if not steps:
        yield lambda step: None
        return
    gc.collect()
    gc.freeze()
    gc.disable()

    def collect(step: int) -> None:
        if step % steps == 0:
            gc.collect(1 if step % (10 * steps) else 2)
            if step == 10 * steps:
                gc.freeze()

    try:
        yield collect
    finally:
        gc.enable()
        gc.unfreeze()


def run_summary(cfg: Config, env: Env, progress: Progress, eval_result: dict[str, float], step: int,
                stopped: bool, stopper: EarlyStop) -> dict:
    """What summary.json holds: the last evaluation per task (the best, with early stopping),
    the gates, throughput."""
    last_log = progress.last_log
    eval_result = stopper.result or eval_result  # with early stopping, the best evaluation's
    return {
        "config": cfg.name,
        "tasks": {t: {k.split("/")[2]: v for k, v in eval_result.items() if k.startswith(f"eval/{t}/")}
                  for t in cfg.tasks},
        "mean_auc": eval_result.get("eval/mean_auc"),
        "eval_rows": eval_result.get("eval/rows"),
        "skipped_rows": eval_result.get("eval/skipped_rows"),
        "train_skipped_rows": progress.skipped_rows,
        "train_skipped_fraction": progress.skipped_rows / progress.read_rows if progress.read_rows else 0.0,
        # gate_e0, gate_e1, ... in expert order (not gate_entropy, not gate_e10 before gate_e2)
        "gates": {t: [last_log[f"train/{t}/gate_e{e}"] for e in
                      itertools.takewhile(lambda e, t=t: f"train/{t}/gate_e{e}" in last_log, itertools.count())]
                  for t in cfg.tasks} if any("/gate_e0" in k for k in last_log) else None,
        "samples_per_sec": progress.samples / progress.train_time if progress.train_time else 0.0,
        "world_size": env.world_size,
        "device": env.device.type,
        "steps": step,
        "epochs": cfg.train.epochs,
        "stopped": stopped,
        "early_stopped": stopper.stopped,
        "best": {"metric": stopper.metric, "step": stopper.step, "value": stopper.value} if stopper.metric else None,
    }
