"""Training throughput benchmark; appends a dated section to bench/RESULTS.md.

Measures, on the machine it runs on and in one run, for the reference model of
configs/criteo_mmoe.toml (26 tables, 13 dense features, MMoE with 8 experts, 2 tasks):

  e2e       the real trainer (`app.train.train`) on generated Criteo-shape Parquet, fp32 and bf16;
            samples/s is the median over the trainer's log intervals after the first 20%
  reader    `ParquetBatches` + `iter_batches` alone (pinned), and with the copy to the GPU
  embedding the sharded EmbeddingBagCollection alone, forward + backward with the fused
            rowwise Adagrad, on in-memory batches already on the device
  dense     MMoE head + towers alone, forward + backward + Adam, on random inputs on the device
  naive     a plain PyTorch loop: unsharded, unfused collection with torch's Adagrad, experts
            and gates as Python lists of modules, fp32, a blocking copy of each batch

One process per GPU under torchrun, or one process (on the GPU when there is one, else CPU
with small defaults). Phases that talk across ranks (e2e, embedding) run on all ranks together;
the others run on every rank at once without communicating and report per rank. The data
(24M train rows per GPU by default, about 6 GB each) is generated once per size under --work
(/tmp/mmoe-bench) by local rank 0 and reused by later runs; run directories go there too. The
trainer writes no checkpoints here (`train.checkpoints = false`).

    make bench                       # one process; GPU defaults on a GPU, small ones on CPU
    make bench GPUS=4                # torchrun, 4 ranks
    torchrun --standalone --nproc-per-node 4 bench/train.py [--rows 24000000] [--skip naive]
    python bench/train.py --rows 100000 --e2e-steps 20 --phase-seconds 2   # a quick smoke run
    python bench/train.py --skip naive -- --plan.sharding_types '["table_wise"]'  # trainer overrides

Timing: e2e numbers come from RUN_DIR/metrics.jsonl (so the trainer's setup, final evaluation
and checkpoint are outside them); the other phases time a fixed number of steps, after warm-up,
between device synchronizations.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import gc
import json
import math
import multiprocessing
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torchrec  # noqa: E402
from torch import nn  # noqa: E402
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType  # noqa: E402
from torchrec.modules.embedding_modules import EmbeddingBagCollection  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from app.config import Config, load_config  # noqa: E402
from app.data.batch import Batch  # noqa: E402
from app.data.loader import iter_batches  # noqa: E402
from app.data.schema import Columns, Schema  # noqa: E402
from app.model import MultiTaskModel, MultiTaskTrain  # noqa: E402
from app.distributed import Env, init_distributed  # noqa: E402
from app.feed import split_data  # noqa: E402
from app.logs import setup_logging  # noqa: E402
from app.optimizers import DENSE_OPTIMIZERS  # noqa: E402
from app.sharded import build, resolve_columns  # noqa: E402
from app.train import train as run_trainer  # noqa: E402

CONFIG = ROOT / "configs" / "criteo_mmoe.toml"
NUM_DENSE, NUM_CATEGORICAL, LABELS = 13, 26, ("click", "convert")
TARGET_PER_GPU = 2_000_000  # samples/s per GPU end to end that the report measures against
READER_CHUNK = 8  # batches per reader chunk (ParquetBatches' chunk_batches); row group = 8 batches
PHASES = ("e2e", "reader", "embedding", "dense", "naive")
SKEW = 3.0  # default --skew: id = floor(cardinality * u**skew), small ids frequent as in click logs

# Defaults that depend on the device: (GPU, CPU)
DEFAULTS = {
    "rows": (24_000_000, 200_000),  # per rank on GPU: epochs long enough to hide their restarts
    "cardinality": (1_000_000, 10_000),
    "dim": (128, 16),
    "batch_size": (8192, 1024),
    "e2e_seconds": (40.0, 15.0),
    "phase_seconds": (8.0, 3.0),
    "warmup": (10, 1),
    "log_every": (20, 3),
}


# ---------------------------------------------------------------------------------------
# Options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu_cpu = lambda key: f"(default {DEFAULTS[key][0]:,} on GPU, {DEFAULTS[key][1]:,} on CPU)"  # noqa: E731
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--rows", type=int, help="train rows in all, rounded up to whole row groups (default "
                   f"{DEFAULTS['rows'][0]:,} per GPU, {DEFAULTS['rows'][1]:,} on CPU)")
    p.add_argument("--cardinality", type=int, help=f"rows of each of the 26 tables {gpu_cpu('cardinality')}")
    p.add_argument("--dim", type=int, help=f"embedding dimension {gpu_cpu('dim')}")
    p.add_argument("--skew", type=float, default=SKEW,
                   help=f"ids = floor(cardinality * u**skew), u uniform: 1 gives uniform ids, {SKEW:g} (default) a "
                        "power law whose small ids are frequent; the embedding phase also runs uniform ids")
    p.add_argument("--batch-size", type=int, help=f"samples per rank per step {gpu_cpu('batch_size')}")
    p.add_argument("--num-workers", type=int,
                   help="reader worker processes per rank (default on GPU: CPU cores per rank - 2, at most 8; 1 on CPU)")
    p.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both")
    p.add_argument("--compile", choices=("auto", "off", "default", "reduce-overhead"), default="auto",
                   help="the trainer's --model.compile (auto: reduce-overhead, i.e. CUDA graphs, on a GPU)")
    p.add_argument("--e2e-seconds", type=float,
                   help=f"training time per precision; slower runs are stopped at 1.25x {gpu_cpu('e2e_seconds')}")
    p.add_argument("--e2e-steps", type=int,
                   help="max steps per precision (default on GPU: what --e2e-seconds takes at 2M "
                        "samples/s per GPU; on CPU: 30)")
    p.add_argument("--phase-seconds", type=float, help=f"timed part of each other phase {gpu_cpu('phase_seconds')}")
    p.add_argument("--warmup", type=int, help=f"untimed steps before each timed phase {gpu_cpu('warmup')}")
    p.add_argument("--log-every", type=int, help=f"trainer log interval in steps {gpu_cpu('log_every')}")
    p.add_argument("--data", help="dataset folder (default /tmp/mmoe-bench/criteo_r<rows>_c<card>_g<rows per "
                                  "row group>); generated when it has no _SUCCESS file")
    p.add_argument("--files", type=int, default=min(64, max(16, os.cpu_count() or 1)),
                   help="Parquet files of the train split, written in parallel (default: cores, 16 to 64)")
    p.add_argument("--parquet-dictionary", action="store_true",
                   help="dictionary-encode columns as the converters do (pyarrow's default): about 4x "
                        "slower to write and 1.5x slower to decode than the plain encoding used otherwise")
    p.add_argument("--work", default="/tmp/mmoe-bench", help="folder for run directories and default data")
    p.add_argument("--skip", default="", help=f"comma-separated phases to leave out: {','.join(PHASES)}")
    p.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.trainer = argv[cut + 1:]  # after "--": the trainer's own overrides, e.g. --plan.sharding_types
    args.skip = {s for s in args.skip.split(",") if s}
    unknown = args.skip - set(PHASES)
    if unknown:
        p.error(f"--skip {','.join(sorted(unknown))}: unknown phase; phases are {','.join(PHASES)}")
    return args


def fill_defaults(args: argparse.Namespace, cuda: bool, world: int, local_world: int) -> None:
    if args.rows is None and cuda:
        args.rows = DEFAULTS["rows"][0] * world
    for key, (gpu, cpu) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, gpu if cuda else cpu)
    if args.num_workers is None:
        # 8 decode about 2.8M rows/s (0.35M each on an H100 machine's cores), more than a GPU
        # takes; each one more is a process beside the training one, all decoding at an epoch's start
        args.num_workers = min(8, max(1, (os.cpu_count() or 2) // local_world - 2)) if cuda else 1
    if args.e2e_steps is None:
        args.e2e_steps = math.ceil(args.e2e_seconds * TARGET_PER_GPU / args.batch_size) if cuda else 30
    args.precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    args.row_group = READER_CHUNK * args.batch_size  # reader workers then decode each row group once
    name = f"criteo_r{args.rows}_c{args.cardinality}_g{args.row_group}" + ("_dict" if args.parquet_dictionary else "") \
        + (f"_s{args.skew:g}" if args.skew != SKEW else "")
    args.data = Path(args.data or Path(args.work) / name)


# ---------------------------------------------------------------------------------------
# Data: Criteo-shape Parquet, written in parallel, one row group at a time per process


def _write_file(path: Path, rows: int, row_group: int, cardinality: int, dictionary: bool, seed: int,
                skew: float) -> None:
    """Labels depend on a few columns only (cheap), so a trained model's AUC is above 0.5."""
    rng = np.random.default_rng(seed)
    schema = pa.schema([(name, pa.float32()) for name in LABELS]
                       + [(f"d{i}", pa.float32()) for i in range(NUM_DENSE)]
                       + [(f"c{i}", pa.int64()) for i in range(NUM_CATEGORICAL)])
    with pq.ParquetWriter(path, schema, use_dictionary=dictionary) as writer:
        for start in range(0, rows, row_group):
            n = min(row_group, rows - start)
            # one row per column: contiguous, so pyarrow takes each without a copy
            dense = rng.standard_normal((NUM_DENSE, n), dtype=np.float32)
            u = rng.random((NUM_CATEGORICAL, n), dtype=np.float32)
            ids = np.minimum((cardinality * u ** np.float32(skew)).astype(np.int64), cardinality - 1)
            z = np.stack([1.5 * dense[0] - dense[1] + (ids[0] % 4 == 0) - 1.0,
                          1.5 * dense[2] + 2.0 * (ids[1] < cardinality // 100) - 2.5])
            labels = (rng.random((2, n)) < 1 / (1 + np.exp(-z))).astype(np.float32)
            columns = [*labels, *dense, *ids]
            writer.write_table(pa.Table.from_arrays([pa.array(c) for c in columns], schema=schema))


def generate_data(out: Path, rows: int, cardinality: int, row_group: int, files: int, dictionary: bool,
                  skew: float) -> int:
    """Train and test splits plus schema.json; returns the train rows written (whole row groups
    in every file, so rank shares and reader chunks line up with row groups)."""
    groups = max(1, math.ceil(rows / row_group))
    files = min(files, groups)
    per_file = math.ceil(groups / files) * row_group
    test_rows = max(row_group, rows // 100)
    jobs = [(out / "train" / f"part-{i:05d}.parquet", per_file, row_group, cardinality, dictionary, i, skew)
            for i in range(files)]
    jobs += [(out / "test" / f"part-{i:05d}.parquet", test_rows // 2 + i * (test_rows % 2), row_group,
              cardinality, dictionary, 10_000 + i, skew) for i in range(2)]
    for split in ("train", "test"):
        (out / split).mkdir(parents=True, exist_ok=True)
    # fork: the workers need numpy and pyarrow only, and no fresh import of this script
    with multiprocessing.get_context("fork").Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        pool.starmap(_write_file, jobs)
    Schema(labels=list(LABELS), dense=[f"d{i}" for i in range(NUM_DENSE)],
           categorical={f"c{i}": cardinality for i in range(NUM_CATEGORICAL)},
           meta={"generator": "bench/train.py", "rows": {"train": per_file * files, "test": test_rows}}).save(out)
    return per_file * files


def ensure_data(args: argparse.Namespace, local_rank: int) -> float:
    """Local rank 0 writes the data set unless a finished one is there; the other local ranks
    wait for its _SUCCESS file (no process group yet: the pool forks before CUDA starts).
    Returns the seconds spent generating (0 when reused)."""
    done = args.data / "_SUCCESS"
    if local_rank != 0:
        while not done.exists():
            time.sleep(0.5)
        return 0.0
    if done.exists():
        print(f"[bench] reusing {args.data}", flush=True)
        return 0.0
    shutil.rmtree(args.data, ignore_errors=True)  # a half-written one from an interrupted run
    start = time.perf_counter()
    rows = generate_data(args.data, args.rows, args.cardinality, args.row_group, args.files,
                         args.parquet_dictionary, args.skew)
    done.write_text(f"{rows}\n")
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in args.data.rglob("*.parquet")) / 2**20
    print(f"[bench] wrote {rows:,} train rows ({size:,.0f} MiB) to {args.data} in {seconds:.1f}s", flush=True)
    return seconds


# ---------------------------------------------------------------------------------------
# Timing helpers


@dataclass
class Result:
    """One table row. `rates`: samples/s of each rank (None for e2e, whose rate is global)."""

    phase: str
    rate: float | None = None  # global samples/s, when measured as a whole (e2e)
    rates: list[float] = field(default_factory=list)
    notes: str = ""
    extra: dict = field(default_factory=dict)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Drops what the last phase left (its model, optimizer state and batches)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_steps(step: Callable[[int], None], env: Env, seconds: float, warmup: int) -> tuple[float, int]:
    """Seconds per step of `step(i)`: warm-up, calibration, then the timed steps between two
    synchronizations. Every rank runs the same number of steps in each part, as a phase whose
    steps talk across ranks must. Returns (seconds per step, timed steps)."""
    for i in range(warmup):
        step(i)
    n = 1
    while True:  # calibration: double the count until a round takes long enough on some rank
        sync(env.device)
        start = time.perf_counter()
        for i in range(n):
            step(i)
        sync(env.device)
        elapsed = time.perf_counter() - start
        enough = torch.tensor([float(elapsed >= min(1.0, seconds / 4))], device=env.device)
        dist.all_reduce(enough, op=dist.ReduceOp.MAX)
        if enough.item():
            break
        n *= 2
    steps = torch.tensor([max(1, math.ceil(seconds * n / elapsed))], device=env.device)
    dist.all_reduce(steps, op=dist.ReduceOp.MIN)  # the fastest rank's count would stretch the others
    steps = int(steps.item())
    dist.barrier()
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(env.device)
    return (time.perf_counter() - start) / steps, steps


def trainer_config(args: argparse.Namespace, precision: str = "fp32", run_dir: Path | None = None,
                   more: list[str] | None = None, config: Path = CONFIG) -> tuple[Config, list[str]]:
    """The reference config (or `config`) with this run's sizes; returns it with the overrides applied."""
    overrides = ["--data.path", str(args.data), "--data.batch_size", str(args.batch_size),
                 "--data.eval_batch_size", str(args.batch_size), "--data.num_workers", str(args.num_workers),
                 "--model.embedding_dim", str(args.dim), "--model.precision", precision,
                 "--model.compile", args.compile,
                 "--train.device", args.device, "--train.log_every", str(args.log_every),
                 "--train.checkpoints", "false", "--train.resume", "false",
                 "--train.tensorboard", "false", "--train.run_dir", str(run_dir or Path(args.work) / "run"),
                 *args.trainer, *(more or [])]
    return load_config(config, overrides), overrides


def bench_columns(args: argparse.Namespace) -> Columns:
    """The generated data set's columns, without reading its schema (phases that need no data)."""
    return Columns(labels=LABELS, dense=tuple(f"d{i}" for i in range(NUM_DENSE)),
                   categorical=tuple(f"c{i}" for i in range(NUM_CATEGORICAL)),
                   cardinality=(args.cardinality,) * NUM_CATEGORICAL)


def random_kjt(columns: Columns, batch: int, device: torch.device, skew: float = SKEW) -> KeyedJaggedTensor:
    """One id per row and feature, drawn as the data set's (`--skew`)."""
    values = torch.cat([(n * torch.rand(batch, device=device) ** skew).long().clamp_(max=n - 1)
                        for n in columns.cardinality])
    lengths = torch.ones(len(columns.categorical) * batch, dtype=torch.int32, device=device)
    return KeyedJaggedTensor(keys=list(columns.categorical), values=values, lengths=lengths)


def random_batch(columns: Columns, batch: int) -> Batch:
    """A CPU batch shaped like the reader's."""
    return Batch(dense=torch.randn(batch, len(columns.dense)),
                 sparse_features=random_kjt(columns, batch, torch.device("cpu")),
                 labels=torch.randint(0, 2, (batch, len(columns.labels))).float(),
                 weights=torch.ones(batch), row_ids=torch.arange(batch))


# ---------------------------------------------------------------------------------------
# Phase: end to end through the trainer


class TimeCap:
    """Stops a trainer run `seconds` after its first log record, through the trainer's own stop
    signal (SIGUSR1: every rank finishes at the same step, checkpoints, returns early), so a
    slow run stays bounded. Restores the signal handlers `train()` installs, so that SIGTERM
    ends this process again afterwards."""

    def __init__(self, metrics: Path | None, seconds: float):
        self.metrics, self.seconds = metrics, seconds
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        started = None
        while not self.done.wait(0.25):
            if started is None and self.metrics.exists():
                started = time.perf_counter()
            if started is not None and time.perf_counter() - started >= self.seconds:
                os.kill(os.getpid(), signal.SIGUSR1)
                return

    def __enter__(self) -> "TimeCap":
        self.handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
        if self.metrics is not None:  # rank 0 writes the log; a stop on one rank stops all
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        if self.thread.is_alive():
            self.thread.join()
        for s, handler in self.handlers.items():  # only after the thread can no longer signal
            signal.signal(s, handler)


def steady_state(metrics: Path) -> dict:
    """Train log records after the first 20%: median samples/s, the mean over the same window
    (epoch restarts and stalls included), and percentiles of the per-interval mean step time."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in records if "samples_per_sec" in r]
    steps = np.diff([0] + [r["step"] for r in train])  # an interval may be cut short at an evaluation
    cut = int(len(train) * 0.2)
    steady, steps = train[cut:], steps[cut:]
    if not steady:
        raise RuntimeError(f"{metrics}: no train records; lower --log-every or raise --e2e-steps")
    times = np.array([r["step_time_ms"] for r in steady])
    seconds = steps * times / 1000
    return {"median": statistics.median(r["samples_per_sec"] for r in steady),
            "mean": sum(r["samples_per_sec"] * t for r, t in zip(steady, seconds)) / seconds.sum(),
            "p50": float(np.percentile(times, 50)), "p90": float(np.percentile(times, 90)),
            "p99": float(np.percentile(times, 99)), "intervals": len(steady), "seconds": float(seconds.sum()),
            "mem": max((r.get("gpu_mem_gb", 0.0) for r in train), default=0.0)}


def run_e2e(args: argparse.Namespace, env: Env, precision: str, train_rows: int) -> Result:
    run_dir = Path(args.work) / f"run_{precision}"
    if env.rank == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    dist.barrier()
    epochs = max(1, math.ceil(args.e2e_steps * args.batch_size * env.world_size / train_rows))
    cfg, overrides = trainer_config(args, precision, run_dir, [
        "--train.epochs", str(epochs), "--train.max_steps", str(args.e2e_steps), "--train.eval_every", "0"])
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    with TimeCap(run_dir / "metrics.jsonl" if env.rank == 0 else None, 1.25 * args.e2e_seconds):
        summary = run_trainer(cfg)
    result = Result(f"e2e {precision}", extra={"overrides": overrides})
    try:
        if env.rank == 0:
            s = steady_state(run_dir / "metrics.jsonl")
            result.rate = s["median"]
            auc = summary.get("mean_auc")
            ended = (f"stopped by the {1.25 * args.e2e_seconds:.0f}s cap, no eval" if summary["stopped"]
                     else f"eval AUC {auc:.3f}" if auc is not None else "no eval")
            result.notes = (f"median of {s['intervals']} intervals ({s['seconds']:.0f}s), mean {s['mean']:,.0f}; "
                            f"step ms p50/p90/p99 {s['p50']:.1f}/{s['p90']:.1f}/{s['p99']:.1f} (interval means)"
                            + (f"; peak {s['mem']:.1f} GiB" if s["mem"] else "")
                            + f"; {summary['steps']} steps; {ended}")
    finally:
        dist.barrier()  # even when rank 0 fails here, the ranks' collectives stay paired
    return result


# ---------------------------------------------------------------------------------------
# Phase: the reader alone


def run_reader(args: argparse.Namespace, env: Env, to_device: bool, config: Path = CONFIG) -> Result:
    """This rank's share of the train split, as in training (shuffled), for --phase-seconds.
    The first chunk of each worker is not timed (worker start-up). `config`: the trainer config
    whose data options (and columns) it reads with."""
    cfg, _ = trainer_config(args, config=config)
    data = split_data(cfg, env, resolve_columns(cfg), cfg.data.train_split, train=True)
    warmup = max(1, args.num_workers) * READER_CHUNK
    cuda = env.device.type == "cuda"
    dist.barrier()  # all ranks read at once: they share the host's cores
    batches = iter_batches(data, args.num_workers, pin_memory=cuda)
    rows, start = 0, None
    for i, batch in enumerate(batches):
        if to_device:
            batch = batch.to(env.device, non_blocking=True)  # pinned source: an async copy
        if i == warmup:
            sync(env.device)
            start = time.perf_counter()
        elif i > warmup:
            rows += len(batch)
            if time.perf_counter() - start >= args.phase_seconds:
                break
    sync(env.device)
    elapsed = time.perf_counter() - start if start else 0.0
    batches.close()  # shuts the loader's workers down
    if not rows:
        raise RuntimeError(f"the rank's share has under {warmup} batches; raise --rows")
    return Result("reader + copy to GPU" if to_device else "reader", rates=[rows / elapsed],
                  notes=f"{args.num_workers} workers/rank" + (", pinned" if cuda else ""))


# ---------------------------------------------------------------------------------------
# Phase: the sharded embedding collection alone


def embedding_phase(skew: float) -> str:
    return f"embedding fwd+bwd, {'uniform ids' if skew == 1 else f'ids u^{skew:g}'}"


def run_embedding(args: argparse.Namespace, env: Env, skew: float) -> Result:
    """The trainer's own sharded collection (same planner, sharders and fused optimizer)."""
    cfg, _ = trainer_config(args)
    columns = bench_columns(args)
    dmp, _, plan = build(cfg, env, columns)
    ebc = dmp.module.model.sparse.ebc
    inputs = [random_kjt(columns, args.batch_size, env.device, skew) for _ in range(4)]

    def step(i: int) -> None:
        ebc(inputs[i % len(inputs)]).values().sum().backward()  # the optimizer runs in backward

    per_step, steps = time_steps(step, env, args.phase_seconds, args.warmup)
    kinds = collections.Counter(f"{p.sharding_type}/{p.compute_kernel}"
                                for tables in plan.plan.values() for p in tables.values())
    layout = ", ".join(f"{n}x {k}" for k, n in kinds.most_common())
    return Result(embedding_phase(skew), rates=[args.batch_size / per_step],
                  notes=f"sharded, fused rowwise Adagrad; {layout}; {cfg.model.embedding_dtype} tables; {steps} steps")


# ---------------------------------------------------------------------------------------
# Phase: the dense head alone


def run_dense(args: argparse.Namespace, env: Env, precision: str, tf32: bool = False, config: Path = CONFIG,
              columns: Columns | None = None) -> Result:
    """What the trainer runs after the embedding lookup (`MultiTaskTrain.step`: head, towers,
    losses, compiled as `model.compile` says), with backward and the dense optimizer; the
    input needs a gradient, as the pooled embeddings do in training. `config` and `columns`
    (default: this benchmark's) give the head and its input's width."""
    cfg, _ = trainer_config(args, precision, config=config)
    columns = columns or bench_columns(args)
    torch.manual_seed(0)
    wrapped = MultiTaskTrain(MultiTaskModel(columns, cfg.tasks, cfg.model, device=env.device), cfg.tasks,
                             cfg.train.gate_stats)
    params = [p for p in wrapped.parameters() if p.device.type != "meta"]  # not the tables
    optimizer = DENSE_OPTIMIZERS[cfg.optim.dense](params, lr=cfg.optim.dense_lr)
    width = len(columns.categorical) * args.dim + len(columns.dense)
    inputs = [torch.randn(args.batch_size, width, device=env.device) for _ in range(4)]
    labels = torch.randint(0, 2, (args.batch_size, len(cfg.tasks)), device=env.device).float()
    weights = torch.ones(args.batch_size, device=env.device)
    bf16 = precision == "bf16"

    def step(i: int) -> None:
        x = inputs[i % len(inputs)].requires_grad_()
        loss = wrapped.step(x, labels, weights)[0]
        optimizer.zero_grad(set_to_none=True)
        x.grad = None
        loss.backward()
        optimizer.step()

    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        per_step, steps = time_steps(step, env, args.phase_seconds, args.warmup)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    name = f"dense head {precision}" + (" + TF32" if tf32 else "")
    how = "bf16 autocast" if bf16 else "TF32 matmuls (trainer: off)" if tf32 else "fp32 matmuls, TF32 off"
    return Result(name, rates=[args.batch_size / per_step],
                  notes=f"head+towers+losses fwd+bwd+{cfg.optim.dense}, input [B, {width}]; {how}; "
                        f"compile {wrapped.compile_mode}; {steps} steps")


# ---------------------------------------------------------------------------------------
# Phase: the naive baseline


class NaiveMMoE(nn.Module):
    """The reference model written plainly: batch -> summed BCE loss.

    An unsharded EmbeddingBagCollection (dense gradients for whole tables), experts, gates and
    towers as Python lists of modules run one after another.
    """

    def __init__(self, columns: Columns, dim: int, experts: int, expert_layers: list[int],
                 tower_layers: list[int], tasks: int, device: torch.device):
        super().__init__()
        self.ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=f"t_{f}", embedding_dim=dim, num_embeddings=n, feature_names=[f],
                                       pooling=PoolingType.SUM)
                    for f, n in zip(columns.categorical, columns.cardinality)], device=device)
        width = len(columns.categorical) * dim + len(columns.dense)

        def mlp(sizes: list[int], last_relu: bool) -> nn.Sequential:
            layers: list[nn.Module] = []
            for a, b in zip(sizes[:-1], sizes[1:]):
                layers += [nn.Linear(a, b), nn.ReLU()]
            return nn.Sequential(*(layers if last_relu else layers[:-1]))

        self.experts = nn.ModuleList(mlp([width, *expert_layers], True) for _ in range(experts))
        self.gates = nn.ModuleList(nn.Linear(width, experts) for _ in range(tasks))
        self.towers = nn.ModuleList(mlp([expert_layers[-1], *tower_layers, 1], False) for _ in range(tasks))
        self.to(device)

    def forward(self, batch: Batch) -> torch.Tensor:
        x = torch.cat([self.ebc(batch.sparse_features).values(), batch.dense], dim=1)
        expert_out = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, H]
        loss = x.new_zeros(())
        for t, (gate, tower) in enumerate(zip(self.gates, self.towers)):
            mixed = (gate(x).softmax(-1).unsqueeze(2) * expert_out).sum(1)
            logit = tower(mixed).squeeze(1)
            loss = loss + nn.functional.binary_cross_entropy_with_logits(logit, batch.labels[:, t])
        return loss


def run_naive(args: argparse.Namespace, env: Env) -> Result:
    """Every rank trains its own full copy: nothing is communicated, the rate is per GPU."""
    cfg, _ = trainer_config(args)
    columns = bench_columns(args)
    torch.manual_seed(0)
    model = NaiveMMoE(columns, args.dim, cfg.model.num_experts, cfg.model.expert_layers,
                      cfg.model.tower_layers, len(cfg.tasks), env.device)
    sparse = torch.optim.Adagrad(model.ebc.parameters(), lr=cfg.optim.sparse_lr)
    dense = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith("ebc.")],
                             lr=cfg.optim.dense_lr)
    batches = [random_batch(columns, args.batch_size) for _ in range(4)]
    if env.device.type == "cuda":
        batches = [b.pin_memory() for b in batches]

    def step(i: int) -> None:
        loss = model(batches[i % len(batches)].to(env.device))
        sparse.zero_grad()
        dense.zero_grad()
        loss.backward()
        sparse.step()
        dense.step()

    per_step, steps = time_steps(step, env, args.phase_seconds, args.warmup)
    return Result("naive baseline", rates=[args.batch_size / per_step],
                  notes=f"fp32, unsharded EBC (dense table gradients) + torch Adagrad, module loops, "
                        f"blocking copy; {steps} steps")


# ---------------------------------------------------------------------------------------
# Report


def versions() -> dict[str, str]:
    import fbgemm_gpu

    return {"python": platform.python_version(), "torch": torch.__version__, "torchrec": torchrec.__version__,
            "fbgemm_gpu": getattr(fbgemm_gpu, "__version__", "?"), "pyarrow": pa.__version__}


def device_name(env: Env) -> str:
    if env.device.type == "cuda":
        return torch.cuda.get_device_name(env.device)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "CPU")
    return f"CPU ({cpu})"


def table(results: list[Result], world: int) -> tuple[list[str], dict[str, float]]:
    """Markdown rows, and each phase's per-GPU rate (for the scaling comparison)."""
    per_gpu = {r.phase: (r.rate if r.rate is not None else sum(r.rates)) / world
               for r in results if r.rate is not None or r.rates}
    naive = per_gpu.get("naive baseline")
    lines = ["| phase | samples/s | per GPU | vs naive | notes |", "| --- | ---: | ---: | ---: | --- |"]
    for r in results:
        if r.phase not in per_gpu:
            lines.append(f"| {r.phase} | | | | {r.notes} |")
            continue
        note = r.notes
        if len(r.rates) > 1:
            note += f"; slowest rank {min(r.rates):,.0f}"
        speedup = f"{per_gpu[r.phase] / naive:.1f}x" if naive and not r.phase.startswith("reader") else ""
        lines.append(f"| {r.phase} | {per_gpu[r.phase] * world:,.0f} | {per_gpu[r.phase]:,.0f} | {speedup} | {note} |")
    return lines, per_gpu


def serial_sums(per_gpu: dict[str, float], skew: float) -> list[str]:
    """Per precision: the embedding and the dense head run one after the other (at the data's
    ids), as samples/s, and end to end against it."""
    out = []
    embedding = per_gpu.get(embedding_phase(skew))
    for precision in ("fp32", "bf16"):
        dense, e2e = per_gpu.get(f"dense head {precision}"), per_gpu.get(f"e2e {precision}")
        if embedding and dense:
            serial = 1 / (1 / embedding + 1 / dense)
            out.append(f"Serial sum of the parts, {precision}: {serial:,.0f} samples/s per GPU"
                       + (f"; end to end is {e2e / serial:.0%} of it." if e2e else "."))
    return out


def scaling(out: Path, record: dict) -> str:
    """End-to-end per-GPU rate against the newest 1-process section of the same device and
    sizes in `out`, when there is one."""
    if record["world"] == 1 or not out.exists():
        return ""
    same = ("device", "cardinality", "dim", "batch_size")
    base = None
    for m in re.finditer(r"<!-- bench (\{.*?\}) -->", out.read_text()):
        prior = json.loads(m.group(1))
        if prior["world"] == 1 and all(prior.get(k) == record[k] for k in same):
            base = prior
    if base is None:
        return f"Scaling: no 1-GPU section for this device and sizes in {out.name} to compare with."
    parts = [f"{p} {record['per_gpu'][p] / base['per_gpu'][p]:.0%}" for p in record["per_gpu"]
             if p.startswith("e2e") and base["per_gpu"].get(p)]
    return (f"Scaling (per-GPU e2e rate vs the 1-GPU run of {base['date']}; issue target >= 90%): "
            + (", ".join(parts) or "no common e2e phase"))


def report(args: argparse.Namespace, env: Env, results: list[Result], timings: dict[str, float],
           train_rows: int | None, command: str) -> str:
    v = versions()
    now = datetime.datetime.now(datetime.timezone.utc)
    name = device_name(env)
    rows, per_gpu = table(results, env.world_size)
    record = {"date": now.strftime("%Y-%m-%d %H:%M UTC"), "device": name, "world": env.world_size,
              "rows": train_rows, "cardinality": args.cardinality, "dim": args.dim,
              "batch_size": args.batch_size, "per_gpu": {k: round(x) for k, x in per_gpu.items()}}
    e2e_run = next((r for r in results if "overrides" in r.extra), None)
    e2e = {p: x for p, x in per_gpu.items() if p.startswith("e2e")}
    lines = [
        f"## {record['date']}: {env.world_size} x {name}",
        "",
        f"Versions: Python {v['python']}, torch {v['torch']}, torchrec {v['torchrec']}, fbgemm_gpu "
        f"{v['fbgemm_gpu']}, pyarrow {v['pyarrow']}. CPU cores: {os.cpu_count()}.",
        f"Sizes: {train_rows or 0:,} train rows, 26 tables x {args.cardinality:,} rows x dim {args.dim}, "
        f"batch {args.batch_size:,} per rank, {args.num_workers} reader workers per rank; Parquet with snappy, "
        f"{'dictionary' if args.parquet_dictionary else 'plain'} encoding, row groups of {args.row_group:,}.",
    ]
    if e2e_run:
        p = e2e_run.phase.split()[-1]  # the other precision's run differs only in these two values
        text = shlex.join(e2e_run.extra["overrides"]).replace(f"precision {p}", "precision <p>")
        lines.append(f"Trainer: `{CONFIG.relative_to(ROOT)}` with `{text.replace(f'run_{p}', 'run_<p>')}` "
                     f"for each precision <p>.")
    lines += [f"Reproduce: `{command}`", "", *rows, ""]
    if e2e:
        lines.append(f"Target >= {TARGET_PER_GPU:,} samples/s per GPU end to end: " + ", ".join(
            f"{p[4:]} {x:,.0f} ({'met' if x >= TARGET_PER_GPU else 'missed'})" for p, x in e2e.items()) + ".")
    lines += serial_sums(per_gpu, args.skew)
    line = scaling(Path(args.out), record)
    if line:
        lines.append(line)
    lines.append("Phase wall times (s): " + ", ".join(f"{k} {x:.0f}" for k, x in timings.items()) + ".")
    lines += ["", f"<!-- bench {json.dumps(record)} -->", ""]
    return "\n".join(lines)


HEADER = """# Training throughput

Sections appended by `make bench` (`bench/train.py`), newest last: one run each, on the machine
and versions it names. Rates are samples/s; "per GPU" divides by the number of ranks (CPU
processes on machines without GPUs). Rows other than e2e time one part alone; see the script's
docstring for what each phase runs.
"""


def write_report(out: Path, section: str) -> None:
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(HEADER)
    with open(out, "a") as f:
        f.write("\n" + section)


# ---------------------------------------------------------------------------------------


def launch_command(argv: list[str], script: str = "bench/train.py") -> str:
    """The command that reproduces this run's numbers (--out changes none of them)."""
    keep = [a for i, a in enumerate(argv) if not (a == "--out" or a.startswith("--out=")
                                                  or (i and argv[i - 1] == "--out"))]
    if "LOCAL_WORLD_SIZE" in os.environ:
        return (f"torchrun --standalone --nproc-per-node {os.environ['LOCAL_WORLD_SIZE']} {script} "
                + shlex.join(keep)).strip()
    return f"python {script} {shlex.join(keep)}".strip()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    setup_logging()
    command = launch_command(argv)  # before init_distributed fills in RANK and friends
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.device = "cuda" if cuda else "cpu"
    fill_defaults(args, cuda, int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    Path(args.work).mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    train_rows = None
    needs_data = not {"e2e", "reader"} <= args.skip
    if needs_data:
        timings["data"] = ensure_data(args, int(os.environ.get("LOCAL_RANK", 0)))
        train_rows = int((args.data / "_SUCCESS").read_text())
    env = init_distributed(args.device)
    main_rank = env.rank == 0
    say = (lambda text: print(f"[bench] {text}", flush=True)) if main_rank else (lambda text: None)
    say(f"{env.world_size} rank(s) on {device_name(env)}; batch {args.batch_size}/rank, "
        f"dim {args.dim}, cardinality {args.cardinality:,}, {args.num_workers} workers/rank")

    phases: list[tuple[str, str, Callable[[], Result]]] = []
    for p in args.precisions:
        phases.append(("e2e", f"e2e {p}", lambda p=p: run_e2e(args, env, p, train_rows)))
    phases += [("reader", "reader", lambda: run_reader(args, env, False))]
    if cuda:
        phases.append(("reader", "reader + copy to GPU", lambda: run_reader(args, env, True)))
    for skew in dict.fromkeys((args.skew, 1.0)):  # the data's ids, and uniform ones
        phases.append(("embedding", embedding_phase(skew), lambda skew=skew: run_embedding(args, env, skew)))
    for p in args.precisions:
        phases.append(("dense", f"dense head {p}", lambda p=p: run_dense(args, env, p)))
    if cuda and "fp32" in args.precisions:
        phases.append(("dense", "dense head fp32 + TF32", lambda: run_dense(args, env, "fp32", tf32=True)))
    phases.append(("naive", "naive baseline", lambda: run_naive(args, env)))

    results: list[Result] = []
    for group, name, fn in phases:
        if group in args.skip:
            results.append(Result(name, notes="skipped (--skip)"))
            continue
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as e:  # one failing phase (e.g. out of memory) still leaves a table
            result = Result(name, notes=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        free_memory(env.device)
        timings[name] = time.perf_counter() - start
        mine = f"{sum(result.rates):,.0f}/s on rank 0" if result.rates else \
            f"{result.rate:,.0f}/s" if result.rate else result.notes
        say(f"{name}: {timings[name]:.0f}s, {mine}")
        results.append(result)
    if not cuda:
        results.insert(next(i for i, r in enumerate(results) if r.phase.startswith("reader")) + 1,
                       Result("reader + copy to GPU", notes="skipped (no GPU)"))

    # per-rank rates to rank 0
    gathered: list[list[list[float]]] = [None] * env.world_size  # type: ignore[list-item]
    dist.all_gather_object(gathered, [r.rates for r in results])
    for i, r in enumerate(results):
        r.rates = [rate for ranks in gathered for rate in ranks[i]]
    if main_rank:
        section = report(args, env, results, timings, train_rows, command)
        write_report(Path(args.out), section)
        body = section.split("<!-- bench")[0].rstrip()
        print(f"\n{body}\n\nappended to {args.out}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
