"""A training run's directory, kept whole: what a run may do with the checkpoints, metrics
and summary it finds there (resume, refuse, or start over when asked), and the files it writes.

- A run resumes from `latest` (`train.resume`, the default) only with a config that agrees
  with the checkpoint's on everything that shapes the model, the optimizer or the order of the
  rows (`RESUMABLE` lists the keys that may change); otherwise it stops, naming the keys.
- `train.resume = false` where checkpoints exist stops too, unless `train.overwrite = true`,
  which deletes them (and the metrics and summary) first.
- Under torchrun, a restarted attempt always resumes (its checkpoints are this job's).
- A finished run run again changes nothing and says so.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from app import checkpoint
from app.checkpoint import BEST, CheckpointError
from app.plan_file import RunPlan, save_plan

# Config keys that may differ from the checkpoint's on resume (a dotted key or its section):
# how long and how often, where and with what the run reads and runs, and the sharding plan.
# All others (model, optim, tasks, seed, columns, train split, shuffling) must agree.
RESUMABLE = ("name", "data.path", "data.eval_split", "data.batch_size", "data.eval_batch_size",
             "data.num_workers", "data.on_bad_rows", "data.max_skipped_fraction", "model.compile",
             "model.precision", "train.epochs", "train.max_steps", "train.eval_every", "train.log_every",
             "train.run_dir", "train.device", "train.checkpoint_every", "train.keep_checkpoints",
             "train.resume", "train.overwrite", "train.checkpoints", "train.tensorboard", "train.gate_stats",
             "train.gc_every", "train.pipeline", "train.early_stop", "train.patience", "train.eval_auc_bins",
             "plan")
RUN_FILES = ("metrics.jsonl", "summary.json")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(stored: dict, current: dict) -> list[str]:
    """The keys outside `RESUMABLE` whose values differ, as 'key: old -> new'."""
    old, new = _flat(stored), _flat(current)
    changed = []
    for key in sorted(old.keys() | new.keys()):
        if old.get(key, "<unset>") != new.get(key, "<unset>") and \
                not any(key == k or key.startswith(k + ".") for k in RESUMABLE):
            changed.append(f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}")
    return changed


class Checkpointer:
    """A training run's directory: its checkpoints (RUN_DIR/checkpoints, the newest `keep` of
    them kept, and the best one), and the files rank 0 writes beside them (config, plan,
    metrics, summary)."""

    def __init__(self, run_dir: Path, keep: int, is_main: bool, enabled: bool = True):
        self.run_dir, self.keep, self.is_main, self.enabled = run_dir, keep, is_main, enabled
        self.files: dict[str, str] = {}  # small text files saved in each checkpoint

    def resume(self, config: dict, model: torch.nn.Module, optimizer, resume: bool, overwrite: bool) -> dict | None:
        """Collective. The train state of the checkpoint this run continues from, or None for a
        fresh start (after deleting what `overwrite` allows)."""
        found = checkpoint.latest(self.run_dir)
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:
            resume, overwrite = True, False  # a restarted attempt continues its own job
        if found is not None and resume:
            try:
                stored = json.loads((found / "config.json").read_text())
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{found / 'config.json'}: missing or unreadable ({e}); resume from "
                                      f"another step_<N> checkpoint") from None
            changed = config_changes(stored, config)
            if changed:
                raise CheckpointError(f"{found}: resuming needs the config it was trained with, but "
                                      f"{'; '.join(changed)}; put them back, or start over in another "
                                      f"--train.run_dir (or with --train.overwrite true --train.resume false)")
            start = time.perf_counter()
            state = checkpoint.load(found, model, optimizer)
            if self.is_main:
                print(f"resuming from {found} (step {state['step']}; checked and loaded in "
                      f"{time.perf_counter() - start:.1f} s)")
            return state
        if found is not None and not overwrite:
            raise CheckpointError(f"{self.run_dir} holds checkpoints (latest {found.name}) and "
                                  f"train.resume is false; resume, use another --train.run_dir, or pass "
                                  f"--train.overwrite true to delete them and start over")
        if overwrite:
            if dist.is_initialized():
                dist.barrier()  # every rank has looked before rank 0 deletes
            if self.is_main:
                shutil.rmtree(self.run_dir / "checkpoints", ignore_errors=True)
                shutil.rmtree(self.run_dir / "tb", ignore_errors=True)
        return None

    def start(self, config: dict, plan: RunPlan, resumed: bool) -> None:
        """Rank 0 writes the run's config and plan; a fresh run drops an old run's metrics."""
        self.files = {"config.json": json.dumps(config, indent=2), "plan.txt": str(plan)}
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not resumed:
            for name in RUN_FILES:
                (self.run_dir / name).unlink(missing_ok=True)
        (self.run_dir / "config.json").write_text(self.files["config.json"] + "\n")
        (self.run_dir / "plan.txt").write_text(self.files["plan.txt"] + "\n")
        save_plan(plan, self.run_dir / "plan.json")  # reusable: --plan.file RUN_DIR/plan.json

    def save(self, step: int, model: torch.nn.Module, optimizer, train_state: dict) -> Path | None:
        """Collective: every rank calls it. None when `train.checkpoints` is off."""
        if not self.enabled:
            return None
        start = time.perf_counter()
        path = checkpoint.save(self.run_dir, step, model, optimizer, train_state, self.files, self.keep)
        if self.is_main:
            size = sum(f.stat().st_size for f in path.iterdir()) / 2**30
            tqdm.write(f"saved {path} ({size:.2f} GiB, with checksums) in {time.perf_counter() - start:.1f} s")
        return path

    def mark_best(self, path: Path | None) -> None:
        """Early stopping: `path` is the best checkpoint so far; pruning keeps it."""
        if self.is_main and path is not None:
            checkpoint.set_pointer(self.run_dir, BEST, path)

    def summary(self) -> dict | None:
        """The summary of a finished run, if it wrote one."""
        path = self.run_dir / "summary.json"
        return json.loads(path.read_text()) if path.exists() else None

    def finish(self, summary: dict) -> None:
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
