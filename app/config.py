"""Typed run configuration: dataclasses filled from a TOML file and `--section.key value` flags.

Precedence, highest first: command line > config file > dataclass defaults.
Unknown keys and values of the wrong type are errors that name the key.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class DataConfig:
    # dataset folder holding schema.json and one folder per split, or HugeCTR's data folder
    # whose splits hold _file_list.txt and _metadata.json (app/data/hugectr.py)
    path: str = "data/census"
    train_split: str = "train"  # split (folder or HugeCTR file list) to train on
    eval_split: str = "test"  # split evaluated during and after training
    dense: list[str] = field(default_factory=list)  # dense columns, in input order; empty: all of the schema
    categorical: list[str] = field(default_factory=list)  # categorical columns (one table each); empty: all
    batch_size: int = 1024  # train rows a step, per rank
    eval_batch_size: int = 8192  # rows a scoring step, per rank
    num_workers: int = 0  # DataLoader worker processes per rank
    shuffle: bool = True  # shuffle row groups and rows within a window each epoch
    on_bad_rows: str = "error"  # "error" stops with file/row group/column; "skip" drops and counts
    # HugeCTR data without schema.json: rows of each table in ascending _metadata.json "cats" index order
    # (HugeCTR's slot_size_array); empty: max id + 1 found in the splits
    slot_size_array: list[int] = field(default_factory=list)
    keys_have_offsets: bool = False  # keys are id + sum of the earlier slots' sizes (HugeCTR's offsets)
    # on_bad_rows = "skip": a run stops (after a checkpoint) once more than this share of the train
    # rows read was skipped (a warning past 1%)
    max_skipped_fraction: float = 0.05


@dataclass
class TaskConfig:
    type: str = "binary"  # "binary" (BCE on a 0/1 label) or "regression" (MSE)
    label: str = ""  # label column; empty: the task's name
    weight: float = 1.0  # multiplies this task's loss, hence its gradients
    # ESMM-style chain: this task's prediction is its tower's probability times the named task's
    # prediction (e.g. ctcvr = cvr tower x ctr), so the tower learns p(this | named) over all rows
    multiply_by: str = ""


@dataclass
class ModelConfig:
    head: str = "mmoe"  # "mmoe", "omoe" (one gate for all tasks), "shared_bottom", "cgc" or "ple"
    embedding_dim: int = 16  # width of every embedding table
    # "fp16": tables in half precision (half the memory and the bandwidth of the lookups; the
    # fused optimizer keeps its per-row state in fp32), pooled in fp32
    embedding_dtype: str = "fp32"
    num_experts: int = 3  # mmoe and omoe
    num_shared_experts: int = 2  # cgc and ple: experts every task's gate sees
    num_task_experts: int = 1  # cgc and ple: experts of each task, seen by its gate only
    num_levels: int = 2  # ple: extraction levels (cgc is one level)
    expert_layers: list[int] = field(default_factory=lambda: [512, 256, 128])  # hidden sizes of each expert MLP
    tower_layers: list[int] = field(default_factory=lambda: [128, 64])  # hidden sizes of each task tower (then 1)
    dropout: float = 0.0  # dropout after each hidden layer of experts and towers
    activation: str = "relu"  # "relu", "gelu" or "silu"
    precision: str = "fp32"  # "bf16": autocast the dense head and towers (fp32 master weights)
    # torch.compile of all after the embedding lookup, head to loss, as one graph (a GPU step
    # is bound by host work): "auto" (reduce-overhead on a GPU, off on CPU), "off", "default"
    # (fused kernels, fewer launches) or "reduce-overhead" (also CUDA graphs). The first steps
    # compile; evaluation runs uncompiled.
    compile: str = "auto"
    # How task losses are summed (app/model.py, LossBalancer): "fixed" (tasks.*.weight),
    # "uncertainty" (learned log-variances, Kendall et al. 2018) or "gradnorm" (learned weights
    # that equalize gradient norms at the last shared layer, Chen et al. 2018)
    loss_balancing: str = "fixed"
    gradnorm_alpha: float = 1.5  # gradnorm: how hard slower-learning tasks are pulled up; 0 equal norms


@dataclass
class OptimConfig:
    dense: str = "adam"  # "adam" or "sgd"
    dense_lr: float = 1e-3  # learning rate of the dense layers
    sparse: str = "rowwise_adagrad"  # "adagrad", "rowwise_adagrad", "sgd" or "adam"
    sparse_lr: float = 0.05  # learning rate of the embedding tables
    weight_decay: float = 0.0  # L2 penalty, dense and sparse


@dataclass
class TrainConfig:
    epochs: int = 1  # passes over the train split
    max_steps: int = 0  # 0: run all epochs
    eval_every: int = 0  # steps between evaluations; 0: only at the end
    log_every: int = 50  # steps between train-metric log lines (each one reads the GPU once)
    seed: int = 0  # initial weights, the epochs' row order and dropout
    run_dir: str = ""  # empty: runs/<config name>
    device: str = "auto"  # "auto" (cuda when present), "cpu" or "cuda"
    checkpoint_every: int = 0  # steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 3  # newest complete checkpoints kept (and the best one, see early_stop); 0: all
    resume: bool = True  # continue from RUN_DIR/checkpoints/latest when there is one
    # false: no checkpoint at all, not even at the end (benchmarks, tables too large for the
    # disk): such a run cannot resume, and early_stop keeps no best one
    checkpoints: bool = True
    # start over in a run directory that holds checkpoints, deleting them (and its metrics and
    # summary); without it, resume = false there is an error
    overwrite: bool = False
    tensorboard: bool = True  # event files in RUN_DIR/tb (rank 0)
    gate_stats: bool = True  # per-task mean gate weight of each expert, and gate entropy
    eval_auc_bins: int = 0  # eval AUC from this many prediction bins, in fixed memory; 0: exact
    gc_every: int = 100  # steps between Python garbage collections while training; 0: Python's own
    # stop once this evaluation metric stops improving: "mean_auc" or "<task>/<auc|logloss|ne|rmse>";
    # needs eval_every; the best evaluation's checkpoint is kept and is what predict/eval use
    early_stop: str = ""
    patience: int = 3  # evaluations without improvement before early_stop stops the run
    # "host" (TorchRec's pipeline with each batch's counts exchanged between the hosts, app/pipeline.py)
    # or "torchrec" (TorchRec's TrainPipelineSparseDist as it ships)
    pipeline: str = "host"


@dataclass
class TableConstraints:
    """Planner constraints for one table, under [plan.tables.<categorical column>]."""

    sharding_types: list[str] = field(default_factory=list)  # empty: plan.sharding_types
    compute_kernels: list[str] = field(default_factory=list)  # empty: plan.compute_kernels
    pooling_factor: float = 0.0  # mean ids per row (multi-hot columns); 0: the planner's 1.0
    cache_load_factor: float = 0.0  # fused_uvm_caching: share of rows cached in HBM; 0: kernel default


@dataclass
class PlanConfig:
    file: str = ""  # plan JSON from `mmoe plan --out`; when set, training applies it instead of planning
    compute_kernels: list[str] = field(default_factory=list)  # allowed kernels; empty: planner's
    # allowed types; empty: planner's (above 128 ranks without row_wise and data_parallel: app/plan.py)
    sharding_types: list[str] = field(default_factory=list)
    storage_reservation: float = 0.15  # share of each rank's HBM the plan leaves to dense model and inputs
    tables: dict[str, TableConstraints] = field(default_factory=dict)  # per column; over the lists above


@dataclass
class Config:
    name: str = "default"  # the run's name (default: the config file's); runs/<name> unless train.run_dir
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: dict[str, TaskConfig] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_dir or f"runs/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks `value` against the annotation `tp`, converting only int -> float."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return {k: _coerce(v, item, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, bool) and tp is not bool:  # bool is an int subclass; never accept it as one
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown key {where + '.' if where else ''}{unknown[0]}; "
            f"known keys{' of ' + where if where else ''}: {', '.join(sorted(known))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """Command-line values are TOML-ish literals: 3, 0.5, true, [1, 2], "x" or a bare word."""
    lowered = {"true": True, "false": False}.get(text.lower())
    if lowered is not None:
        return lowered
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: {part} is not a section")
    node[leaf] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["--train.epochs", "2", "--model.head=omoe"]` -> nested dict."""
    tree: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value")
            value, i = args[i + 1], i + 1
        _set_path(tree, key, _parse_value(value))
        i += 1
    return tree


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Reads `path` (TOML, or the JSON a run saved), applies overrides, validates, and fills
    task labels."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            with open(path, "rb") as f:
                values = json.load(f) if path.suffix == ".json" else tomllib.load(f)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None
        values.setdefault("name", path.stem)
    values = _merge(values, parse_overrides(overrides or []))
    cfg = _build(Config, values, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    if not cfg.tasks:
        raise ConfigError("the config defines no tasks; add a [tasks.<name>] table")
    for name, task in cfg.tasks.items():
        if task.type not in ("binary", "regression"):
            raise ConfigError(f"tasks.{name}.type is {task.type!r}; use 'binary' or 'regression'")
        task.label = task.label or name
    _validate_chains(cfg.tasks)
    choices = {
        "model.head": (cfg.model.head, ("mmoe", "omoe", "shared_bottom", "cgc", "ple")),
        "model.loss_balancing": (cfg.model.loss_balancing, ("fixed", "uncertainty", "gradnorm")),
        "model.activation": (cfg.model.activation, ("relu", "gelu", "silu")),
        "model.precision": (cfg.model.precision, ("fp32", "bf16")),
        "model.embedding_dtype": (cfg.model.embedding_dtype, ("fp32", "fp16")),
        "model.compile": (cfg.model.compile, ("auto", "off", "default", "reduce-overhead")),
        "optim.dense": (cfg.optim.dense, ("adam", "sgd")),
        "optim.sparse": (cfg.optim.sparse, ("adagrad", "rowwise_adagrad", "sgd", "adam")),
        "data.on_bad_rows": (cfg.data.on_bad_rows, ("error", "skip")),
        "train.device": (cfg.train.device, ("auto", "cpu", "cuda")),
        "train.pipeline": (cfg.train.pipeline, ("host", "torchrec")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} is {value!r}; use one of {', '.join(allowed)}")
    for key, low, high, meaning in RANGES:
        _check_range(key, _get(cfg, key), low, high, meaning)
    for name, task in cfg.tasks.items():
        _check_range(f"tasks.{name}.weight", task.weight, "[0", "", "a multiplier of its loss")
    m = cfg.model
    for key in ("expert_layers", "tower_layers"):
        if any(n < 1 for n in getattr(m, key)):
            raise ConfigError(f"model.{key} is {getattr(m, key)}; layer sizes must be at least 1")
    if not m.expert_layers:
        raise ConfigError("model.expert_layers is empty; give at least one layer size, e.g. [128]")
    _validate_early_stop(cfg)
    if m.loss_balancing == "gradnorm" and len(cfg.tasks) < 2:
        raise ConfigError("model.loss_balancing 'gradnorm' balances several tasks; with one task use 'fixed'")
    if m.loss_balancing != "fixed" and any(t.weight <= 0 for t in cfg.tasks.values()):
        bad = next(n for n, t in cfg.tasks.items() if t.weight <= 0)
        raise ConfigError(f"tasks.{bad}.weight is {cfg.tasks[bad].weight}; model.loss_balancing "
                          f"{m.loss_balancing!r} needs positive task weights")


# Every numeric field's range: (key, lowest, highest, what it means); "[" and "]" include the
# bound, "(" and ")" leave it out, "" has none.
RANGES = [
    ("data.batch_size", "[1", "", "rows per rank a step"),
    ("data.eval_batch_size", "[1", "", "rows per rank a scoring step"),
    ("data.num_workers", "[0", "", "reader processes per rank; 0 reads in the training process"),
    ("data.max_skipped_fraction", "[0", "1]", "a share of the train rows"),
    ("model.embedding_dim", "[1", "", "the width of every table"),
    ("model.num_experts", "[1", "", "experts"),
    ("model.num_shared_experts", "[1", "", "experts"),
    ("model.num_task_experts", "[1", "", "experts"),
    ("model.num_levels", "[1", "", "extraction levels"),
    ("model.dropout", "[0", "1)", "the share of units dropped"),
    ("model.gradnorm_alpha", "[0", "", "0 or more; the paper uses 0.12 to 3"),
    ("optim.dense_lr", "(0", "", "a learning rate"),
    ("optim.sparse_lr", "(0", "", "a learning rate"),
    ("optim.weight_decay", "[0", "", "0 for none"),
    ("train.epochs", "[1", "", "passes over the train split"),
    ("train.max_steps", "[0", "", "0 runs all epochs"),
    ("train.eval_every", "[0", "", "steps; 0 evaluates at the end only"),
    ("train.log_every", "[1", "", "steps"),
    ("train.checkpoint_every", "[0", "", "steps; 0 saves at the end only"),
    ("train.keep_checkpoints", "[0", "", "0 keeps all"),
    ("train.gc_every", "[0", "", "steps; 0 leaves collection to Python"),
    ("train.patience", "[1", "", "evaluations"),
    ("train.eval_auc_bins", "[0", "", "0 computes the exact AUC, e.g. 10000 bins in fixed memory"),
]


def _get(cfg: Config, key: str) -> Any:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _check_range(key: str, value: float, low: str, high: str, meaning: str) -> None:
    below = low and (value < float(low[1:]) if low[0] == "[" else value <= float(low[1:]))
    above = high and (value > float(high[:-1]) if high[-1] == "]" else value >= float(high[:-1]))
    if below or above:
        span = f"{low or '(-inf'}, {high or 'inf)'}"
        raise ConfigError(f"{key} is {value}; it must lie in {span} ({meaning})")


def _validate_early_stop(cfg: Config) -> None:
    metric = cfg.train.early_stop
    if not metric:
        return
    task, _, name = metric.rpartition("/")
    kinds = {"auc": "binary", "logloss": "binary", "ne": "binary", "rmse": "regression"}
    if metric == "mean_auc":
        ok = any(t.type == "binary" for t in cfg.tasks.values())
    else:
        ok = task in cfg.tasks and kinds.get(name) == cfg.tasks[task].type
    if not ok:
        raise ConfigError(f"train.early_stop is {metric!r}; use mean_auc or <task>/auc, /logloss, /ne "
                          f"(binary tasks) or /rmse (regression) of a task: {', '.join(cfg.tasks)}")
    if not cfg.train.eval_every:
        raise ConfigError("train.early_stop needs train.eval_every (steps between the evaluations it compares)")


def _validate_chains(tasks: dict[str, TaskConfig]) -> None:
    """multiply_by names another binary task, and following the names never comes back."""
    for name, task in tasks.items():
        if not task.multiply_by:
            continue
        if task.multiply_by not in tasks:
            raise ConfigError(f"tasks.{name}.multiply_by is {task.multiply_by!r}, which is no task; "
                              f"tasks: {', '.join(tasks)}")
        for n in (name, task.multiply_by):
            if tasks[n].type != "binary":
                raise ConfigError(f"tasks.{name}.multiply_by: {n!r} is a {tasks[n].type} task; a "
                                  f"product of probabilities needs binary tasks on both sides")
        chain = [name]
        while tasks[chain[-1]].multiply_by:
            chain.append(tasks[chain[-1]].multiply_by)
            if chain[-1] in chain[:-1]:
                raise ConfigError(f"tasks.{name}.multiply_by makes a cycle: {' -> '.join(chain)}; "
                                  f"a chain must end at a task with no multiply_by")
