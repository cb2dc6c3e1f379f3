"""Where the trainer's step time goes, for the Criteo-shape model of `bench/train.py`.

Builds the model, optimizers and pipeline exactly as `app.train` does, then
times steady-state steps under several feeds and profiles a few steps with torch.profiler:

  parquet   the real reader (`ParquetBatches` + `iter_batches`, pinned, N workers)
  memory    the same number of pre-made pinned host batches, cycled (no reader cost)
  bare      memory, without the per-step train-metric update

Prints the ms/step of each, each rank's host time by pipeline phase (and in waits for the GPU
or a collective), the profiler's top ops by GPU and by CPU time, and how busy the GPU was;
writes a Chrome trace to --trace (on 2+ ranks each rank's, named .rankN.json.gz). Takes the options of `bench/train.py`:

    python bench/profile_step.py --precision bf16 --rows 4000000 [--trace /tmp/trace.json.gz]
                                 [--compile off] [--steps 150]
                                 [-- trainer overrides]
    torchrun --standalone --nproc-per-node 4 bench/profile_step.py --precision bf16
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib.util
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "train.py")
bench = sys.modules["bench_train"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

from app.config import TrainConfig  # noqa: E402
from app.data.loader import iter_batches  # noqa: E402
from app.distributed import init_distributed  # noqa: E402
from app.feed import split_data  # noqa: E402
from app.logs import setup_logging  # noqa: E402
from app.metrics import TrainMetrics  # noqa: E402
from app.pipeline import make_pipeline  # noqa: E402
from app.sharded import build, resolve_columns  # noqa: E402
from app.train import collecting_every  # noqa: E402


def gpu_busy_seconds(events: list[dict]) -> float:
    """Time the GPU ran anything, from a Chrome trace's events: the union of kernel, copy and
    memset intervals (summing per-op device times counts ops and their kernels twice)."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("ph") == "X"
                   and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    return busy / 1e6  # the trace is in microseconds


# host-side ops that wait for the GPU (a sync inside the step stalls the host's run-ahead)
WAITS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense",
         "record_param_comms", "c10d::allreduce_", "c10d::alltoall_base_", "nccl:all_to_all", "nccl:all_reduce")


def host_breakdown(events: list[dict], steps: int) -> list[tuple[str, float]]:
    """Host ms per step in each of the pipeline's phases (TorchRec's "## name N ##" ranges,
    numbers dropped) and in ops that wait for the GPU or a collective, from a Chrome trace."""
    total: dict[str, float] = {}
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in ("user_annotation", "cpu_op", "cuda_runtime"):
            continue
        name = e["name"]
        if name.startswith("## "):
            name = "## " + " ".join(w for w in name[3:-3].split() if not w.isdigit())
        elif not name.startswith(WAITS):
            continue
        total[name] = total.get(name, 0.0) + e["dur"] / 1000 / steps
    return sorted(total.items(), key=lambda kv: -kv[1])


def python_profile(step, steps: int, env, say) -> None:
    """The host's Python by function over `steps` steps (rank 0): where TorchRec's pipeline,
    the sharded lookup and autograd spend the host time that bounds a step."""
    import cProfile
    import io
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    bench.sync(env.device)
    wall = time.perf_counter() - start
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    for key in ("tottime", "cumulative"):
        stats.sort_stats(key).print_stats(40)
    say(f"cProfile over {steps} steps: {1000 * wall / steps:.2f} ms/step under it\n{out.getvalue()}")


def main() -> None:
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--trace")
    p.add_argument("--steps", type=int, default=150, help="timed steps per feed")
    p.add_argument("--gc-every", type=int, default=TrainConfig.gc_every, help="as train.gc_every")
    p.add_argument("--python", type=int, default=0, metavar="N",
                   help="also profile N steps with cProfile (the host's Python, by function)")
    p.add_argument("--python-feed", choices=("memory", "parquet"), default="memory", help="the feed --python profiles")
    own, rest = p.parse_known_args(argv[:cut])
    trace = own.trace
    args = bench.parse_args(rest + argv[cut:])  # options after "--" go to the trainer's config
    setup_logging()
    args.device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    cuda = args.device == "cuda"
    bench.fill_defaults(args, cuda, int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    bench.ensure_data(args, int(os.environ.get("LOCAL_RANK", 0)))
    precision = args.precisions[-1]
    cfg, _ = bench.trainer_config(args, precision, Path(args.work) / "profile")
    env = init_distributed(args.device)
    say = print if env.rank == 0 else (lambda *a, **k: None)
    columns = resolve_columns(cfg)
    dmp, optimizer, plan = build(cfg, env, columns)
    say(f"{env.world_size} rank(s), {precision}, batch {args.batch_size}, {args.num_workers} workers; plan:")
    say("\n".join(sorted({f"  {p.sharding_type}/{p.compute_kernel}" for m in plan.plan.values()
                          for p in m.values()})))
    pipeline = make_pipeline(cfg.train.pipeline, dmp, optimizer, env)  # -- --train.pipeline torchrec
    metrics = TrainMetrics(list(cfg.tasks), env.device)
    data = split_data(cfg, env, columns, cfg.data.train_split, train=True)
    parquet = (b for _ in itertools.count() for b in iter_batches(data, args.num_workers, cuda))
    held = [next(parquet).pinned_copy() if cuda else next(parquet) for _ in range(16)]
    memory = itertools.cycle(held)

    steps_run = itertools.count(1)

    def step(batches, update: bool) -> None:
        out = pipeline.progress(batches)
        if update:
            metrics.update(out.losses, None)
        collect(next(steps_run))

    def timed(batches, update: bool, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(20):  # the first call also compiles (model.compile)
            step(batches, update)
        bench.sync(env.device)
        dist.barrier()
        say(f"  20 warm-up steps: {time.perf_counter() - start:.1f} s", flush=True)
        start = time.perf_counter()
        for _ in range(steps):
            step(batches, update)
        bench.sync(env.device)
        return 1000 * (time.perf_counter() - start) / steps

    rows = []
    collector = contextlib.ExitStack()
    collect = collector.enter_context(collecting_every(own.gc_every))  # as the trainer's loop does
    for name, batches, update in (("parquet", parquet, True), ("memory", memory, True), ("bare", memory, False)):
        ms = timed(batches, update, own.steps)
        rows.append((name, ms, args.batch_size / ms * 1000))
        say(f"{name}: {ms:.2f} ms/step, {rows[-1][2]:,.0f} samples/s per rank", flush=True)

    if own.python:
        python_profile(lambda: step(parquet if own.python_feed == "parquet" else memory, True), own.python, env, say)
    for _ in range(10):
        step(memory, True)
    bench.sync(env.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    steps = 12
    with profile(activities=activities, record_shapes=False) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step(memory, True)
        bench.sync(env.device)
        wall = time.perf_counter() - start
    if trace and env.world_size > 1:  # every rank's, side by side
        trace = trace.replace(".json", f".rank{env.rank}.json")
    raw = Path(trace).with_suffix("") if trace else Path(args.work) / f"profile_trace_rank{env.rank}.json"
    prof.export_chrome_trace(str(raw))
    with open(raw) as f:
        events = json.load(f)["traceEvents"]
    for r in range(env.world_size):  # each rank's host phases, in rank order
        if r == env.rank:
            print(f"rank {r} host ms/step under the profiler ({1000 * wall / steps:.2f} ms/step): " + ", ".join(
                f"{name} {ms:.2f}" for name, ms in host_breakdown(events, steps) if ms >= 0.02), flush=True)
        dist.barrier()
    if env.rank == 0:
        averages = prof.key_averages()
        if cuda:
            print(averages.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))
            busy = gpu_busy_seconds(events)
            print(f"GPU busy {1000 * busy / steps:.2f} ms/step (union of kernel and copy intervals) "
                  f"of {1000 * wall / steps:.2f} ms/step under the profiler")
        print(averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
        print("\n| feed | ms/step | samples/s per rank |\n| --- | ---: | ---: |")
        for name, ms, rate in rows:
            print(f"| {name} | {ms:.2f} | {rate:,.0f} |")
    if trace:
        with open(raw, "rb") as f, gzip.open(trace, "wb") as g:
            g.write(f.read())
    raw.unlink()
    collector.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
