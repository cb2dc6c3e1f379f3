"""`python -m app <command>` (installed as `mmoe`).

Each command is a function taking its argv; `data` sources register themselves through an
`add_data_command(subparsers)` function in their own module (census, synthetic, ...).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import textwrap

from app.logs import setup_logging

COMMANDS = {}
DATA_SOURCES = ["app.sources.census", "app.sources.synthetic", "app.sources.criteo", "app.sources.hugectr_norm",
                "app.sources.mmoe_paper", "app.data.scan"]  # modules with add_data_command(subparsers)


def command(fn):
    COMMANDS[fn.__name__] = fn
    return fn


def config_parser(fn, epilog: str = "") -> argparse.ArgumentParser:
    """A command's parser whose --help also lists every config key (`app.config_help`)."""
    from app.config_help import help_text

    return argparse.ArgumentParser(prog=f"mmoe {fn.__name__}", description=fn.__doc__, allow_abbrev=False,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=(epilog + "\n\n" if epilog else "") + help_text())


@command
def train(argv: list[str]) -> None:
    """Train and evaluate: mmoe train [--config FILE] [--section.key value ...]"""
    p = config_parser(train)
    p.add_argument("--config", default="configs/census_mmoe.toml")
    args, overrides = p.parse_known_args(argv)
    from app.config import load_config
    from app.train import train as run

    cfg = load_config(args.config, overrides)
    summary = run(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        if summary["stopped"]:
            print(f"stopped at step {summary['steps']} on a signal; checkpoint in "
                  f"{cfg.run_dir}/checkpoints, run again to resume")
            return
        tasks = ", ".join(f"{t} " + " ".join(f"{k}={v:.4f}" for k, v in m.items()
                                            if k in ("auc", "logloss", "rmse"))
                          for t, m in summary["tasks"].items())
        print(f"done: {summary['steps']} steps, {summary['samples_per_sec']:,.0f} samples/s; {tasks}")


@command
def predict(argv: list[str]) -> None:
    """Score a split: mmoe predict --checkpoint DIR | --artifact DIR --out DIR [--merge]"""
    p = config_parser(predict)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint folder, or a run folder")
    source.add_argument("--artifact", help="a folder written by `mmoe export`: scores with it alone, in "
                                           "one process, into OUT/predictions.parquet")
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True)
    p.add_argument("--merge", action="store_true", help="one predictions.parquet instead of one per rank")
    args, overrides = p.parse_known_args(argv)
    if args.artifact:
        from app.predict import predict_artifact

        print(f"wrote {predict_artifact(args.artifact, args.split, args.out, overrides)}")
        return
    from app.predict import predict as run

    path = run(args.checkpoint, args.split, args.out, args.merge, overrides)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"wrote {path if args.merge else path.parent}")


@command
def export(argv: list[str]) -> None:
    """Write a run's model for serving: mmoe export RUN_DIR --out DIR [--quantize none|int8|int4]"""
    p = config_parser(export, epilog="Writes OUT/model.pt2 (torch.export; loads with torch alone), OUT/meta.json "
                                     "(its inputs and outputs) and OUT/config.json. --section.key value "
                                     "overrides the run's config, e.g. --data.path where its data set now lies.")
    p.add_argument("run", help="a run folder (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--out", required=True)
    p.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                   help="tables as row-wise int8 or int4 (the dense layers stay fp32)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the artifact will run: it serves on the device it was exported on")
    args, overrides = p.parse_known_args(argv)
    from app.export import export as run

    meta = run(args.run, args.out, args.quantize, args.device, overrides)
    tables = "fp32" if meta["quantize"] == "none" else meta["quantize"]
    print(f"wrote {args.out}: model.pt2 ({tables} tables, {meta['device']}) from "
          f"{meta['checkpoint']} (step {meta['step']}), meta.json, config.json")


@command
def eval(argv: list[str]) -> None:
    """Metrics of a checkpoint on a split: mmoe eval --checkpoint DIR [--split test]"""
    p = config_parser(eval)
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder, or a run folder")
    p.add_argument("--split", default="test")
    args, overrides = p.parse_known_args(argv)
    from app.predict import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, args.split, overrides)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(metrics, indent=2))


@command
def data(argv: list[str]) -> None:
    """Prepare or check data sets: mmoe data <source> [options], mmoe data check PATH  (see --help)"""
    p = argparse.ArgumentParser(prog="mmoe data", description=data.__doc__)
    sub = p.add_subparsers(dest="source", required=True)
    for module in DATA_SOURCES:
        importlib.import_module(module).add_data_command(sub)
    args = p.parse_args(argv)
    args.run(args)


@command
def report(argv: list[str]) -> None:
    """Plot a run: mmoe report RUN_DIR

    Writes RUN_DIR/report.md with loss, AUC, throughput and gate plots beside it.
    """
    p = argparse.ArgumentParser(prog="mmoe report", description=report.__doc__)
    p.add_argument("run_dir", help="a run directory written by `mmoe train` (runs/<config name>)")
    args = p.parse_args(argv)
    from app.report import ReportError, write_report

    try:
        print(f"wrote {write_report(args.run_dir)}")
    except ReportError as e:
        sys.exit(f"error: {e}")


@command
def plan(argv: list[str]) -> None:
    """Dry-run the sharding planner on any machine: mmoe plan --world-size N [--config FILE] [options]"""
    p = config_parser(plan, epilog=textwrap.fill(
        "Columns come from the config's data path (a data set, or a folder or file holding "
        "schema.json), --schema, or --cardinality. --section.key value overrides the config, "
        "e.g. --plan.tables.c3.compute_kernels '[\"fused_uvm_caching\"]'. "
        "Train with the result: mmoe train --config FILE --plan.file plan.json", 100))
    p.add_argument("--config", default="configs/census_mmoe.toml")
    p.add_argument("--world-size", type=int, required=True, help="ranks (GPUs) to plan for")
    p.add_argument("--local-world-size", type=int, default=8, help="ranks per host (default 8)")
    p.add_argument("--compute-device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--hbm", default="80GiB", help="GPU memory per rank (default 80GiB)")
    p.add_argument("--ddr", default="128GiB", help="host memory per rank (default 128GiB)")
    p.add_argument("--batch-size-per-rank", type=int, help="default: the config's data.batch_size")
    p.add_argument("--schema", help="schema.json (or its folder) to plan instead of the config's data")
    p.add_argument("--cardinality", help="plan without data: N gives the Criteo shape (26 columns "
                                         "c0..c25 of N rows, 13 dense); N0,N1,... one column per value; "
                                         "cK=M changes column cK, e.g. 100000,c3=100000000")
    p.add_argument("--out", help="write the plan here as JSON, for plan.file")
    args, overrides = p.parse_known_args(argv)
    from app import dry_run
    from app.config import ConfigError, load_config
    from app.plan import make_topology
    from app.plan_file import save_plan

    cfg = load_config(args.config, overrides)
    if args.world_size < 1 or args.local_world_size < 1:
        raise ConfigError("--world-size and --local-world-size must be at least 1")
    local = min(args.local_world_size, args.world_size)
    if args.world_size % local:
        raise ConfigError(f"--world-size {args.world_size} is not a whole number of hosts of "
                          f"--local-world-size {local} ranks")
    schema, where = dry_run.planning_schema(cfg.data.path, [t.label for t in cfg.tasks.values()],
                                            args.schema, args.cardinality)
    topology = make_topology(args.world_size, args.compute_device, local,
                             dry_run.parse_bytes(args.hbm), dry_run.parse_bytes(args.ddr))
    result = dry_run.dry_run_config(cfg, schema, where, topology,
                                    args.batch_size_per_rank or cfg.data.batch_size)
    print(dry_run.report(result))
    if args.out:
        save_plan(result.plan, args.out)
        print(f"\nwrote {args.out}; train with it: mmoe train --config {args.config} --plan.file {args.out}")


def main(argv: list[str] | None = None) -> None:
    """The `mmoe` entry point. Under torchrun, through its error recording: a rank that fails
    writes its traceback to the file torchrun names (TORCHELASTIC_ERROR_FILE), and torchrun's
    summary of the failure shows it as the root cause. Not elsewhere: importing torch would add
    seconds to the commands that need none (data, report)."""
    if "TORCHELASTIC_ERROR_FILE" in os.environ:
        from torch.distributed.elastic.multiprocessing.errors import record

        record(_run)(argv)
    else:
        _run(argv)


def _run(argv: list[str] | None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    setup_logging()
    if not argv or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:8s} {fn.__doc__.splitlines()[0]}" for name, fn in COMMANDS.items())
        print(f"usage: mmoe <command> [args]\n{lines}", file=sys.stderr)
        sys.exit(2)
    from app.artifact import ArtifactError
    from app.checkpoint import CheckpointError
    from app.config import ConfigError
    from app.data.errors import DataError

    try:
        COMMANDS[argv[0]](argv[1:])
    except (ConfigError, DataError, CheckpointError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        if "TORCHELASTIC_ERROR_FILE" in os.environ:  # torchrun's summary then names the cause too
            from torch.distributed.elastic.multiprocessing.errors import get_error_handler

            get_error_handler().record_exception(e)
        _leave_process_group()
        sys.exit(1)
    _leave_process_group()


_left_a_group = False  # `program` ends such a process without finalizing the interpreter


def _leave_process_group() -> None:
    """Leaves the process group, if this process joined one."""
    global _left_a_group
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _left_a_group = True


def program() -> None:
    """The `mmoe` program (`python -m app`): `main`, then the process ends.

    A process that left a process group ends without finalizing the interpreter. gloo's worker
    threads outlive `destroy_process_group` while the model still holds the group, and one still
    releasing its last collective's tensors when the interpreter finalizes needs the GIL, which
    Python then refuses by ending the thread: that aborts the process (`terminate called without
    an active exception`, exit code -6) after a run that succeeded, in 8 of 53 runs of `mmoe eval`
    on two CPU ranks (pytorch/pytorch#190489). Logs and output are flushed first; the readers'
    worker processes have stopped by then."""
    try:
        main()
        code = 0
    except SystemExit as e:
        if not _left_a_group or not isinstance(e.code, (int, type(None))):
            raise
        code = e.code or 0
    if _left_a_group:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
