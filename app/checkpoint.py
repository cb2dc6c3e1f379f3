"""Checkpoints with torch.distributed.checkpoint: sharded tables, optimizer state, position.

Layout: RUN_DIR/checkpoints/step_K/ (DCP files, train_state.json, config.json, plan.txt and
checksums.json), and RUN_DIR/checkpoints/latest (and `best`, with early stopping): one-line
files naming a step_K beside them. A save writes into `.step_K.tmp`, renames it when every
rank is done, and only then moves `latest`, so a crash mid-save leaves the previous
checkpoint in charge.

Loading trusts nothing in the folder: every file is checked against checksums.json (SHA-256,
written at save); DCP's `.metadata`, a pickle, is read by an unpickler that builds only DCP's
own metadata classes, torch sizes and dtypes, so a crafted file cannot run code; every item
must be a tensor stored in a file of the checkpoint (DCP would unpickle a non-tensor item with
`torch.load(weights_only=False)`). Only tensors go through DCP; the rest is JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

LATEST, BEST = "latest", "best"
STATE = "train_state.json"
CHECKSUMS = "checksums.json"
METADATA = ".metadata"
STEP = re.compile(r"step_(\d+)")
HASH_THREADS = 8  # files hashed at once (hashlib releases the GIL)


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or used: the message names the file and the fix."""


# ---------------------------------------------------------------------------------------
# What goes through DCP


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


# ---------------------------------------------------------------------------------------
# Pointers and retention


def pointer(run_dir: Path, name: str = LATEST) -> Path | None:
    """The checkpoint RUN_DIR/checkpoints/<name> names, or None when there is no such pointer."""
    path = run_dir / "checkpoints" / name
    if not path.exists():
        return None
    target = path.read_text().strip()
    if not STEP.fullmatch(target):
        raise CheckpointError(f"{path} names {target[:80]!r}, not a step_<N> checkpoint of this run "
                              f"folder; remove it (and resume from a step_<N> folder) or start over")
    if not (path.parent / target / STATE).exists():
        raise CheckpointError(f"{path} names {target}, which is missing or incomplete; point it at a "
                              f"complete step_<N> folder, or start over with --train.overwrite true")
    return path.parent / target


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    return pointer(run_dir, LATEST)


def set_pointer(run_dir: Path, name: str, checkpoint: Path) -> None:
    root = run_dir / "checkpoints"
    tmp = root / f".{name}.tmp"
    tmp.write_text(checkpoint.name + "\n")
    os.replace(tmp, root / name)  # the moment it takes over


def _step(path: Path) -> int:
    return int(STEP.fullmatch(path.name).group(1))


def prune(run_dir: Path, keep: int) -> None:
    """Keeps the newest `keep` checkpoints up to the one `latest` names (0: all), the `best`
    one, and any newer than `latest` (left by another run: never ours to delete)."""
    newest = latest(run_dir)
    if keep <= 0 or newest is None:
        return
    best = pointer(run_dir, BEST)
    done = sorted((p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir() and STEP.fullmatch(p.name)
                   and _step(p) <= _step(newest)), key=_step)
    for old in done[:-keep]:
        if old != best:
            shutil.rmtree(old, ignore_errors=True)


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder's best checkpoint (with early stopping), else its latest."""
    path = Path(path)
    if (path / STATE).exists():
        return path
    found = pointer(path, BEST) or latest(path)
    if found is None:
        raise CheckpointError(f"{path}: neither a checkpoint (no {STATE}) nor a run folder with one "
                              f"(no checkpoints/{LATEST}); train first, or name a step_<N> folder")
    return found


# ---------------------------------------------------------------------------------------
# Checksums


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digests(folder: Path, names: list[str]) -> dict[str, str]:
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        return dict(zip(names, pool.map(lambda n: _digest(folder / n), names)))


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _gather(value) -> list:
    """Every rank's `value`, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _write_checksums(folder: Path) -> None:
    """Collective: each rank hashes its share of the folder's files (a shared file system)."""
    rank, world = _rank_world()
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    digests = {k: v for part in _gather(_digests(folder, names[rank::world])) for k, v in part.items()}
    if rank == 0:
        (folder / CHECKSUMS).write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")


def verify(path: Path) -> dict[str, str]:
    """Collective: checks every file against checksums.json (each rank a share); returns the
    checksums. Raises CheckpointError naming the first bad file on every rank."""
    listed = path / CHECKSUMS
    try:
        digests = json.loads(listed.read_text())
        if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
            raise ValueError("expected a JSON object of file names and SHA-256 digests")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{listed}: missing or unreadable ({' '.join(str(e).split())}); the "
                              f"checkpoint is incomplete or damaged: resume from another step_<N>") from None
    rank, world = _rank_world()
    problem = None
    for name in sorted(digests)[rank::world]:
        file = path / name
        if "/" in name or name in (".", "..") or not file.is_file():
            problem = f"{file}: listed in {CHECKSUMS} but missing"
        elif _digest(file) != digests[name]:
            problem = f"{file}: its contents differ from the checksum written at save (damaged)"
        if problem:
            break
    problems = [p for p in _gather(problem) if p]
    if problems:
        raise CheckpointError(f"{problems[0]}; resume from another step_<N> checkpoint, or start over")
    return digests


# ---------------------------------------------------------------------------------------
# Reading DCP's metadata without running code


_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in
    ("Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "MetadataIndex",
     "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch sizes and dtypes; refuses any other name."""

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_CLASSES or \
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which checkpoint metadata never holds")


def read_metadata(path: Path, files: set[str]) -> Metadata:
    """DCP's `.metadata` of the checkpoint at `path`, read by `_MetadataUnpickler` and checked:
    tensors only, each stored in one of `files` (the checkpoint's own)."""
    where = path / METADATA
    try:
        with open(where, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: not loaded ({' '.join(str(e).split())}); not the metadata of "
                              f"a checkpoint of this trainer") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{where}: holds a {type(metadata).__name__}, not checkpoint metadata")
    for key, item in metadata.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            raise CheckpointError(f"{where}: item {key!r} is not a tensor; checkpoints of this trainer "
                                  f"hold tensors only, so it is not loaded")
    for info in (metadata.storage_data or {}).values():
        if getattr(info, "relative_path", None) not in files:
            raise CheckpointError(f"{where}: points at {getattr(info, 'relative_path', info)!r}, which is "
                                  f"not a file of this checkpoint")
    return metadata


class TrustedReader(FileSystemReader):
    """DCP's file reader, given metadata already read safely (`read_metadata`)."""

    def __init__(self, path: Path, metadata: Metadata):
        super().__init__(str(path))
        self.metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if getattr(self.metadata, "storage_meta", None) is None:
            self.metadata.storage_meta = StorageMeta()
        self.metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return self.metadata


class _TensorsOnly(DefaultLoadPlanner):
    """DCP's planner, except that a non-tensor item is refused instead of unpickled."""

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"checkpoint item {read_item.dest_index.fqn!r} is not a tensor; not loaded")


# ---------------------------------------------------------------------------------------
# Save and load


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
    dist.barrier()
    _write_checksums(tmp)
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        set_pointer(run_dir, LATEST, final)
        prune(run_dir, keep)
    dist.barrier()
    return final


def load(path: Path, model: torch.nn.Module, optimizer=None) -> dict:
    """Loads into the model's (and optimizer's) current sharding, on any world size or plan,
    after checking every file (collective). Without an optimizer (scoring), only the model is
    read. Returns the train state."""
    if not (path / STATE).exists():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {STATE}); resume from another step_<N>")
    metadata = read_metadata(path, set(verify(path)))
    if optimizer is not None:
        _init_lazy_state(optimizer)
    state = _state(model, optimizer)
    dcp.load(state, storage_reader=TrustedReader(path, metadata), planner=_TensorsOnly())
    model.load_state_dict(state["model"])
    if optimizer is not None:
        full = optimizer.state_dict()
        _copy_into(full["state"], state["optim"])
        optimizer.load_state_dict(full)
    return json.loads((path / STATE).read_text())


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
