"""Run report: RUN_DIR/report.md with PNG plots of what a training run did.

Reads what `mmoe train` leaves in a run directory (metrics.jsonl, summary.json, config.json)
and draws loss and AUC per task (train against eval), throughput, and a task x expert heat map
of the final gate weights. Keys it does not know are ignored; a plot whose keys are missing is
left out and the report says why. Plots go through matplotlib's `Figure` directly, not pyplot:
no display, no global figure registry to leak into long-lived processes.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, StrMethodFormatter

log = logging.getLogger("app")

PLOTS = ("loss.png", "auc.png", "throughput.png", "gates.png")
GATE_KEY = re.compile(r"^train/(?P<task>.+)/gate_e(?P<expert>\d+)$")
EVAL_COLUMNS = {"auc": "AUC", "logloss": "logloss", "ne": "NE", "calibration": "calibration", "rmse": "RMSE",
                "label_mean": "label mean", "pred_mean": "pred mean"}
TRAIN_COLOR, EVAL_COLOR = "tab:blue", "tab:orange"


class ReportError(ValueError):
    pass


@dataclass
class Run:
    """What one run directory holds; any of the three files may be missing or partial."""

    path: Path
    records: list[dict]  # metrics.jsonl, in file order
    summary: dict
    config: dict

    @classmethod
    def load(cls, run_dir: str | Path) -> "Run":
        path = Path(run_dir)
        files = [path / n for n in ("metrics.jsonl", "summary.json")]
        if not any(f.exists() for f in files):
            raise ReportError(f"{path} holds neither metrics.jsonl nor summary.json; "
                              f"pass the run_dir of a run (`mmoe train` writes runs/<config name>)")
        records = []
        if files[0].exists():
            for n, line in enumerate(files[0].read_text().splitlines(), 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # e.g. the last line of a run that was killed
                    log.warning("%s:%d: not JSON, skipped", files[0], n)
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
                    records.append(record)
        return cls(path, records, _read_json(files[1]), _read_json(path / "config.json"))

    @property
    def tasks(self) -> list[str]:
        """Config order; else the summary's; else first appearance in the log."""
        for source in (self.config.get("tasks"), self.summary.get("tasks")):
            if isinstance(source, dict) and source:
                return list(source)
        seen: dict[str, None] = {}
        for record in self.records:
            for key in record:
                split, _, rest = key.partition("/")
                if split in ("train", "eval") and "/" in rest:
                    seen.setdefault(rest.rsplit("/", 1)[0])
        return list(seen)

    def task_type(self, task: str) -> str:
        declared = (self.config.get("tasks") or {}).get(task, {}).get("type")
        if declared:
            return declared
        has_rmse = any(f"eval/{task}/rmse" in r for r in self.records) or \
            "rmse" in (self.summary.get("tasks") or {}).get(task, {})
        return "regression" if has_rmse else "binary"

    @property
    def head(self) -> str | None:
        return (self.config.get("model") or {}).get("head")

    @property
    def name(self) -> str:
        return self.summary.get("config") or self.config.get("name") or self.path.name


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        log.warning("%s: not JSON (%s), ignored", path, e)
        return {}
    return value if isinstance(value, dict) else {}


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that carry `key` as a finite number."""
    points = [(r["step"], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


@dataclass
class Gates:
    """Mean gate weight of each expert for each task: weights [T, E], each row sums to 1."""

    tasks: list[str]
    weights: np.ndarray
    source: str  # where the weights came from, for the plot's title


def gate_matrix(run: Run) -> Gates | None:
    """Final gates from summary.json's `gates`, else the last train record with gate keys."""
    by_task: dict[str, list[float]] = {}
    source = ""
    gates = run.summary.get("gates")
    if isinstance(gates, dict) and gates:
        by_task = {t: [float(w) for w in ws] for t, ws in gates.items() if isinstance(ws, list) and ws}
        source = "summary.json"
    if not by_task:
        for record in reversed(run.records):
            found: dict[str, dict[int, float]] = {}
            for key, value in record.items():
                m = GATE_KEY.match(key)
                if m and isinstance(value, (int, float)):
                    found.setdefault(m["task"], {})[int(m["expert"])] = float(value)
            if found:
                by_task = {t: [ws.get(e, math.nan) for e in range(max(ws) + 1)] for t, ws in found.items()}
                source = f"train log, step {record['step']}"
                break
    if not by_task:
        return None
    tasks = [t for t in run.tasks if t in by_task] + [t for t in by_task if t not in run.tasks]
    num_experts = max(len(ws) for ws in by_task.values())
    weights = np.full((len(tasks), num_experts), math.nan)
    for i, t in enumerate(tasks):
        weights[i, :len(by_task[t])] = by_task[t]
    return Gates(tasks, weights, source)


def _grid(n: int, title: str) -> tuple[Figure, list]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.6 * cols, 3.4 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=13)
    for ax in axes[:n]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.set_xlabel("step")
    return fig, axes[:n]


def _eval_loss(run: Run, task: str) -> tuple[list[float], list[float], str]:
    """The eval counterpart of the train loss: logloss (binary) or RMSE squared (regression, MSE)."""
    if run.task_type(task) == "regression":
        steps, rmse = series(run.records, f"eval/{task}/rmse")
        return steps, [v * v for v in rmse], "eval MSE (RMSE²)"
    steps, values = series(run.records, f"eval/{task}/logloss")
    return steps, values, "eval logloss"


def plot_loss(run: Run, path: Path) -> bool:
    tasks = [t for t in run.tasks if series(run.records, f"train/{t}/loss")[0] or _eval_loss(run, t)[0]]
    if not tasks:
        return False
    fig, axes = _grid(len(tasks), "Loss per task: train (mean since last log) vs eval")
    for ax, task in zip(axes, tasks):
        steps, values = series(run.records, f"train/{task}/loss")
        if steps:  # a lone point needs a marker to show at all
            ax.plot(steps, values, color=TRAIN_COLOR, marker="o" if len(steps) == 1 else None,
                    label="train loss")
        steps, values, label = _eval_loss(run, task)
        if steps:
            ax.plot(steps, values, "o-", color=EVAL_COLOR, label=label)
        ax.set_title(f"{task} ({run.task_type(task)})")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return True


def _best_auc(run: Run) -> dict[str, float]:
    """Best achievable eval AUC per task, where the data set records it (synthetic data)."""
    data = run.config.get("data") or {}
    meta = _read_json(Path(data.get("path", "")) / "schema.json").get("meta", {})
    best = (meta.get("best_auc") or {}).get(data.get("eval_split", "test")) or {}
    labels = {t: (c.get("label") or t) for t, c in (run.config.get("tasks") or {}).items()}
    return {t: best[labels.get(t, t)] for t in run.tasks if labels.get(t, t) in best}


def plot_auc(run: Run, path: Path) -> bool:
    tasks = [t for t in run.tasks if series(run.records, f"eval/{t}/auc")[0]]
    if not tasks:
        return False
    best = _best_auc(run)
    fig, axes = _grid(len(tasks), "AUC per task")
    for ax, task in zip(axes, tasks):
        steps, values = series(run.records, f"train/{task}/auc")
        if steps:
            ax.plot(steps, values, color=TRAIN_COLOR, label="train AUC")
        steps, values = series(run.records, f"eval/{task}/auc")
        ax.plot(steps, values, "o-", color=EVAL_COLOR, label=f"eval AUC (last {values[-1]:.4f})")
        if task in best:
            ax.axhline(best[task], ls="--", color="gray", lw=1, label=f"best achievable {best[task]:.4f}")
        ax.set_title(task)
        ax.set_ylabel("AUC")
        ax.legend(fontsize=8, loc="best")
    fig.savefig(path, dpi=110)
    return True


def plot_throughput(run: Run, path: Path) -> bool:
    steps, rates = series(run.records, "samples_per_sec")
    if not steps:
        return False
    fig, (ax,) = _grid(1, "Training throughput")
    fig.set_size_inches(7, 3.8)
    ax.plot(steps, rates, ".-", color=TRAIN_COLOR, label="logged rate")
    overall = run.summary.get("samples_per_sec")
    if isinstance(overall, (int, float)) and overall > 0:
        ax.axhline(overall, ls="--", color="gray", lw=1, label=f"run mean {overall:,.0f}")
    ax.set_ylim(bottom=0)
    world = run.summary.get("world_size")
    ax.set_ylabel(f"samples/s (all {world} ranks)" if isinstance(world, int) and world > 1 else "samples/s")
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=110)
    return True


def plot_gates(gates: Gates, path: Path) -> None:
    t, e = gates.weights.shape
    fig = Figure(figsize=(max(4.5, 1.0 * e + 3.0), max(2.6, 0.55 * t + 1.8)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(gates.weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for (i, j), w in np.ndenumerate(gates.weights):
        text = "–" if math.isnan(w) else f"{w:.2f}"
        ax.text(j, i, text, ha="center", va="center", fontsize=9, color="black" if w > 0.6 else "white")
    ax.set_xticks(range(e), [f"e{k}" for k in range(e)])
    ax.set_yticks(range(t), gates.tasks)
    ax.set_xlabel("expert")
    ax.set_ylabel("task")
    ax.set_title(f"Mean gate weight per task and expert\n({gates.source}; each row sums to 1)", fontsize=10)
    fig.colorbar(image, ax=ax, label="gate weight")
    fig.savefig(path, dpi=110)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"


def _summary_tables(run: Run) -> list[str]:
    if not run.summary:
        return ["No summary.json: the run did not finish; the plots show what it logged.", ""]
    metrics = run.summary.get("tasks") or {}
    columns = [c for c in EVAL_COLUMNS if any(c in (metrics.get(t) or {}) for t in run.tasks)]
    lines = []
    if columns:
        lines += ["| task | type | " + " | ".join(EVAL_COLUMNS[c] for c in columns) + " |",
                  "|---|---|" + "---:|" * len(columns)]
        for t in run.tasks:
            values = " | ".join(_fmt((metrics.get(t) or {}).get(c)) for c in columns)
            lines.append(f"| {t} | {run.task_type(t)} | {values} |")
        lines.append("")
        if "ne" in columns:
            lines += ["NE: logloss over the entropy of the label rate (below 1 beats always predicting "
                      "the rate); calibration: mean prediction over mean label (1 is calibrated).", ""]
    else:
        lines += ["No evaluation results: the run logged no eval metrics.", ""]
    get = run.summary.get
    rate = get("samples_per_sec")
    rows = [("mean AUC", _fmt(get("mean_auc"))),
            ("throughput (samples/s)", f"{rate:,.0f}" if isinstance(rate, (int, float)) else "–"),
            ("world size", _fmt(get("world_size"))),
            ("device", _fmt(get("device"))),
            ("steps", _fmt(get("steps"))),
            ("epochs", _fmt(get("epochs"))),
            ("eval rows (skipped)", f"{_fmt(get('eval_rows'))} ({_fmt(get('skipped_rows'))})")]
    lines += ["| run | |", "|---|---:|", *(f"| {k} | {v} |" for k, v in rows), ""]
    return lines


def write_report(run_dir: str | Path) -> Path:
    """Writes RUN_DIR/report.md and its PNG plots; returns the report's path."""
    run = Run.load(run_dir)
    for name in PLOTS:  # plots a rerun no longer draws must not linger beside the report
        (run.path / name).unlink(missing_ok=True)
    model = run.config.get("model") or {}
    head = run.head or "unknown"
    experts = f", {model['num_experts']} experts" if head in ("mmoe", "omoe") and "num_experts" in model else ""
    lines = [f"# Run report: {run.name}", "",
             f"`{run.path}`: head `{head}`{experts}; tasks {', '.join(f'`{t}`' for t in run.tasks)}; "
             f"data `{(run.config.get('data') or {}).get('path', '?')}`.", "",
             "## Final evaluation", "", *_summary_tables(run)]

    lines += ["## Loss", ""]
    lines += ["![Loss per task](loss.png)" if plot_loss(run, run.path / "loss.png")
              else "No loss was logged.", ""]
    lines += ["## AUC", ""]
    lines += ["![AUC per task](auc.png)" if plot_auc(run, run.path / "auc.png")
              else "No eval AUC was logged (no eval records, or no binary tasks).", ""]
    lines += ["## Throughput", ""]
    lines += ["![Training throughput](throughput.png)" if plot_throughput(run, run.path / "throughput.png")
              else "No throughput was logged.", ""]

    lines += ["## Gates: what each task asks of each expert", ""]
    gates = gate_matrix(run)
    if gates is not None:
        plot_gates(gates, run.path / "gates.png")
        lines += ["![Gate weights per task and expert](gates.png)", "",
                  "Row t is task t's mean softmax gate over the experts: how much of its tower's input "
                  "comes from each expert. Rows alike mean the tasks share experts; rows apart mean "
                  "they have split them.", ""]
        if run.head in ("cgc", "ple"):
            lines += [f"`{run.head}`: each task's gate sees its own experts first (experts 0 to "
                      "num_task_experts - 1), then the shared ones, so column k is not the same expert "
                      "in every row; these are the last level's gates.", ""]
        entropy = {t: series(run.records, f"train/{t}/gate_entropy")[1] for t in gates.tasks}
        if any(entropy.values()):
            lines += [f"Last logged gate entropy (nats; {math.log(gates.weights.shape[1]):.3f} is uniform): "
                      + ", ".join(f"{t} {v[-1]:.3f}" for t, v in entropy.items() if v) + ".", ""]
    elif run.head not in (None, "mmoe"):
        lines += [f"The `{run.head}` head has no per-task gates, so there is no task x expert "
                  "weighting to show.", ""]
    else:
        lines += ["The run logged no gate weights (no `gates` in summary.json and no "
                  "`train/<task>/gate_e<k>` keys in metrics.jsonl).", ""]

    out = run.path / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out
