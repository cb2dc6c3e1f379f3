"""Parquet files written in row groups of an exact size, from tables of any length."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


class RowGroupWriter:
    """Appends tables to one Parquet file in row groups of exactly `size` rows (the last one
    shorter); the file is created by the first whole row group or at the end, so no rows
    write no file. The remainder waits in memory: at most one row group."""

    def __init__(self, path: str | Path, size: int):
        self.path, self.size = path, size
        self.pending: list[pa.Table] = []
        self.rows, self.writer = 0, None

    def __enter__(self) -> RowGroupWriter:
        return self

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.rows += table.num_rows
        if self.rows >= self.size:
            self._flush(self.rows // self.size * self.size)

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self.pending)
        self.writer = self.writer or pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table.slice(0, n), row_group_size=self.size)
        rest = table.slice(n)
        self.pending, self.rows = ([rest] if rest.num_rows else []), rest.num_rows

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None and self.rows:
                self._flush(self.rows)
        finally:
            if self.writer is not None:
                self.writer.close()
