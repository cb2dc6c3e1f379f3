"""Checkpoints with torch.distributed.checkpoint: sharded tables, optimizer state, position.

Layout: RUN_DIR/checkpoints/step_K/ (DCP files + train_state.json + config.json + plan.txt)
and RUN_DIR/checkpoints/latest, a one-line file naming the newest complete checkpoint.
A save writes into `.step_K.tmp`, renames it when every rank is done, and only then moves
`latest`, so a crash mid-save leaves the previous checkpoint in charge. Only tensors go
through DCP (whose loader unpickles non-tensor items); the rest is JSON.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from app.plan_file import RunPlan, save_plan

LATEST = "latest"
STATE = "train_state.json"


def _tensors_only(tree: dict, where: str) -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out[key] = _tensors_only(value, f"{where}.{key}")
        elif isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, (int, float)):  # e.g. an optimizer's python step counter
            out[key] = torch.tensor(value)
        else:
            raise TypeError(f"{where}.{key}: {type(value).__name__} cannot be checkpointed as a tensor")
    return out


def _state(model: torch.nn.Module, optimizer) -> dict:
    state = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = _tensors_only(optimizer.state_dict()["state"], "optim")
    return state


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / STATE).exists() else None


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer, train_state: dict,
         files: dict[str, str], keep: int) -> Path:
    """Collective: every rank calls it. `files` are small text files rank 0 adds (config, plan)."""
    root = run_dir / "checkpoints"
    final, tmp = root / f"step_{step}", root / f".step_{step}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(_state(model, optimizer), checkpoint_id=str(tmp))
    if rank == 0:
        for name, text in {**files, STATE: json.dumps(train_state, indent=1)}.items():
            (tmp / name).write_text(text)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)  # the moment the new checkpoint takes over
        done = sorted((p for p in root.glob("step_*") if p.is_dir()), key=lambda p: int(p.name[5:]))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(path: Path, model: torch.nn.Module, optimizer=None) -> dict:
    """Loads into the model's (and optimizer's) current sharding, on any world size or plan.
    Without an optimizer (scoring), only the model is read."""
    if not (path / STATE).exists():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {STATE})")
    if optimizer is not None:
        _init_lazy_state(optimizer)
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])
    if optimizer is not None:
        full = optimizer.state_dict()
        _copy_into(full["state"], state["optim"])
        optimizer.load_state_dict(full)
    return json.loads((path / STATE).read_text())


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder's latest checkpoint."""
    path = Path(path)
    if (path / STATE).exists():
        return path
    found = latest(path)
    if found is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint nor a run folder with one")
    return found


class Checkpointer:
    """A training run's directory: its checkpoints (RUN_DIR/checkpoints, the newest `keep` of
    them kept), and the files rank 0 writes beside them (config, plan, summary)."""

    def __init__(self, run_dir: Path, keep: int, is_main: bool):
        self.run_dir, self.keep, self.is_main = run_dir, keep, is_main
        self.files: dict[str, str] = {}  # small text files saved in each checkpoint

    def resume(self, model: torch.nn.Module, optimizer) -> dict | None:
        """Loads the latest checkpoint, if any, and returns its train state."""
        found = latest(self.run_dir)
        if found is None:
            return None
        state = load(found, model, optimizer)
        if self.is_main:
            print(f"resuming from {found} (step {state['step']})")
        return state

    def start(self, config: dict, plan: RunPlan, resumed: bool) -> None:
        """Rank 0 writes the run's config and plan; a fresh run drops an old run's metrics."""
        self.files = {"config.json": json.dumps(config, indent=2), "plan.txt": str(plan)}
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not resumed:
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            (self.run_dir / "summary.json").unlink(missing_ok=True)
        (self.run_dir / "config.json").write_text(self.files["config.json"] + "\n")
        (self.run_dir / "plan.txt").write_text(self.files["plan.txt"] + "\n")
        save_plan(plan, self.run_dir / "plan.json")  # reusable: --plan.file RUN_DIR/plan.json

    def save(self, step: int, model: torch.nn.Module, optimizer, train_state: dict) -> Path:
        """Collective: every rank calls it."""
        return save(self.run_dir, step, model, optimizer, train_state, self.files, self.keep)

    def finish(self, summary: dict) -> None:
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _init_lazy_state(optimizer) -> None:
    """Optimizers like Adam create their state at the first step; DCP loads in place, so the
    state must exist first. A zero-gradient step makes it (the fused ones have it already)."""
    for _, opt in getattr(optimizer, "optimizers", []):
        if not opt.state_dict()["state"] and hasattr(opt, "init_state"):
            opt.init_state()


def _copy_into(target: dict, loaded: dict) -> None:
    for key, value in loaded.items():
        if isinstance(value, dict):
            _copy_into(target[key], value)
        elif not isinstance(target[key], torch.Tensor):
            target[key] = type(target[key])(value.item())
        else:
            target[key] = value
