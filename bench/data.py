"""Input pipeline benchmarks; writes bench/DATA.md.

Loader: samples/s from Criteo-shape Parquet to ready `Batch` objects through the reader
(`ParquetBatches` + `iter_batches`, batch 8192, 0 and N DataLoader workers), against
pyarrow's raw read of every column of the same row groups in the same run.
Converter (--convert-mb N): a synthetic Criteo TSV of about N MB through
`mmoe data criteo-tsv`, timed, with the peak memory of its whole process tree.

    python bench/data.py [--rows 2000000] [--workers 0,2] [--convert-mb 200] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# --code DIR measures the `app` package of another checkout (a patched reader, say)
CODE = Path(sys.argv[sys.argv.index("--code") + 1]).resolve() if "--code" in sys.argv else ROOT
sys.path.insert(0, str(CODE))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torchrec  # noqa: E402

from app.data import Columns, ParquetBatches, Schema, iter_batches  # noqa: E402
from app.synthetic import SyntheticSpec, generate, generate_tsv  # noqa: E402

# Criteo Kaggle (Display Advertising Challenge) vocabulary sizes of C1..C26
CRITEO_CARDINALITIES = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683,
                        8351593, 3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15,
                        286181, 105, 142572]
BATCH = 8192
ROW_GROUP = 65_536
TARGET_RATIO = 0.5
GPU_RATE = 2_000_000  # samples/s one GPU should be fed


def machine() -> dict[str, str]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown")
    return {"cores": str(os.cpu_count()), "cpu": model, "python": platform.python_version(),
            "torch": torch.__version__, "torchrec": torchrec.__version__, "pyarrow": pa.__version__}


def make_parquet(out: Path, rows: int, workers: int) -> Schema:
    spec = SyntheticSpec(rows={"train": rows, "test": 1000}, cardinalities=CRITEO_CARDINALITIES,
                         row_group_size=ROW_GROUP, files_per_split=max(2, workers), auc_rows=100_000)
    return generate(out, spec, workers=workers)


def raw_read(files: list[Path]) -> tuple[int, float]:
    """pyarrow alone: every row group of every file, all columns."""
    start, rows = time.perf_counter(), 0
    for path in files:
        f = pq.ParquetFile(path)
        for i in range(f.num_row_groups):
            rows += f.read_row_group(i).num_rows
    return rows, time.perf_counter() - start


def reader(root: Path, schema: Schema, workers: int) -> tuple[int, float]:
    """The training path: one shuffled epoch of rank 0 of 1, to ready batches."""
    columns = Columns.resolve(schema, schema.labels, [], [], "bench")
    start = time.perf_counter()
    ds = ParquetBatches(root, "train", columns, ("binary",) * len(schema.labels), BATCH, 0, 1, train=True)
    rows = sum(len(b) for b in iter_batches(ds, num_workers=workers, pin_memory=False))
    return rows, time.perf_counter() - start


def best(fn, *args, repeat: int = 2) -> tuple[int, float]:
    runs = [fn(*args) for _ in range(repeat)]
    return min(runs, key=lambda r: r[1])


def profile(root: Path, schema: Schema, top: int = 18) -> str:
    prof = cProfile.Profile()
    prof.enable()
    reader(root, schema, 0)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    lines = [line for line in text.getvalue().splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    return "\n".join(lines[start:start + top + 1])


# ---------------------------------------------------------------------------------------
# Peak memory of a process tree (PSS: shared pages are split between the processes sharing
# them, so forked workers are not counted twice)


def _tree(root_pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += parents.get(pid, [])
    return out


def _kb(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakMemory(threading.Thread):
    """Samples the summed PSS and RSS of a process and its descendants every `every` s."""

    def __init__(self, pid: int, every: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.pss = self.rss = self.procs = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            pids = _tree(self.pid)
            self.pss = max(self.pss, sum(_kb(Path(f"/proc/{p}/smaps_rollup"), "Pss:") for p in pids))
            self.rss = max(self.rss, sum(_kb(Path(f"/proc/{p}/status"), "VmRSS:") for p in pids))
            self.procs = max(self.procs, len(pids))
            self.done.wait(self.every)


def convert_bench(tmp: Path, megabytes: int, workers: int) -> dict:
    rows = int(megabytes * 1e6 / 270)  # about 270 bytes a line with two labels
    spec = SyntheticSpec(rows={"train": rows, "test": max(rows // 100, 1000)},
                         cardinalities=CRITEO_CARDINALITIES, missing=0.1, files_per_split=1)
    generate_tsv(tmp / "tsv", spec, workers=workers)
    inputs = {s: sorted((tmp / "tsv" / s).glob("*.tsv")) for s in ("train", "test")}
    size = sum(p.stat().st_size for files in inputs.values() for p in files)
    cmd = [sys.executable, "-m", "app", "data", "criteo-tsv", "--out", str(tmp / "converted"),
           "--num-labels", "2", "--hash-size", "100000", "--workers", str(workers),
           "--train", *map(str, inputs["train"]), "--test", *map(str, inputs["test"])]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=CODE)
    sampler = PeakMemory(proc.pid)
    sampler.start()
    if proc.wait():
        raise SystemExit(f"conversion failed: {' '.join(cmd)}")
    seconds = time.perf_counter() - start
    sampler.done.set()
    sampler.join()
    out_bytes = sum(p.stat().st_size for p in (tmp / "converted").rglob("*.parquet"))
    shutil.rmtree(tmp / "tsv")
    return {"rows": rows + spec.rows["test"], "tsv_mb": size / 1e6, "parquet_mb": out_bytes / 1e6,
            "seconds": seconds, "pss_mb": sampler.pss / 1024, "rss_mb": sampler.rss / 1024,
            "procs": sampler.procs, "workers": workers}


# ---------------------------------------------------------------------------------------


def report(info: dict, rows: int, disk_mb: float, mem_mb: float, raw: float,
           results: dict[int, float], conv: dict | None, prof: str | None) -> str:
    lines = [
        "# Input pipeline benchmark",
        "",
        "Written by `make bench-data` (`bench/data.py`). Numbers are from one run on the machine below;",
        "rerun to refresh them.",
        "",
        f"Machine: {info['cores']} cores, {info['cpu']}. Versions: Python {info['python']}, "
        f"torch {info['torch']}, torchrec {info['torchrec']}, pyarrow {info['pyarrow']}."
        + ("" if CODE == ROOT else f" Code measured: `app` from {CODE}."),
        "",
        "## Loader: Parquet to ready `Batch`",
        "",
        f"Data: {rows:,} synthetic Criteo-shape rows (2 labels, 13 dense float32, 26 int64 ids with the "
        f"Criteo Kaggle vocabulary sizes), row groups of {ROW_GROUP:,}; {disk_mb:,.0f} MB of "
        f"Parquet (snappy), {mem_mb:,.0f} MB decoded. Reader: `ParquetBatches` (train, shuffled) "
        f"+ `iter_batches`, batch {BATCH:,}. Raw: `pq.ParquetFile(f).read_row_group(i)` of all "
        "columns, same files, same run, page cache warm for both; best of two passes each.",
        "",
        "| path | samples/s | ratio to raw read |",
        "| --- | ---: | ---: |",
        f"| pyarrow raw read | {raw:,.0f} | 1.00 |",
    ]
    for w, rate in results.items():
        lines.append(f"| reader, {w} workers | {rate:,.0f} | {rate / raw:.2f} |")
    best_w = max(results, key=results.get)
    verdict = "meets" if results[best_w] / raw >= TARGET_RATIO else "misses"
    lines += ["", f"Best reader rate is {results[best_w] / raw:.0%} of the raw read: it {verdict} the "
              f"{TARGET_RATIO:.0%} target."]
    per_worker = max(r / max(w, 1) for w, r in results.items())
    need = -(-GPU_RATE // per_worker)
    lines += [
        "",
        "### Feeding one GPU at 2M samples/s",
        "",
        f"One process turns {per_worker:,.0f} samples/s into batches here (the better of 0 workers "
        f"and the {max(results)}-worker rate per worker). Extrapolated, not measured: 2,000,000 "
        f"samples/s needs about {need:.0f} worker processes at this per-core speed, "
        + ("which a 16-core machine has, leaving some cores for the trainer"
           if need <= 12 else "more than a 16-core machine can spare beside the trainer")
        + ". The estimate assumes workers scale linearly (they share no state; each decodes its own "
        "row groups) and that the main process keeps up with receiving batches from the worker "
        "queues; per-core speed of a server CPU differs from this machine's.",
    ]
    if conv:
        lines += [
            "",
            "## Converter: Criteo TSV to Parquet",
            "",
            f"`mmoe data criteo-tsv` on {conv['tsv_mb']:,.0f} MB of synthetic Criteo TSV "
            f"({conv['rows']:,} lines, 2 labels, 10% empty fields), hash mode with 100,000 ids a "
            f"column, {conv['workers']} workers. Peak memory is sampled every 0.1 s over the whole "
            "process tree: PSS counts pages shared by forked workers once, RSS counts them per process.",
            "",
            "| TSV MB | seconds | MB/s | lines/s | peak PSS MB | peak RSS sum MB | processes | Parquet MB |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {conv['tsv_mb']:,.0f} | {conv['seconds']:.1f} | {conv['tsv_mb'] / conv['seconds']:.1f} | "
            f"{conv['rows'] / conv['seconds']:,.0f} | {conv['pss_mb']:,.0f} | {conv['rss_mb']:,.0f} | "
            f"{conv['procs']} | {conv['parquet_mb']:,.0f} |",
        ]
    if prof:
        lines += ["", "## Profile of the reader (0 workers, cProfile, by own time)", "", "```", prof, "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2_000_000, help="train rows of the Parquet data set")
    p.add_argument("--workers", default=f"0,{os.cpu_count()}", help="DataLoader workers to measure")
    p.add_argument("--convert-mb", type=int, default=200, help="TSV size for the converter; 0 skips it")
    p.add_argument("--profile", action="store_true", help="add a cProfile of the 0-worker reader")
    p.add_argument("--repeat", type=int, default=3, help="passes per path; the fastest counts")
    p.add_argument("--code", default=str(ROOT), help="checkout whose `app` package is measured")
    p.add_argument("--tmp", default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--out", default=str(ROOT / "bench" / "DATA.md"))
    args = p.parse_args()
    info = machine()
    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-", dir=args.tmp))
    try:
        t = time.perf_counter()
        schema = make_parquet(tmp / "parquet", args.rows, cores)
        files = sorted((tmp / "parquet" / "train").glob("*.parquet"))
        disk = sum(f.stat().st_size for f in files) / 1e6
        first = pq.ParquetFile(files[0]).read_row_group(0)
        mem = first.nbytes / first.num_rows * args.rows / 1e6
        print(f"generated {args.rows:,} rows ({disk:,.0f} MB) in {time.perf_counter() - t:.0f}s", flush=True)
        n, secs = best(raw_read, files, repeat=args.repeat)
        raw = n / secs
        print(f"raw read: {raw:,.0f} samples/s", flush=True)
        results = {}
        for w in (int(x) for x in args.workers.split(",")):
            n, secs = best(reader, tmp / "parquet", schema, w, repeat=args.repeat)
            results[w] = n / secs
            print(f"reader, {w} workers: {results[w]:,.0f} samples/s ({results[w] / raw:.2f} of raw)", flush=True)
        prof = profile(tmp / "parquet", schema) if args.profile else None
        shutil.rmtree(tmp / "parquet")
        conv = None
        if args.convert_mb:
            conv = convert_bench(tmp, args.convert_mb, cores)
            print(f"converted {conv['tsv_mb']:,.0f} MB in {conv['seconds']:.1f}s, peak PSS "
                  f"{conv['pss_mb']:,.0f} MB, RSS sum {conv['rss_mb']:,.0f} MB", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).write_text(report(info, args.rows, disk, mem, raw, results, conv, prof))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
