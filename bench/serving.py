"""Serving benchmark of exported models (`mmoe export`); appends a dated section to bench/SERVING.md.

For each model: a short training run (`python -m app train`, its final checkpoint) or a given
one, exported with fp32 and int8 tables (`--quantize`), then per artifact: latency p50/p99 of
one call at batch 1, 64 and 1,024 (distinct random batches, single-hot ids drawn uniformly,
after 5 warm-up calls, for `--seconds` per batch size), rows/s at each batch, the artifact's
size against the checkpoint's, the load time in a fresh process, the largest score difference
to the fp32 artifact, and each task's AUC on the test split (`mmoe predict --artifact`'s scores).

Models: `census` (configs/census_mmoe.toml on data/census: `make data`) and `criteo`
(configs/criteo_mmoe.toml's model on synthetic Criteo-shape data, 26 tables of
`--cardinality` rows, small enough for a CPU).

    python bench/serving.py [--models census,criteo] [--quantize none,int8] [--threads 1]
                            [--seconds 3] [--cardinality 20000] [--device cpu|cuda]
                            [--census-run runs/census_mmoe]     # `make train`'s run, not a short one
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from torchmetrics.functional.classification import binary_auroc  # noqa: E402

from app.artifact import PROGRAM, Artifact  # noqa: E402
from app.distributed import Env  # noqa: E402
from app.export import export  # noqa: E402
from app.logs import setup_logging  # noqa: E402
from app.predict import artifact_outputs  # noqa: E402
from app.sources.synthetic import SyntheticSpec, generate  # noqa: E402
from train import device_name, versions  # noqa: E402  (bench/train.py)

BATCHES = (1, 64, 1024)
WARMUP, DISTINCT = 5, 16  # untimed calls; random batches cycled through
MODELS = {  # config, trainer overrides (a few steps: the weights only need to be a trained run's)
    "census": ("configs/census_mmoe.toml", ["--train.max_steps", "20"]),
    "criteo": ("configs/criteo_mmoe.toml", ["--train.max_steps", "3", "--data.batch_size", "512",
                                            "--data.eval_batch_size", "1024", "--data.num_workers", "0"]),
}


def criteo_data(work: Path, cardinality: int) -> Path:
    out = work / f"criteo_c{cardinality}"
    if not (out / "schema.json").exists():
        generate(out, SyntheticSpec(rows={"train": 8192, "test": 2048}, cardinalities=[cardinality] * 26))
    return out


def trained_run(name: str, data: Path, work: Path) -> Path:
    config, overrides = MODELS[name]
    run = work / f"run_{name}"
    shutil.rmtree(run, ignore_errors=True)  # a fresh run
    cmd = [sys.executable, "-m", "app", "train", "--config", config, "--data.path", str(data),
           "--train.run_dir", str(run), "--train.tensorboard", "false", "--train.device", "cpu", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if proc.returncode:
        sys.exit(f"training {name} failed:\n{proc.stderr[-3000:]}")
    return run


def random_batches(meta: dict, batch: int, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(batch)
    out = []
    for _ in range(DISTINCT):
        values = torch.cat([torch.randint(0, n, (batch,), generator=g) for n in meta["cardinality"]])
        lengths = torch.ones(len(meta["features"]) * batch, dtype=torch.int32)
        out.append(tuple(t.to(device) for t in (torch.randn(batch, len(meta["dense"]), generator=g), values, lengths)))
    return out


def time_calls(models: dict[str, Artifact], batches: list, seconds: float) -> dict[str, list[float]]:
    """Seconds of each call, the models taking turns (a busy machine slows them alike), on the
    device's clock (a GPU call is waited for)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times: dict[str, list[float]] = {q: [] for q in models}
    with torch.inference_mode():
        for model in models.values():
            for b in batches[:WARMUP]:
                model(*b)
        sync()
        end = time.perf_counter() + seconds * len(models)
        for i in itertools.count():
            if time.perf_counter() > end and i >= WARMUP:
                return times
            for quantize, model in models.items():
                start = time.perf_counter()
                model(*batches[i % len(batches)])
                sync()
                times[quantize].append(time.perf_counter() - start)


def load_seconds(folder: Path) -> float:
    """torch.export.load and .module() in a fresh process that has imported torch, as a server does."""
    code = ("import sys, time, torch; start = time.perf_counter(); torch.export.load(sys.argv[1]).module(); "
            "print(time.perf_counter() - start)")
    proc = subprocess.run([sys.executable, "-c", code, str(folder / PROGRAM)], capture_output=True, text=True, check=True)
    return float(proc.stdout.split()[-1])


def split_auc(folder: Path, data: Path) -> list[float]:
    """Each task's AUC on the test split."""
    outputs = list(artifact_outputs(folder, "test", ["--data.path", str(data)]))
    scores = torch.cat([s for _, s in outputs])
    labels = torch.cat([b.labels for b, _ in outputs]).long()
    return [binary_auroc(scores[:, t], labels[:, t]).item() for t in range(scores.shape[1])]


def folder_mb(path: Path) -> float:
    """A file's or a folder's size."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6


def measure(name: str, data: Path, args: argparse.Namespace) -> list[str]:
    """Markdown rows of one model: one per (quantize, batch)."""
    folders = {q: args.work / f"{name}_{q}" for q in args.quantize}
    models = {q: Artifact(folder) for q, folder in folders.items()}
    ckpt = folder_mb(Path(models["none"].meta["checkpoint"]))
    about = {q: (folder_mb(folder / PROGRAM), load_seconds(folder), " / ".join(f"{x:.4f}" for x in split_auc(folder, data)))
             for q, folder in folders.items()}
    rows = []
    for b in BATCHES:
        batches = random_batches(models["none"].meta, b, models["none"].device)
        times = time_calls(models, batches, args.seconds)
        with torch.inference_mode():
            scores = {q: torch.cat([model(*x) for x in batches]).cpu() for q, model in models.items()}
        for q, ms in times.items():
            ms = torch.tensor(ms) * 1e3
            diff = f"{(scores[q] - scores['none']).abs().max().item():.1e}" if q != "none" else ""
            size, loaded, auc = about[q]
            rows.append(f"| {name} | {q} | {b:,} | {ms.quantile(0.5).item():.2f} | {ms.quantile(0.99).item():.2f} | "
                        f"{len(ms)} | {b * len(ms) / ms.sum().item() * 1e3:,.0f} | {size:.1f} | {ckpt:.1f} | "
                        f"{loaded:.1f} | {diff} | {auc if b == BATCHES[0] else ''} |")
    return rows


def sizes(name: str, args: argparse.Namespace) -> str:
    meta = json.loads((args.work / f"{name}_none" / "meta.json").read_text())
    rows = sum(meta["cardinality"])
    dim = json.loads((args.work / f"{name}_none" / "config.json").read_text())["model"]["embedding_dim"]
    dense = sum(t.numel() for k, t in torch.export.load(str(args.work / f"{name}_none" / PROGRAM)).state_dict.items()
                if not k.startswith("embeddings."))
    return (f"{name}: {len(meta['features'])} tables, {rows:,} rows in all, dim {dim} ({rows * dim * 4 / 1e6:.2f} MB "
            f"in fp32); {len(meta['dense'])} dense columns; {dense:,} dense parameters; tasks {', '.join(meta['tasks'])}; "
            f"exported from {meta['checkpoint']} (step {meta['step']})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="census,criteo")
    p.add_argument("--quantize", default="none,int8", help="comma list of none, int8, int4")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the timed calls")
    p.add_argument("--seconds", type=float, default=3.0,
                   help="timed calls per batch size and variant, in seconds (at least 5 calls)")
    p.add_argument("--cardinality", type=int, default=20_000, help="rows of each criteo table")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the artifacts run")
    p.add_argument("--census-data", default=str(ROOT / "data" / "census"))
    p.add_argument("--census-run", help="a trained census run to export (default: a 20-step run)")
    p.add_argument("--work", type=Path, default=Path("/tmp/mmoe-bench-serving"))
    p.add_argument("--out", default=str(ROOT / "bench" / "SERVING.md"))
    args = p.parse_args()
    args.models, args.quantize = args.models.split(","), args.quantize.split(",")
    if args.quantize[0] != "none":
        args.quantize.insert(0, "none")  # the reference of size and score differences
    setup_logging()
    args.work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    rows, notes = [], []
    for name in args.models:
        data = Path(args.census_data) if name == "census" else criteo_data(args.work, args.cardinality)
        print(f"[serving] {name}: training and exporting", flush=True)
        run = Path(args.census_run) if name == "census" and args.census_run else trained_run(name, data, args.work)
        for quantize in args.quantize:
            export(run, args.work / f"{name}_{quantize}", quantize, args.device, ["--data.path", str(data)])
        torch.set_num_threads(args.threads)
        print(f"[serving] {name}: timing", flush=True)
        rows += measure(name, data, args)
        notes.append(sizes(name, args))
    v = versions()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = "\n".join([
        f"## {now}: {device_name(Env(0, 1, 0, 1, torch.device(args.device)))}, {args.threads} thread(s)", "",
        f"Versions: Python {v['python']}, torch {v['torch']}, torchrec {v['torchrec']}, fbgemm_gpu {v['fbgemm_gpu']}. "
        f"CPU cores: {os.cpu_count()}; load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.",
        *[f"- {n}" for n in notes],
        f"Reproduce: `{shlex.join(['python', 'bench/serving.py', *sys.argv[1:]])}`", "",
        "| model | tables | batch | p50 ms | p99 ms | calls | rows/s | artifact MB | checkpoint MB | load s "
        "| max diff to fp32 | test AUC per task |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |", *rows, ""])
    out = Path(args.out)
    if not out.exists():
        out.write_text(HEADER)
    with open(out, "a") as f:
        f.write("\n" + section)
    print(f"\n{section}\nappended to {out}")


HEADER = """# Serving: exported models

Sections appended by `python bench/serving.py`, newest last: one run each, on the machine and
versions it names. Latency is one call of the loaded artifact (`app.artifact.Artifact`:
`torch.export.load(...).module()` behind a dtype cast), the variants of a model taking turns
call by call; rows/s is batch x calls / time spent in them. The checkpoint's size counts every
file of it, optimizer state included; the artifact's is model.pt2. "load s":
`torch.export.load(...).module()` in a fresh process. "max diff to fp32": the largest
|score - fp32 artifact's score| over the timed batches.
"""


if __name__ == "__main__":
    main()
