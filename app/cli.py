"""`python -m app <command>` (installed as `mmoe`): train, data."""
from __future__ import annotations

import argparse
import logging
import sys
import warnings

COMMANDS = {}


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
    if _rank() == 0:
        tasks = ", ".join(f"{t} " + " ".join(f"{k}={v:.4f}" for k, v in m.items()
                                            if k in ("auc", "logloss", "rmse"))
                          for t, m in summary["tasks"].items())
        print(f"done: {summary['steps']} steps, {summary['samples_per_sec']:,.0f} samples/s; {tasks}")


@command
def data(argv: list[str]) -> None:
    """Prepare data sets: mmoe data census [--out DIR] [--force]"""
    p = argparse.ArgumentParser(prog="mmoe data", description=data.__doc__)
    sub = p.add_subparsers(dest="source", required=True)
    census = sub.add_parser("census", help="UCI Census-Income (KDD), the MMoE paper's data")
    census.add_argument("--out", default="data/census")
    census.add_argument("--force", action="store_true")
    synth = sub.add_parser("synthetic", help="Criteo-shape rows with a known best AUC")
    synth.add_argument("--out", default="data/debug")
    synth.add_argument("--rows", default="20000,5000", help="train,test rows")
    synth.add_argument("--cardinalities", default="1000," * 25 + "1000",
                       help="one vocabulary size per categorical column")
    synth.add_argument("--dense", type=int, default=13)
    synth.add_argument("--tasks", default="click,convert")
    synth.add_argument("--correlation", type=float, default=0.5)
    synth.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.source == "census":
        from app.census import prepare

        prepare(args.out, force=args.force)
    elif args.source == "synthetic":
        from app.synthetic import SyntheticSpec, generate

        train_rows, test_rows = (int(x) for x in args.rows.split(","))
        spec = SyntheticSpec(rows={"train": train_rows, "test": test_rows}, num_dense=args.dense,
                             cardinalities=[int(x) for x in args.cardinalities.split(",")],
                             tasks=args.tasks.split(","), correlation=args.correlation, seed=args.seed)
        schema = generate(args.out, spec)
        print(f"wrote {args.out}: best achievable test AUC {schema.meta['best_auc']['test']}")


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", 0))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning)
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
