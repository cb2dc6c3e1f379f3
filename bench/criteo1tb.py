"""Criteo 1TB shape benchmark on one GPU; appends a dated section to bench/RESULTS.md.

The MLPerf DLRM-DCNv2 (Criteo 1TB) embedding shape of configs/criteo1tb_mmoe.toml: 26 tables
c0..c25 (about 204M rows, 105 GB of fp32 weights at dim 128), multi-hot with 214 ids a row,
13 dense columns, the MMoE head, 2 tasks; one process, one GPU (or small on CPU). Phases:

  data           synthetic Parquet of that shape (`app.sources.synthetic`, --distribution ids),
                 written once under --work and reused while its _SUCCESS file is there
  reader         the trainer's reader alone (`split_data` + `iter_batches`, pinned on a GPU),
                 and with the copy to the GPU (bench/train.py's reader phase on this config)
  embedding      the trainer's sharded collection (`app.sharded.build`, plan
                 bench/plans/criteo1tb_1gpu_141gib.json: all tables in HBM) alone, forward +
                 backward with the fused rowwise Adagrad, on batches made on the device: each
                 row holds exactly SHAPES sizes[k] ids of column k, fresh ids every step, zipf
                 (the generator's law) and uniform
  dense          bench/train.py's dense phase: MMoE head + towers + losses, bf16
  e2e hbm        the trainer (`app.train.train`) from the Parquet, all tables in HBM, bf16, no
                 checkpoints, evaluation at the end
  e2e uvm        the same with criteo1tb_1gpu_80gib.json: c20, c21 in host memory behind an HBM
                 cache (fused_uvm_caching); fbgemm's cache counters give the hit rate
  checkpoint     a trainer run that saves a DCP checkpoint of part of the tables (c0 and every
                 table under 4M rows: about 23 GB), then one that resumes from it: the
                 Checkpointer's save and load seconds, and GB/s
  embedding uvm  the embedding phase with the UVM plan and zipf ids: samples/s and the cache
                 hit rate in steady state (run last: the first phase a short time budget drops)

The cache hit rate is 1 - unique misses / unique ids, from fbgemm's `uvm_cache_stats`
(`SplitTableBatchedEmbeddingBagsCodegen(gather_uvm_cache_stats=True)`, passed through the
sharder's `fused_params`): per batch, the distinct ids of the cached tables, and those of them
the HBM cache did not hold when the batch was prefetched (bench/uvm_cache.py). The trainer is
run unchanged; this script swaps in a sharder that asks for the counters (and keeps a handle
on the model to read them) only for the UVM phases.

    python bench/criteo1tb.py                     # on one GPU: 8M rows, about 8 minutes
    python bench/criteo1tb.py --skip e2e-uvm,embedding-uvm -- --data.num_workers 10
    python bench/criteo1tb.py --rows 20000 --e2e-steps 6 --phase-seconds 1   # a CPU smoke run

On CPU (or with --max-cardinality) the tables are capped, so the plan files do not fit: the
trainer plans at start-up and the UVM phases are skipped. `--plan-files off` does the same at
full sizes, for a GPU the all-HBM plan does not fit: on 80 GiB, `-- --model.embedding_dtype fp16`
puts all tables in HBM (48.75 GiB in `mmoe plan`). --time-budget drops phases that
would not finish in time; past --hard-limit the report is written with what finished and the
process exits.
"""
from __future__ import annotations

import time

STARTED = time.time()  # before the heavy imports: --hard-limit counts from the process start

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import tomllib  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "train.py")
bench = sys.modules["bench_train"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

import app.train as app_train  # noqa: E402
from app.checkpoint import latest as latest_checkpoint  # noqa: E402
from app.config import load_config  # noqa: E402
from app.data.schema import Columns  # noqa: E402
from app.distributed import Env, init_distributed  # noqa: E402
from app.logs import setup_logging  # noqa: E402
from app.sharded import resolve_columns  # noqa: E402
from app.sources.synthetic import (COMPRESSIONS, DISTRIBUTIONS, SHAPES, SyntheticSpec, fixed_multi_hot,  # noqa: E402
                                   generate, zipf_inverse_cdf)
from bench.uvm_cache import Builds, cache_note, hit_rate, stats_delta, try_cache_stats, uvm_rows  # noqa: E402

Result = bench.Result
CONFIG = ROOT / "configs" / "criteo1tb_mmoe.toml"
PLANS = ROOT / "bench" / "plans"
PLAN_HBM, PLAN_UVM = PLANS / "criteo1tb_1gpu_141gib.json", PLANS / "criteo1tb_1gpu_80gib.json"
ROWS, SIZES = SHAPES["criteo1tb"]
TARGET = 1_500_000  # samples/s end to end on one GPU, all tables in HBM, that the report measures against
PHASES = ("reader", "embedding", "dense", "e2e-hbm", "e2e-uvm", "checkpoint", "embedding-uvm")
CHECKPOINT_SMALL = 4_000_000  # the checkpoint phase keeps c0 and every table with fewer rows
E2E_CAP = 1.5  # an e2e run is stopped (without its evaluation) past this many --e2e-seconds
RATE_GUESS = 1_000_000  # samples/s an e2e run is sized for when no phase measured a better guess
# Parquet bytes a generated row takes at full cardinalities: 6 GB for 8M rows with snappy, 14 GB
# uncompressed (the default here: it decodes in about half the reader's CPU time)
BYTES_PER_ROW = {"snappy": 800, "zstd": 600, "none": 1800}

# Defaults that depend on the device: (GPU, CPU)
DEFAULTS = {
    "rows": (8_000_000, 40_000),
    "test_rows": (200_000, 8_192),
    "max_cardinality": (0, 5_000),  # 0: the real sizes
    "batch_size": (8192, 512),
    "num_workers": (12, 1),
    "e2e_seconds": (35.0, 10.0),
    "phase_seconds": (6.0, 2.0),
    "warmup": (10, 2),
    "log_every": (20, 2),
    "row_group": (65_536, 4_096),
    "files": (32, 2),
    "checkpoint_steps": (3, 2),
    "time_budget": (510.0, 0.0),  # 0: none
    "hard_limit": (575.0, 0.0),
}


# ---------------------------------------------------------------------------------------
# Options


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = lambda key: f"(default {DEFAULTS[key][0]:,} on GPU, {DEFAULTS[key][1]:,} on CPU)"  # noqa: E731
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--rows", type=int, help=f"train rows {d('rows')}")
    p.add_argument("--test-rows", type=int, help=f"test rows, evaluated at the end of each e2e run {d('test_rows')}")
    p.add_argument("--distribution", choices=DISTRIBUTIONS, default="zipf", help="of the data's ids (default zipf)")
    p.add_argument("--zipf-alpha", type=float, default=SyntheticSpec.zipf_alpha,
                   help=f"zipf: p(id) ~ (id + 1)**-alpha (default {SyntheticSpec.zipf_alpha})")
    p.add_argument("--max-cardinality", type=int,
                   help=f"cap every table's rows; 0: none {d('max_cardinality')}; capped tables fit no "
                        "plan file")
    p.add_argument("--plan-files", choices=("auto", "off"), default="auto",
                   help="auto: bench/plans/criteo1tb_1gpu_*.json where the tables are not capped; off: the "
                        "trainer plans at start-up with the GPU's memory, and the uvm phases are skipped")
    p.add_argument("--batch-size", type=int, help=f"samples a step {d('batch_size')}")
    p.add_argument("--num-workers", type=int, help=f"reader worker processes {d('num_workers')}")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16",
                   help="of the trainer runs and the dense phase")
    p.add_argument("--compile", choices=("auto", "off", "default", "reduce-overhead"), default="auto",
                   help="the trainer's --model.compile (auto: reduce-overhead on a GPU)")
    p.add_argument("--e2e-seconds", type=float,
                   help=f"training time each e2e run is sized for; stopped at {E2E_CAP}x {d('e2e_seconds')}")
    p.add_argument("--e2e-steps", type=int,
                   help="steps of each e2e run (default on GPU: --e2e-seconds at the rate the reader, "
                        "embedding and dense phases predict; 8 on CPU)")
    p.add_argument("--phase-seconds", type=float,
                   help=f"timed part of the reader, embedding and dense phases {d('phase_seconds')}")
    p.add_argument("--warmup", type=int, help=f"untimed steps before each embedding and dense phase {d('warmup')}")
    p.add_argument("--log-every", type=int, help=f"trainer log interval in steps {d('log_every')}")
    p.add_argument("--row-group", type=int, help=f"Parquet row group rows {d('row_group')}")
    p.add_argument("--compression", choices=COMPRESSIONS, default="none",
                   help="of the Parquet files (default none: the reader decodes them in about half the CPU "
                        "time of snappy, at 2.3x the bytes)")
    p.add_argument("--files", type=int, help=f"Parquet files a split {d('files')}")
    p.add_argument("--checkpoint-steps", type=int, help=f"steps before the checkpoint is saved {d('checkpoint_steps')}")
    p.add_argument("--checkpoint-tables", default="auto",
                   help=f"columns of the checkpoint run, comma-separated (default: c0 and every table "
                        f"under {CHECKPOINT_SMALL:,} rows, less c0 when the disk is too small)")
    p.add_argument("--time-budget", type=float,
                   help=f"seconds from the start; a phase that would end past it is skipped {d('time_budget')}")
    p.add_argument("--hard-limit", type=float,
                   help=f"seconds from the start; then the report is written and the process exits {d('hard_limit')}")
    p.add_argument("--work", default="/tmp/mmoe-1tb", help="folder for the data and run directories")
    p.add_argument("--skip", default="", help=f"comma-separated phases to leave out: {','.join(PHASES)}")
    p.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.trainer = argv[cut + 1:]  # after "--": overrides for every trainer run
    args.skip = {s for s in args.skip.split(",") if s}
    unknown = args.skip - set(PHASES)
    if unknown:
        p.error(f"--skip {','.join(sorted(unknown))}: unknown phase; phases are {','.join(PHASES)}")
    return args


def fill_defaults(args: argparse.Namespace, cuda: bool) -> None:
    for key, (gpu, cpu) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, gpu if cuda else cpu)
    if args.e2e_steps is None and not cuda:
        args.e2e_steps = 8
    args.cardinalities = [min(r, args.max_cardinality) if args.max_cardinality else r for r in ROWS]
    args.capped = args.cardinalities != ROWS
    # plan files fit the real sizes on a GPU only; otherwise the trainer plans at start-up
    args.plans = cuda and not args.capped and args.plan_files == "auto"
    cap = f"_cap{args.max_cardinality}" if args.capped else ""
    args.data = Path(args.work) / (f"criteo1tb_r{args.rows}_t{args.test_rows}_{args.distribution}"
                                   + (f"{args.zipf_alpha:g}" if args.distribution == "zipf" else "")
                                   + f"{cap}_g{args.row_group}_f{args.files}_{args.compression}")
    # what bench/train.py's helpers read
    args.dim = load_config(CONFIG, args.trainer).model.embedding_dim
    args.device = "cuda" if cuda else "cpu"


# ---------------------------------------------------------------------------------------
# Data


def ensure_data(args: argparse.Namespace) -> float:
    """Writes the data set unless a finished one is there; returns the seconds it took (0 when
    reused). Runs before CUDA starts: the generator forks its workers."""
    done = args.data / "_SUCCESS"
    if done.exists():
        say(f"reusing {args.data}")
        return 0.0
    Path(args.work).mkdir(parents=True, exist_ok=True)
    need = (args.rows + args.test_rows) * BYTES_PER_ROW[args.compression]
    free = shutil.disk_usage(args.work).free
    say(f"writing {args.rows:,} + {args.test_rows:,} rows to {args.data} (about {need / 1e9:.1f} GB "
        f"at full sizes; {free / 1e9:.0f} GB free)")
    if need > free:
        say(f"warning: the disk may not hold the data set ({need / 1e9:.1f} GB, {free / 1e9:.1f} GB free)")
    shutil.rmtree(args.data, ignore_errors=True)  # a half-written one from an interrupted run
    start = time.perf_counter()
    spec = SyntheticSpec(rows={"train": args.rows, "test": args.test_rows}, cardinalities=args.cardinalities,
                         multi_hot_sizes=fixed_multi_hot(SIZES), tasks=["click", "convert"],
                         distribution=args.distribution, zipf_alpha=args.zipf_alpha,
                         files_per_split=args.files, row_group_size=args.row_group, compression=args.compression)
    generate(args.data, spec, workers=os.cpu_count() or 1)
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in args.data.rglob("*.parquet"))
    done.write_text(json.dumps({"rows": args.rows, "test_rows": args.test_rows, "bytes": size,
                                "seconds": round(seconds, 1)}) + "\n")
    say(f"wrote {size / 1e9:.2f} GB in {seconds:.1f} s with {os.cpu_count()} processes")
    return seconds


def best_auc(args: argparse.Namespace) -> dict[str, float]:
    """The generator's best achievable test AUC per task (its hidden model's)."""
    try:
        return json.loads((args.data / "schema.json").read_text())["meta"]["best_auc"]["test"]
    except (OSError, KeyError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------
# Helpers


def say(text: str) -> None:
    print(f"[bench1tb {time.time() - STARTED:5.0f}s] {text}", flush=True)


class HostMemory:
    """The machine's used memory (MemTotal - MemAvailable), sampled every `every` seconds on a
    thread while inside: reader processes and UVM tables count."""

    def __init__(self, every: float = 0.5):
        self.every, self.start, self.peak = every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def used() -> int:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0]) * 1024
        return info["MemTotal"] - info.get("MemAvailable", info.get("MemFree", 0))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self.used())

    def __enter__(self) -> "HostMemory":
        self.start = self.peak = self.used()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.used())


class Tee:
    """Stands in for sys.stdout: writes through and keeps a copy (the Checkpointer's lines)."""

    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.stream.write(text)

    def text(self) -> str:
        return "".join(self.parts)

    def __getattr__(self, name):  # flush, isatty, fileno, encoding, ...
        return getattr(self.stream, name)


@contextlib.contextmanager
def tee_stdout():
    original = sys.stdout
    sys.stdout = tee = Tee(original)
    try:
        yield tee
    finally:
        sys.stdout = original


def release(env: Env) -> None:
    """Drops what the last phase left: compiled graphs (and CUDA graphs), its model and batches."""
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    bench.free_memory(env.device)


# ---------------------------------------------------------------------------------------
# Phase: the sharded collection alone


def zipf_ids_torch(u: torch.Tensor, card: torch.Tensor, alpha: float) -> torch.Tensor:
    """`app.sources.synthetic.zipf_ids` on tensors: uniform u in [0, 1) -> ids in [0, card)
    with p(id) ~ (id + 1)**-alpha, per element's `card` (float64)."""
    x = zipf_inverse_cdf(u, card, alpha)
    return torch.minimum((x - 0.5).long().clamp_(min=0), card.long() - 1)


class MultiHotBatches:
    """KJTs of `batch` rows on the device, each row holding exactly sizes[k] ids of column k
    (the data's shape), fresh ids every call: zipf as the generator draws them, or uniform."""

    def __init__(self, columns: Columns, sizes: list[int], batch: int, distribution: str, alpha: float,
                 device: torch.device, seed: int = 0):
        self.keys, self.distribution, self.alpha = list(columns.categorical), distribution, alpha
        counts = torch.tensor([batch * k for k in sizes])
        self.card = torch.repeat_interleave(torch.tensor(columns.cardinality, dtype=torch.float64), counts).to(device)
        self.lengths = torch.repeat_interleave(torch.tensor(sizes, dtype=torch.int32), batch).to(device)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.ids_per_step = int(counts.sum())

    def ids(self, u: torch.Tensor) -> torch.Tensor:
        if self.distribution == "uniform":
            return torch.minimum((u * self.card).long(), self.card.long() - 1)
        return zipf_ids_torch(u, self.card, self.alpha)

    def __call__(self) -> KeyedJaggedTensor:
        u = torch.rand(self.ids_per_step, dtype=torch.float64, device=self.card.device, generator=self.generator)
        return KeyedJaggedTensor(keys=self.keys, values=self.ids(u), lengths=self.lengths)


def column_sizes(columns: Columns) -> list[int]:
    """Ids a row of each column (SHAPES' sizes, by the column's index c<i>)."""
    return [SIZES[int(c[1:])] for c in columns.categorical]


def plan_overrides(plan_file: Path | None) -> list[str]:
    return ["--plan.file", str(plan_file)] if plan_file else []


def layout(plan) -> str:
    kinds = collections.Counter(f"{p.sharding_type}/{p.compute_kernel}"
                                for tables in plan.plan.values() for p in tables.values())
    return ", ".join(f"{n}x {k}" for k, n in kinds.most_common())


def embedding_name(distribution: str, uvm: bool) -> str:
    return f"embedding{' uvm' if uvm else ''} fwd+bwd, {distribution} ids"


def run_embedding(args: argparse.Namespace, env: Env, plan_file: Path | None, distributions: list[str],
                  uvm: bool = False) -> list[Result]:
    """The trainer's sharded collection (same plan, sharders and fused optimizer), one build for
    all `distributions`; with `uvm`, the cache counters over the timed steps (after warm-up)."""
    cfg, _ = bench.trainer_config(args, args.precision, more=plan_overrides(plan_file), config=CONFIG)
    columns = resolve_columns(cfg)
    results = []
    with Builds(gather=uvm) as builds:
        dmp, _, plan = builds.build(cfg, env, columns)
    ebc = dmp.module.model.sparse.ebc
    where = f"plan {plan_file.name}" if plan_file else "planned at start-up"
    for distribution in distributions:
        batches = MultiHotBatches(columns, column_sizes(columns), args.batch_size, distribution, args.zipf_alpha,
                                  env.device)

        def step(i: int) -> None:
            ebc(batches()).values().sum().backward()  # the optimizer runs in backward

        for i in range(args.warmup):
            step(i)
        bench.sync(env.device)
        problems: list[str] = []
        before = try_cache_stats(dmp, problems) if uvm else None
        per_step, steps = bench.time_steps(step, env, args.phase_seconds, 0)
        notes = (f"{where}: {layout(plan)}; fused {cfg.optim.sparse}, {cfg.model.embedding_dtype} tables; "
                 f"{batches.ids_per_step / args.batch_size:.0f} ids a row, fresh each step "
                 f"({distribution}{f' alpha {args.zipf_alpha:g}' if distribution == 'zipf' else ''}); "
                 f"{steps} steps after {args.warmup} warm-up")
        extra = {"step_ms": 1000 * per_step}
        if uvm:
            stats = stats_delta(try_cache_stats(dmp, problems), before)
            notes += "; " + (builds.note or "; ".join(problems) or cache_note(
                stats, uvm_rows(plan_file) if plan_file else 0, "timed steps"))
            extra["cache"] = stats
            extra["hit_rate"] = hit_rate(stats)
        results.append(Result(embedding_name(distribution, uvm), rates=[args.batch_size / per_step],
                              notes=notes, extra=extra))
        if env.device.type == "cuda":
            extra["gpu_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
    return results


# ---------------------------------------------------------------------------------------
# Phase: end to end through the trainer


def predicted_rate(results: list[Result], embedding: str, e2e: str = "") -> float | None:
    """Samples/s an e2e run may reach: the mean rate of the e2e run `e2e` when it ran, else
    the slower of the reader (with the copy) and the serial sum of `embedding` and dense."""
    done = next((r for r in results if r.phase == e2e and r.extra.get("mean")), None)
    if done is not None:
        return done.extra["mean"]
    rate = {r.phase: r.rate or sum(r.rates) for r in results if r.rate or r.rates}
    reader = rate.get("reader + copy to GPU") or rate.get("reader")
    emb, dense = rate.get(embedding), next((x for p, x in rate.items() if p.startswith("dense head")), None)
    guesses = [x for x in (reader, 1 / (1 / emb + 1 / dense) if emb and dense else None) if x]
    return min(guesses) if guesses else None


def run_e2e(args: argparse.Namespace, env: Env, name: str, plan_file: Path | None, seconds: float,
            predicted: float | None, train_rows: int, uvm: bool = False) -> Result:
    run_dir = Path(args.work) / f"run_{name.replace(' ', '_')}"
    shutil.rmtree(run_dir, ignore_errors=True)
    guess = 0.85 * (predicted or RATE_GUESS)  # under the guess: the run should end before the cap, evaluated
    steps = args.e2e_steps or max(10 * args.log_every, math.ceil(seconds * guess / args.batch_size))
    epochs = max(1, math.ceil(steps * args.batch_size / train_rows))
    cfg, overrides = bench.trainer_config(args, args.precision, run_dir, [
        "--train.epochs", str(epochs), "--train.max_steps", str(steps), "--train.eval_every", "0",
        *plan_overrides(plan_file)], config=CONFIG)
    say(f"{name}: {steps:,} steps ({epochs} epoch(s) of {train_rows:,} rows), sized for {seconds:.0f} s at "
        f"{guess:,.0f} samples/s; stopped at {E2E_CAP * seconds:.0f} s")
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    with Builds(gather=uvm) as builds:
        with bench.TimeCap(run_dir / "metrics.jsonl", E2E_CAP * seconds):
            summary = app_train.train(cfg)
        problems: list[str] = []
        stats = try_cache_stats(builds.models[0], problems) if uvm and builds.models else None
        builds.models.clear()
    s = bench.steady_state(run_dir / "metrics.jsonl")
    aucs = {t: m.get("auc") for t, m in summary.get("tasks", {}).items()}
    best = best_auc(args)
    if summary.get("stopped"):
        ended = f"stopped by the {E2E_CAP * seconds:.0f} s cap, no eval"
    elif any(v is not None for v in aucs.values()):
        ended = "eval AUC " + " / ".join(f"{t} {v:.3f}" for t, v in aucs.items() if v is not None) + (
            " (best achievable " + " / ".join(f"{best[t]:.3f}" for t in aucs if t in best) + ")" if best else "")
    else:
        ended = "no eval"
    done = summary.get("steps", 0)
    notes = (f"{f'plan {plan_file.name}' if plan_file else 'planned at start-up'}; median of {s['intervals']} "
             f"intervals ({s['seconds']:.0f} s), mean {s['mean']:,.0f}; {done:,} steps, "
             f"{done * args.batch_size / train_rows:.1f} epochs; {ended}")
    extra = {"overrides": overrides, "p50": s["p50"], "p90": s["p90"], "p99": s["p99"], "mean": s["mean"],
             "aucs": aucs, "steps": done, "stopped": bool(summary.get("stopped"))}
    if uvm:
        notes += "; " + (builds.note or "; ".join(problems) or cache_note(
            stats, uvm_rows(plan_file) if plan_file else 0, "whole run, warm-up included, counters on"))
        extra["cache"], extra["hit_rate"] = stats, hit_rate(stats)
    return Result(name, rate=s["median"], notes=notes, extra=extra)


# ---------------------------------------------------------------------------------------
# Phase: checkpoint save and load through the trainer

SAVED = re.compile(r"saved (\S+) \(([\d.]+) GiB, with checksums\) in ([\d.]+) s")
LOADED = re.compile(r"resuming from (\S+) \(step (\d+); checked and loaded in ([\d.]+) s\)")


def parse_saved(text: str) -> tuple[float, float] | None:
    """(GiB, seconds) of the last "saved ..." line the Checkpointer printed."""
    found = SAVED.findall(text)
    return (float(found[-1][1]), float(found[-1][2])) if found else None


def parse_loaded(text: str) -> float | None:
    found = LOADED.findall(text)
    return float(found[-1][2]) if found else None


def checkpoint_columns(args: argparse.Namespace, dim: int) -> tuple[list[str], str]:
    """The checkpoint run's columns and a note: c0 and every table under CHECKPOINT_SMALL rows,
    less c0 when the disk would not hold it twice over."""
    names = [f"c{i}" for i in range(len(args.cardinalities))]
    if args.checkpoint_tables != "auto":
        return [c.strip() for c in args.checkpoint_tables.split(",") if c.strip()], "--checkpoint-tables"
    rows = dict(zip(names, args.cardinalities))
    chosen = [c for c in names if c == "c0" or rows[c] < CHECKPOINT_SMALL]
    need = sum(rows[c] for c in chosen) * (dim * 4 + 4)
    free = shutil.disk_usage(args.work).free
    if need * 1.3 > free and "c0" in chosen:
        chosen.remove("c0")
        return chosen, (f"c0 left out: {need / 1e9:.1f} GB would not fit {free / 1e9:.1f} GB free; tables under "
                        f"{CHECKPOINT_SMALL:,} rows")
    return chosen, f"c0 and the tables under {CHECKPOINT_SMALL:,} rows"


def subset_config(columns: list[str], out: Path) -> Path:
    """configs/criteo1tb_mmoe.toml with `data.categorical` = `columns`, written as JSON: its
    `[plan.tables]` keeps only those columns (the planner stops at a column the run lacks,
    and an override cannot remove a table)."""
    with open(CONFIG, "rb") as f:
        values = tomllib.load(f)
    values["name"] = CONFIG.stem
    values.setdefault("data", {})["categorical"] = list(columns)
    tables = values.get("plan", {}).get("tables", {})
    for column in [c for c in tables if c not in columns]:
        del tables[column]
    out.write_text(json.dumps(values, indent=1) + "\n")
    return out


def evict(folder: Path) -> float:
    """Flushes the checkpoint's files to disk and drops them from the page cache (best effort),
    so that the load reads the disk; returns the seconds the flush took."""
    start = time.perf_counter()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
    return time.perf_counter() - start


def run_checkpoint(args: argparse.Namespace, env: Env) -> Result:
    """A trainer run with checkpoints on, --checkpoint-steps steps, on part of the tables (it
    saves at the end, after its evaluation); then one resuming from that checkpoint for one
    more step, without saving. The checkpoint is deleted afterwards."""
    dim = args.dim
    columns, why = checkpoint_columns(args, dim)
    config = subset_config(columns, Path(args.work) / "criteo1tb_checkpoint.json")
    run_dir = Path(args.work) / "run_checkpoint"
    shutil.rmtree(run_dir, ignore_errors=True)
    common = ["--train.epochs", "1", "--model.compile", "off", "--plan.file", ""]
    n = args.checkpoint_steps
    rows = dict(zip([f"c{i}" for i in range(len(args.cardinalities))], args.cardinalities))
    table_rows = sum(rows[c] for c in columns)
    say(f"checkpoint: {len(columns)} tables ({why}), {table_rows:,} rows; {n} steps then save")
    try:
        cfg, _ = bench.trainer_config(args, args.precision, run_dir, [
            *common, "--train.checkpoints", "true", "--train.max_steps", str(n)], config=config)
        with tee_stdout() as out:
            app_train.train(cfg)
        saved = parse_saved(out.text())
        found = latest_checkpoint(run_dir)
        if found is None or saved is None:
            raise RuntimeError("the trainer wrote no checkpoint (or no 'saved ...' line)")
        size = sum(f.stat().st_size for f in found.rglob("*") if f.is_file())
        flush = evict(found)
        release(env)
        cfg, _ = bench.trainer_config(args, args.precision, run_dir, [
            *common, "--train.checkpoints", "false", "--train.resume", "true", "--train.max_steps", str(n + 1)],
            config=config)
        with tee_stdout() as out:
            summary = app_train.train(cfg)
        load = parse_loaded(out.text())
        if load is None:
            raise RuntimeError("the second run did not resume (no 'resuming from ...' line)")
        if summary.get("steps") != n + 1:
            raise RuntimeError(f"the resumed run ended at step {summary.get('steps')}, not {n + 1}")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)  # the disk
    gib, save = saved
    full_rows = sum(ROWS)
    full = full_rows * (dim * 4 + 4)  # fp32 weights and the row-wise Adagrad state, one float a row
    save_rate, load_rate = size / max(save, 1e-9), size / max(load, 1e-9)
    notes = (f"{len(columns)} tables ({why}): {table_rows:,} rows, {n} steps (compile off), saved after the "
             f"evaluation, then resumed for 1 step without saving; {size / 1e9:.2f} GB on disk "
             f"({gib:.2f} GiB as printed); save {save:.1f} s ({save_rate / 1e9:.2f} GB/s, checksums included; "
             f"then fsync {flush:.1f} s and the files dropped from the page cache), load {load:.1f} s "
             f"({load_rate / 1e9:.2f} GB/s, checked and loaded); extrapolated to all 26 tables ({full_rows:,} rows: "
             f"{full / 1e9:.0f} GB of fp32 weights and row-wise state): save about {full / save_rate:.0f} s, load "
             f"about {full / load_rate:.0f} s at the same rates, and {full / 1e9:.0f} GB of disk")
    return Result("checkpoint save + load", notes=notes,
                  extra={"save_s": save, "load_s": load, "bytes": size, "flush_s": flush, "tables": columns,
                         "full_bytes": full, "save_gbps": save_rate / 1e9, "load_gbps": load_rate / 1e9})


# ---------------------------------------------------------------------------------------
# Report


def rate_of(r: Result) -> float | None:
    return r.rate if r.rate is not None else (sum(r.rates) if r.rates else None)


def steps_cell(r: Result, batch: int) -> str:
    if "p50" in r.extra:
        return f"{r.extra['p50']:.1f}/{r.extra['p90']:.1f}/{r.extra['p99']:.1f}"
    if "step_ms" in r.extra:
        return f"{r.extra['step_ms']:.2f} (mean)"
    rate = rate_of(r)
    return f"{1000 * batch / rate:.2f} (mean)" if rate and not r.phase.startswith("reader") else ""


def gib(r: Result, key: str) -> str:
    value = r.extra.get(key)
    return f"{value:.1f}" if value is not None else ""


def summary_lines(results: list[Result]) -> list[str]:
    rate = {r.phase: rate_of(r) for r in results if rate_of(r)}
    lines = []
    e2e = rate.get("e2e hbm")
    lines.append(f"Target >= {TARGET:,} samples/s end to end with all tables in HBM: "
                 + (f"e2e hbm {e2e:,.0f} ({'met' if e2e >= TARGET else 'missed'})." if e2e else "not measured."))
    emb, dense = rate.get(embedding_name("zipf", False)), next(
        (x for p, x in rate.items() if p.startswith("dense head")), None)
    if emb and dense:
        serial = 1 / (1 / emb + 1 / dense)
        lines.append(f"Serial sum of the embedding (zipf ids) and the dense head: {serial:,.0f} samples/s"
                     + (f"; e2e hbm is {e2e / serial:.0%} of it." if e2e else "."))
    reader = rate.get("reader + copy to GPU") or rate.get("reader")
    if reader and e2e:
        lines.append(f"Reader{' + copy' if 'reader + copy to GPU' in rate else ''} alone: {reader:,.0f} samples/s, "
                     f"{reader / e2e:.2f}x e2e hbm.")
    return lines


def report(args: argparse.Namespace, env: Env, results: list[Result], timings: dict[str, float],
           train_rows: int, command: str, data_seconds: float, cut: str = "") -> str:
    v = bench.versions()
    now = datetime.datetime.now(datetime.timezone.utc)
    name = bench.device_name(env)
    e2e_run = next((r for r in results if "overrides" in r.extra), None)
    tables = (f"26 tables, {sum(args.cardinalities):,} rows"
              + (f" (capped at {args.max_cardinality:,} rows a table)" if args.capped else "")
              + f", dim {args.dim}, {sum(SIZES)} ids a row")
    info = json.loads((args.data / "_SUCCESS").read_text()) if (args.data / "_SUCCESS").exists() else {}
    data = (f"written in {data_seconds:.0f} s with {os.cpu_count()} processes" if data_seconds
            else f"reused (written in {info.get('seconds', '?')} s)")
    lines = [
        f"## {now:%Y-%m-%d %H:%M} UTC: 1 x {name}, Criteo 1TB shape (`bench/criteo1tb.py`)",
        "",
        f"Versions: Python {v['python']}, torch {v['torch']}, torchrec {v['torchrec']}, fbgemm_gpu "
        f"{v['fbgemm_gpu']}, pyarrow {v['pyarrow']}. CPU cores: {os.cpu_count()}.",
        f"Sizes: {train_rows:,} train rows, {args.test_rows:,} test rows, {tables}; {args.distribution} ids"
        + (f" (alpha {args.zipf_alpha:g})" if args.distribution == "zipf" else "")
        + f"; Parquet ({args.compression if args.compression != 'none' else 'uncompressed'}, "
        f"{info.get('bytes', 0) / 1e9:.1f} GB, {args.files} files a split, row groups of "
        f"{args.row_group:,}) {data}; batch {args.batch_size:,}, {args.num_workers} reader workers, "
        f"{args.precision}.",
        ("Plans: `bench/plans/criteo1tb_1gpu_141gib.json` (all tables in HBM) for embedding and e2e hbm, "
         "`criteo1tb_1gpu_80gib.json` (c20, c21 in fused_uvm_caching) for the uvm phases."
         if args.plans else "Plans: none (tables capped, no GPU or --plan-files off): the trainer planned at start-up; "
                            "the uvm phases need the plan files."),
    ]
    if e2e_run:
        text = shlex.join(e2e_run.extra["overrides"]).replace(f"{ROOT}/", "")
        lines.append(f"Trainer: `{CONFIG.relative_to(ROOT)}` with `{text}` ({e2e_run.phase}; the other trainer runs "
                     f"differ in their run directory, plan file, steps and checkpoints).")
    lines += [f"Reproduce: `{command}`", "",
              "| phase | samples/s | step ms p50/p90/p99 | peak GPU GiB | peak host GiB (at start) | notes |",
              "| --- | ---: | --- | ---: | ---: | --- |"]
    for r in results:
        rate = rate_of(r)
        lines.append(f"| {r.phase} | {f'{rate:,.0f}' if rate else ''} | {steps_cell(r, args.batch_size)} | "
                     f"{gib(r, 'gpu_gib')} | {gib(r, 'host_gib')}"
                     + (f" ({r.extra['host_start_gib']:.1f})" if "host_start_gib" in r.extra else "")
                     + f" | {r.notes} |")
    lines += ["", *summary_lines(results)]
    lines.append("Peak GPU is `torch.cuda.max_memory_allocated` over the phase (UVM tables live in host "
                 "memory, outside it); peak host is the machine's used memory (MemTotal - MemAvailable) "
                 "sampled every 0.5 s, reader processes included. e2e rates are the median of the trainer's "
                 "log intervals after the first 20%; the other phases time steps between synchronizations.")
    if cut:
        lines.append(cut)
    lines.append("Phase wall times (s): " + ", ".join(f"{k} {x:.0f}" for k, x in timings.items())
                 + f"; total {time.time() - STARTED:.0f}.")
    record = {"date": f"{now:%Y-%m-%d %H:%M UTC}", "device": name, "rows": train_rows,
              "cardinality_cap": args.max_cardinality, "batch_size": args.batch_size,
              "rates": {r.phase: round(rate_of(r)) for r in results if rate_of(r)},
              "hit_rates": {r.phase: r.extra["hit_rate"] for r in results if r.extra.get("hit_rate") is not None}}
    ckpt = next((r for r in results if "save_s" in r.extra), None)
    if ckpt:
        record["checkpoint"] = {k: ckpt.extra[k] for k in ("save_s", "load_s", "bytes")}
    lines += ["", f"<!-- bench1tb {json.dumps(record)} -->", ""]
    return "\n".join(lines)


def final_table(results: list[Result], batch: int) -> str:
    rows = [("phase", "samples/s", "step p50/p99 ms", "peak GPU GiB", "peak host GiB")]
    for r in results:
        rate = rate_of(r)
        step = f"{r.extra['p50']:.1f}/{r.extra['p99']:.1f}" if "p50" in r.extra else \
            steps_cell(r, batch).replace(" (mean)", " mean")
        if "save_s" in r.extra:
            step = f"save {r.extra['save_s']:.1f} s, load {r.extra['load_s']:.1f} s"
        label = r.phase + (f" (hit {r.extra['hit_rate']:.1%})" if r.extra.get("hit_rate") is not None else "")
        if not rate and "save_s" not in r.extra:
            label += f": {r.notes[:90]}"
        rows.append((label, f"{rate:,.0f}" if rate else "", step, gib(r, "gpu_gib"), gib(r, "host_gib")))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


# ---------------------------------------------------------------------------------------


@dataclass
class Phase:
    group: str
    name: str
    run: Callable[[float], Result | list[Result]]  # gets the e2e seconds it may use
    estimate: Callable[[], float]  # seconds it takes on the GPU, roughly
    gpu_only: str = ""  # the note where there is no GPU, if it needs one
    needs_plans: bool = False


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    setup_logging()
    if int(os.environ.get("WORLD_SIZE", 1)) != 1:
        raise SystemExit("bench/criteo1tb.py measures one GPU: run it as one process (or torchrun with 1 rank)")
    command = bench.launch_command(argv, "bench/criteo1tb.py")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    fill_defaults(args, cuda)
    timings: dict[str, float] = {}
    data_seconds = ensure_data(args)
    timings["data"] = data_seconds
    train_rows = json.loads((args.data / "schema.json").read_text())["meta"]["rows"]["train"]
    env = init_distributed(args.device)
    say(f"{bench.device_name(env)}; {train_rows:,} train rows, batch {args.batch_size:,}, {args.num_workers} "
        f"workers, {'plan files' if args.plans else 'no plan files (planned at start-up)'}; "
        f"budget {args.time_budget or 'none'} s, hard limit {args.hard_limit or 'none'} s")

    results: list[Result] = []
    current = {"phase": None}
    lock = threading.Lock()
    reported = []

    def finish(cut: str = "") -> None:
        with lock:
            if reported:
                return
            reported.append(True)
            shown = list(results)
            if current["phase"] is not None:
                shown.append(Result(current["phase"], notes=cut))
            section = report(args, env, shown, timings, train_rows, command, data_seconds, cut)
            bench.write_report(Path(args.out), section)
            print(f"\n{section.split('<!-- bench1tb')[0].rstrip()}\n\nappended to {args.out}\n", flush=True)
            print(final_table(shown, args.batch_size), flush=True)

    if args.hard_limit:
        def fire() -> None:
            finish(f"cut off at the hard limit ({args.hard_limit:.0f} s from the start)")
            for child in multiprocessing.active_children():  # reader workers would hold the output open
                child.kill()
            os._exit(0)
        timer = threading.Timer(max(1.0, args.hard_limit - (time.time() - STARTED)), fire)
        timer.daemon = True
        timer.start()

    hbm = PLAN_HBM if args.plans else None
    uvm = PLAN_UVM if args.plans else None
    ps, es = args.phase_seconds, args.e2e_seconds
    phases = [
        Phase("reader", "reader", lambda _: bench.run_reader(args, env, False, config=CONFIG), lambda: ps + 6),
        Phase("reader", "reader + copy to GPU", lambda _: bench.run_reader(args, env, True, config=CONFIG),
              lambda: ps + 6, gpu_only="skipped: no GPU to copy to"),
        Phase("embedding", "embedding", lambda _: run_embedding(args, env, hbm, ["zipf", "uniform"]),
              lambda: 25 + 2 * (ps + 2)),
        Phase("dense", f"dense head {args.precision}",
              lambda _: bench.run_dense(args, env, args.precision, config=CONFIG,
                                        columns=resolve_columns(bench.trainer_config(args, config=CONFIG)[0])),
              lambda: 25 + ps),
        Phase("e2e-hbm", "e2e hbm", lambda s: run_e2e(args, env, "e2e hbm", hbm, s, predicted_rate(
            results, embedding_name("zipf", False)), train_rows), lambda: 50 + es),
        Phase("e2e-uvm", "e2e uvm", lambda s: run_e2e(args, env, "e2e uvm", uvm, s, predicted_rate(
            results, embedding_name("zipf", False), e2e="e2e hbm"), train_rows, uvm=True),
              lambda: 60 + es, gpu_only="skipped: no GPU (UVM tables need one)", needs_plans=True),
        Phase("checkpoint", "checkpoint save + load", lambda _: run_checkpoint(args, env), lambda: 90),
        Phase("embedding-uvm", embedding_name("zipf", True),
              lambda _: run_embedding(args, env, uvm, ["zipf"], uvm=True), lambda: 40 + ps,
              gpu_only="skipped: no GPU (UVM tables need one)", needs_plans=True),
    ]
    for phase in phases:
        if phase.group in args.skip:
            results.append(Result(phase.name, notes="skipped (--skip)"))
            continue
        if phase.gpu_only and not cuda:
            results.append(Result(phase.name, notes=phase.gpu_only))
            continue
        if phase.needs_plans and not args.plans:
            results.append(Result(phase.name, notes="skipped: no plan file (capped tables or --plan-files off), "
                                                    "and only the plan file puts tables in UVM"))
            continue
        seconds = es
        if args.time_budget:
            left = args.time_budget - (time.time() - STARTED)
            need = phase.estimate()
            if phase.group.startswith("e2e") and need > left:
                seconds = es - (need - left)  # a shorter run, rather than none
                need = left if seconds >= 10 else need
            if need > left:
                results.append(Result(phase.name, notes=f"skipped: time budget ({left:.0f} s left of "
                                                        f"{args.time_budget:.0f}, needs about {need:.0f})"))
                say(f"{phase.name}: skipped, {left:.0f} s left of the budget")
                continue
        say(f"{phase.name}: starting")
        current["phase"] = phase.name
        start = time.perf_counter()
        if cuda:
            torch.cuda.reset_peak_memory_stats(env.device)
        with HostMemory() as host:
            try:
                out = phase.run(seconds)
            except Exception as e:  # one failing phase (out of memory, say) still leaves a table
                print(traceback.format_exc()[-3000:], flush=True)
                first = str(e).strip().splitlines()[0][:240] if str(e).strip() else ""
                out = Result(phase.name, notes=f"failed: {type(e).__name__}: {first}")
        out = out if isinstance(out, list) else [out]
        for r in out:
            if cuda:
                r.extra.setdefault("gpu_gib", torch.cuda.max_memory_allocated(env.device) / 2**30)
            r.extra.setdefault("host_gib", host.peak / 2**30)
            r.extra.setdefault("host_start_gib", host.start / 2**30)
        release(env)
        with lock:
            results.extend(out)
            current["phase"] = None
        timings[phase.name] = time.perf_counter() - start
        left = f"; {torch.cuda.memory_allocated(env.device) / 2**30:.1f} GiB still allocated" if cuda else ""
        for r in out:
            rate = rate_of(r)
            say(f"{r.phase}: {timings[phase.name]:.0f} s, " + (f"{rate:,.0f} samples/s; " if rate else "")
                + r.notes + left)
    finish()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
