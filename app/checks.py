"""Input checks: what the reader rejects (or, with `on_bad_rows = "skip"`, zeroes and counts).

File-level checks read only Parquet footers, so a bad file is named before the first step;
value checks run on each decoded row group.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from app.data import Columns


class DataError(ValueError):
    """Bad input: the message names the file, row group and column."""


def type_ok(column: str, tp: pa.DataType, columns: Columns) -> bool:
    if column in columns.categorical:
        if pa.types.is_list(tp) or pa.types.is_large_list(tp):
            tp = tp.value_type
        return pa.types.is_integer(tp) or pa.types.is_string(tp)
    return pa.types.is_integer(tp) or pa.types.is_floating(tp)


def check_file(path: Path, columns: "Columns", reference: tuple[Path, pa.Schema] | None):
    """Footer of one file: readable, not empty, has the columns with usable types that agree
    with the first file's (`reference`). Returns its FileMetaData."""
    try:
        meta = pq.ParquetFile(path).metadata
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    if meta.num_rows == 0:
        raise DataError(f"{path}: file has no rows")
    schema = meta.schema.to_arrow_schema()
    for name in columns.all:
        if name not in schema.names:
            raise DataError(f"{path}: missing column {name!r}")
        tp = schema.field(name).type
        if not type_ok(name, tp, columns):
            role = "categorical" if name in columns.categorical else "numeric"
            raise DataError(f"{path}: column {name!r} has type {tp}, which is not usable as {role}")
        if reference is not None and reference[1].field(name).type != tp:
            raise DataError(f"{path}: column {name!r} is {tp} but {reference[0]} has "
                         f"{reference[1].field(name).type}; files of a split must share one schema")
    return meta


def bad_rows(table: pa.Table, columns: "Columns", label_kinds: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Per column, a mask of rows whose values the model cannot take."""
    masks: dict[str, np.ndarray] = {}
    for name in columns.dense:
        x = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        masks[name] = ~np.isfinite(x)
    for name, kind in zip(columns.labels, label_kinds):
        y = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        masks[name] = ~np.isfinite(y) | ((y != 0) & (y != 1) if kind == "binary" else False)
    for name, card in zip(columns.categorical, columns.cardinality):
        arr = table.column(name).combine_chunks()
        if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
            lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy()
            flat = pc.list_flatten(arr)
            if pa.types.is_string(flat.type):
                continue
            ids = flat.to_numpy(zero_copy_only=False)
            bad_ids = (ids < 0) | (ids >= card) if ids.size else np.zeros(0, bool)
            row_of = np.repeat(np.arange(len(arr)), lengths)
            mask = np.zeros(len(arr), bool)
            mask[row_of[bad_ids]] = True
            masks[name] = mask
        elif not pa.types.is_string(arr.type):
            ids = pc.fill_null(arr, -1).to_numpy(zero_copy_only=False)
            masks[name] = (ids < 0) | (ids >= card)
    return masks


def clean_rows(table: pa.Table, columns: "Columns", bad: np.ndarray) -> pa.Table:
    """Replaces every value of skipped rows by 0 (they then carry weight 0)."""
    keep = pa.array(~bad)
    out = table
    for name in columns.all:
        i = out.schema.get_field_index(name)
        col = out.column(i)
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            empty = pa.array([[]] * len(col), type=col.type)
            out = out.set_column(i, name, pc.if_else(keep, col, empty))
        else:
            zero = pa.scalar(0, type=col.type) if not pa.types.is_string(col.type) \
                else pa.scalar("", type=col.type)
            out = out.set_column(i, name, pc.if_else(keep, pc.fill_null(col, zero), zero))
    return out
