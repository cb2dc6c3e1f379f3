"""Multi-task heads against task relatedness, the MMoE paper's study; writes bench/MTL_HEADS.md.

For each seed and correlation p: the paper's synthetic regression pair (app/mmoe_paper.py,
data seed = seed), then each head trained through `python -m app train` on CPU with
configs/synthetic_paper.toml (train seed = seed). Reported: test MSE averaged over the two
tasks, mean +- std over seeds.

    python bench/mtl_heads.py [--heads shared_bottom,omoe,mmoe,cgc,ple] [--correlations 1.0,0.5,0.0]
                              [--seeds 0,1,2] [--rows 20000,5000] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from app.config import load_config  # noqa: E402
from app.data.schema import Columns, Schema  # noqa: E402
from app.heads import HEADS  # noqa: E402
from app.sources.mmoe_paper import PaperSpec, generate  # noqa: E402

CONFIG = "configs/synthetic_paper.toml"
# per head, on top of the config: shared_bottom's one layer is about as large as 8 experts of 16
OVERRIDES = {"shared_bottom": ["--model.expert_layers", "[128, 16]"]}
FAILED = 0.5  # mean test MSE above this: the run did not find the tasks' directions


def dense_params(head: str, data: Path) -> int:
    """Parameters of the head and towers (embeddings excluded), as trained."""
    cfg = load_config(ROOT / CONFIG, ["--model.head", head, *OVERRIDES.get(head, [])])
    schema = Schema.load(data)
    columns = Columns.resolve(schema, list(cfg.tasks), [], [], where=str(data))
    in_dim = len(columns.categorical) * cfg.model.embedding_dim + len(columns.dense)
    torch.manual_seed(0)
    head_module = HEADS[head](in_dim, len(cfg.tasks), cfg.model)
    towers = sum(len(cfg.tasks) * (a * b + b) for a, b in
                 zip([head_module.out_dim, *cfg.model.tower_layers], [*cfg.model.tower_layers, 1]))
    return sum(p.numel() for p in head_module.parameters()) + towers


def train(head: str, data: Path, run_dir: Path, seed: int, threads: int) -> tuple[list[float], float]:
    """(test MSE per task, seconds) of one `python -m app train` run."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "app", "train", "--config", CONFIG, "--model.head", head,
           *OVERRIDES.get(head, []), "--data.path", str(data), "--train.seed", str(seed),
           "--train.run_dir", str(run_dir), "--train.resume", "false", "--train.device", "cpu"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return [m["rmse"] ** 2 for m in summary["tasks"].values()], took


def fmt(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", default="shared_bottom,omoe,mmoe,cgc,ple")
    p.add_argument("--correlations", default="1.0,0.5,0.0")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rows", default="20000,5000", help="train,test rows")
    p.add_argument("--threads", type=int, default=1, help="OMP threads of each training process")
    p.add_argument("--out", default=str(ROOT / "bench" / "MTL_HEADS.md"))
    args = p.parse_args()
    heads = args.heads.split(",")
    corrs = [float(c) for c in args.correlations.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    train_rows, test_rows = (int(r) for r in args.rows.split(","))

    mse: dict[tuple[str, float], list[list[float]]] = {}
    label_corr: dict[float, list[float]] = {}
    label_var: list[float] = []
    seconds: list[float] = []
    params: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for p_ in corrs:
            for seed in seeds:
                data = Path(tmp) / f"p{p_}_s{seed}"
                meta = generate(data, PaperSpec(rows={"train": train_rows, "test": test_rows},
                                                correlation=p_, seed=seed)).meta
                label_corr.setdefault(p_, []).append(meta["label_corr"]["train"])
                label_var.extend(meta["label_var"]["test"].values())
                for head in heads:
                    params.setdefault(head, dense_params(head, data))
                    per_task, took = train(head, data, Path(tmp) / f"run_{head}_{p_}_{seed}", seed, args.threads)
                    mse.setdefault((head, p_), []).append(per_task)
                    seconds.append(took)
                    print(f"p={p_} seed={seed} {head}: test MSE {per_task} ({took:.1f} s)", flush=True)

    cfg = load_config(ROOT / CONFIG)
    lines = [
        "# Multi-task heads against task correlation", "",
        "The MMoE paper's synthetic study (Ma et al., KDD 2018, section 4): two regression tasks "
        "whose weight vectors have cosine p (`mmoe data mmoe-paper`, app/mmoe_paper.py). Each "
        f"cell is the test MSE averaged over both tasks, mean ± std over seeds {seeds} (seed = data "
        "seed = training seed); lower is better. The label noise alone gives MSE 0.01.", "",
        "| head | dense params | " + " | ".join(f"p = {c}" for c in corrs) + " |",
        "|---|---:|" + "---:|" * len(corrs),
    ]
    for head in heads:
        cells = [fmt([sum(m) / len(m) for m in mse[(head, c)]]) for c in corrs]
        lines.append(f"| {head} | {params[head]:,} | " + " | ".join(cells) + " |")
    lines += ["", "Per task (y1 | y2), mean over seeds:", "",
              "| head | " + " | ".join(f"p = {c}" for c in corrs) + " |", "|---|" + "---|" * len(corrs)]
    for head in heads:
        cells = [" \\| ".join(f"{statistics.mean(m[k] for m in mse[(head, c)]):.4f}" for k in range(2))
                 for c in corrs]
        lines.append(f"| {head} | " + " | ".join(cells) + " |")
    failed = [f"{h} p = {c} seed {seeds[i]} ({sum(m) / 2:.2f})" for (h, c), runs in mse.items()
              for i, m in enumerate(runs) if sum(m) / len(m) > FAILED]
    lines += ["", f"Runs that did not fit (mean test MSE above {FAILED}; the label variance is about "
              f"{statistics.mean(label_var):.1f}): " + (", ".join(failed) if failed else "none") + ". "
              f"{cfg.train.epochs} epochs do not converge every run (the label noise alone gives MSE 0.01), so "
              "differences within one std are not significant.", "",
              "<details><summary>Every run: test MSE y1, y2</summary>", "",
              "| p | seed | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads)]
    for c in corrs:
        for i, seed in enumerate(seeds):
            lines.append(f"| {c} | {seed} | " + " | ".join(
                ", ".join(f"{v:.3f}" for v in mse[(h, c)][i]) for h in heads) + " |")
    lines += ["", "</details>"]
    lines += [
        "", "Measured train-label correlation per p: "
        + ", ".join(f"p = {c}: {statistics.mean(v):.3f}" for c, v in label_corr.items())
        + " (the sine terms make the labels less correlated than their linear parts).", "",
        f"Setup: {train_rows:,} train / {test_rows:,} test rows, d = 100, `{CONFIG}` ({cfg.train.epochs} "
        f"epochs, batch {cfg.data.batch_size}, Adam lr {cfg.optim.dense_lr}, experts "
        f"{cfg.model.expert_layers}, mmoe/omoe {cfg.model.num_experts} experts, cgc/ple "
        f"{cfg.model.num_task_experts} per task + {cfg.model.num_shared_experts} shared, ple "
        f"{cfg.model.num_levels} levels, towers {cfg.model.tower_layers}); shared_bottom: "
        + " ".join(OVERRIDES["shared_bottom"]) + ". "
        f"CPU, {args.threads} thread(s) per run, {os.cpu_count()} cores ({platform.processor() or platform.machine()}); "
        f"torch {torch.__version__}. {len(seconds)} runs, {statistics.mean(seconds):.1f} s each on average "
        "(process start included).", "",
        "Reproduce: `python bench/mtl_heads.py`.", "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
