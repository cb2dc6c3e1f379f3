"""`python -m app <command>` (installed as `mmoe`).

Each command is a function taking its argv; `data` sources register themselves through an
`add_data_command(subparsers)` function in their own module (census, synthetic, ...).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

COMMANDS = {}
DATA_SOURCES = ["app.census", "app.synthetic"]  # modules with add_data_command(subparsers)


def command(fn):
    COMMANDS[fn.__name__] = fn
    return fn


@command
def train(argv: list[str]) -> None:
    """Train and evaluate: mmoe train [--config FILE] [--section.key value ...]"""
    p = argparse.ArgumentParser(prog="mmoe train", description=train.__doc__)
    p.add_argument("--config", default="configs/census_mmoe.toml")
    args, overrides = p.parse_known_args(argv)
    from app.config import load_config
    from app.train import train as run

    summary = run(load_config(args.config, overrides))
    if int(os.environ.get("RANK", 0)) == 0:
        tasks = ", ".join(f"{t} " + " ".join(f"{k}={v:.4f}" for k, v in m.items()
                                            if k in ("auc", "logloss", "rmse"))
                          for t, m in summary["tasks"].items())
        print(f"done: {summary['steps']} steps, {summary['samples_per_sec']:,.0f} samples/s; {tasks}")


@command
def data(argv: list[str]) -> None:
    """Prepare data sets: mmoe data <source> [options]  (sources: see --help)"""
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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if not argv or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:8s} {fn.__doc__.splitlines()[0]}" for name, fn in COMMANDS.items())
        print(f"usage: mmoe <command> [args]\n{lines}", file=sys.stderr)
        sys.exit(2)
    from app.config import ConfigError
    from app.data import DataError

    try:
        COMMANDS[argv[0]](argv[1:])
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
