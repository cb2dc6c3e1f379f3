"""Log lines a cluster user can read: each carries the UTC time and the rank, warnings included
(they go through logging), and only warnings known to be noise are filtered, by their message."""
from __future__ import annotations

import logging
import os
import time
import warnings

# Printed by every rank of census runs, about the libraries rather than the run:
# (message regex, category), matched at the message's start
KNOWN_WARNINGS: list[tuple[str, type[Warning]]] = [
    # loading a checkpoint (resume, eval, predict): TorchRec's sharded tables are ShardedTensors
    ("Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
    # mmoe export reads the checkpoint in one process without a process group, as meant to
    ("torch.distributed is disabled, unavailable or uninitialized", UserWarning),
    # mmoe export: a weight stored transposed for the program (app.export.serving_layout) is saved whole
    ("No complete tensor found in the group", UserWarning),
]
# (logger, message start): log records of torch's own, which TorchRec's is_fx_tracing() calls set off
KNOWN_LOG_RECORDS = [("torch.fx._symbolic_trace", "is_fx_tracing will return true for both")]


def setup_logging() -> None:
    """Format: `2026-12-04 07:10:05 [rank 0] WARNING app: ...` (RANK as torchrun sets it; `-`
    in a process of its own)."""
    formatter = logging.Formatter(f"%(asctime)s [rank {os.environ.get('RANK', '-')}] %(levelname)s %(name)s: "
                                  "%(message)s", "%Y-%m-%d %H:%M:%S")
    formatter.converter = time.gmtime  # UTC: the lines of hosts in other time zones line up
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    logging.captureWarnings(True)
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, start in KNOWN_LOG_RECORDS:
        logging.getLogger(name).addFilter(lambda record, start=start: not record.getMessage().startswith(start))
