"""`mmoe data check PATH`: every problem of a data set, found up front by the reader's checks.

Training stops at the first bad row group it reads. This scans every file of the chosen
splits with the same checks (`app.data.checks`): each file's footer (columns, types, the
statistics of every row group), then the values of every row group, decoded in a pool of
processes. It prints one line per bad row group and column, then a summary, and exits with 1
when anything is bad. Columns and cardinalities come as in training: `schema.json`, or
HugeCTR's `_metadata.json` with the config's `data.slot_size_array`.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq

from app.config import Config, DataConfig, load_config
from app.data import checks
from app.data.errors import DataError, one_line
from app.data.layout import load_schema, split_files
from app.data.schema import Columns

# a problem found in a row group: (column, bad rows or 0 where a footer shows it, line)
Found = tuple[str, int, str]


@dataclass(frozen=True)
class Group:
    """A row group to decode, with what its footer statistics already show (column -> what)."""

    path: str
    index: int
    footer: dict[str, str]


@dataclass
class Report:
    """What a scan found: every problem's line, and the summary's counts."""

    lines: list[str] = field(default_factory=list)
    files: int = 0
    row_groups: int = 0
    rows: int = 0
    bad_rows: dict[str, int] = field(default_factory=dict)  # by column
    seconds: float = 0.0

    def summary(self) -> str:
        n = len(self.lines)
        counts = ", ".join(f"{column} {rows:,}" for column, rows in self.bad_rows.items())
        found = f"{n} problem{'s' * (n != 1)}; bad rows: {counts or 'none counted'}" if n else "no problems"
        return (f"checked {self.files} files, {self.row_groups:,} row groups, {self.rows:,} rows in "
                f"{self.seconds:.1f}s: {found}")


def scan_columns(dataset: str | Path, cfg: Config | None,
                 splits: list[str]) -> tuple[Columns, tuple[str, ...]]:
    """The columns and label kinds training would read: the config's tasks and `data` keys, or
    without a config every column of the schema, each label taken as binary (0/1). The
    schema comes from the config's train and eval splits, or without one from `splits`."""
    data = cfg.data if cfg else DataConfig()
    schema, where = load_schema(dataset, (data.train_split, data.eval_split) if cfg else splits,
                                data.slot_size_array, data.keys_have_offsets)
    labels = [t.label for t in cfg.tasks.values()] if cfg else schema.labels
    kinds = tuple(t.type for t in cfg.tasks.values()) if cfg else ("binary",) * len(labels)
    return Columns.resolve(schema, labels, data.dense, data.categorical, where), kinds


def _split_plan(dataset: str | Path, split: str, columns: Columns, kinds: tuple[str, ...],
                footers: dict[str, pq.FileMetaData]) -> tuple[int, list[str | Group]]:
    """The split's files, the problems their footers show (as lines) and its row groups to
    decode, in file order."""
    try:
        files = split_files(dataset, split)
    except DataError as e:
        return 0, [one_line(e)]
    out: list[str | Group] = []
    reference = None
    for path in files:
        try:
            meta = checks.check_file(path, columns, reference)
        except DataError as e:
            out.append(one_line(e))
            continue
        reference = reference or (path, meta.schema.to_arrow_schema())
        footers[str(path)] = meta
        stats: dict[int, dict[str, str]] = {}
        for i, name, what in checks.statistics_problems(meta, columns, kinds):
            stats.setdefault(i, {})[name] = what
        out += [Group(str(path), i, stats.get(i, {})) for i in range(meta.num_row_groups)
                if meta.row_group(i).num_rows]
    return len(files), out


_JOB: dict = {}  # what every row group is checked against, set in each worker by `_start`


def _start(footers: dict[str, pq.FileMetaData], columns: Columns, kinds: tuple[str, ...],
           use_threads: bool) -> None:
    _JOB.update(footers=footers, columns=columns, kinds=kinds, use_threads=use_threads)


def _check_group(group: Group) -> tuple[int, list[Found]]:
    """Rows decoded and the problems of one row group: its values' (`bad_rows`), and what
    its footer showed in columns whose values hide it."""
    columns, where = _JOB["columns"], f"{group.path}: row group {group.index}"
    try:
        table = checks.read_row_group(group.path, group.index, columns, _JOB["footers"],
                                      _JOB["use_threads"])
    except DataError as e:
        return 0, [("", 0, one_line(e))]
    masks = checks.bad_rows(table, columns, _JOB["kinds"])
    found = {name: (name, int(mask.sum()),
                    checks.problem_line(where, name, checks.describe(table, name, mask, columns)))
             for name, mask in masks.items()}
    for name, what in group.footer.items():
        found.setdefault(name, (name, 0, checks.problem_line(where, name, what)))
    return table.num_rows, [found[c] for c in columns.all if c in found]


def check_dataset(dataset: str | Path, splits: list[str], columns: Columns, kinds: tuple[str, ...],
                  workers: int, emit: Callable[[str], None] = print) -> Report:
    """Every problem of `splits`, in file and row group order, passed to `emit` as found."""
    start, report, footers, plan = time.perf_counter(), Report(), {}, []
    for split in splits:
        files, items = _split_plan(dataset, split, columns, kinds, footers)
        report.files += files
        plan += items
    groups = [g for g in plan if isinstance(g, Group)]

    def found(line: str) -> None:
        report.lines.append(line)
        emit(line)

    def results():
        if workers <= 1 or len(groups) <= 1:
            _start(footers, columns, kinds, use_threads=True)
            yield from map(_check_group, groups)
            return
        # fork: the workers inherit the parsed footers instead of unpickling them, and need no
        # fresh import of this package (`python -m app` runs the CLI on import)
        fork = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(min(workers, len(groups)), mp_context=fork, initializer=_start,
                                 initargs=(footers, columns, kinds, False)) as pool:
            yield from pool.map(_check_group, groups, chunksize=max(1, len(groups) // (8 * workers)))

    checked = results()
    for item in plan:
        if isinstance(item, str):
            found(item)
            continue
        rows, problems = next(checked)
        report.row_groups, report.rows = report.row_groups + 1, report.rows + rows
        for column, bad, line in problems:
            if bad:
                report.bad_rows[column] = report.bad_rows.get(column, 0) + bad
            found(line)
    report.seconds = time.perf_counter() - start
    return report


def add_data_command(sub) -> None:
    p = sub.add_parser("check", help="scan a whole data set with the reader's checks: every problem, "
                                     "one line each", description=__doc__)
    p.add_argument("path", help="the data set: schema.json and split folders, or HugeCTR's data folder")
    p.add_argument("--split", action="append", help="split to scan (repeat for several); default: the "
                   "config's train and eval splits, or train and test")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes decoding row groups")
    p.add_argument("--config", help="the training config: its tasks' labels and types, data.dense, "
                   "data.categorical, data.slot_size_array; default: every column, labels 0/1")

    def run(args) -> None:
        cfg = load_config(args.config) if args.config else None
        data = cfg.data if cfg else DataConfig()
        splits = list(dict.fromkeys(args.split or [data.train_split, data.eval_split]))
        columns, kinds = scan_columns(args.path, cfg, splits)
        report = check_dataset(args.path, splits, columns, kinds, args.workers)
        print(report.summary())
        if report.lines:
            raise SystemExit(1)

    p.set_defaults(run=run)
