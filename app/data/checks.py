"""Input checks: what the reader rejects (or, with `on_bad_rows = "skip"`, zeroes and counts).

Every message is one line that names the file, and the row group and column where they
apply, and says what to fix. Two levels, cheapest first (`schema.json` itself is checked
where it is read, `app.data.schema`):
- `check_file` and `check_statistics` (`statistics_problems`): Parquet footers only (columns,
  types, and the min/max and null counts the writer stored per row group), so most bad files
  are named before the first step without decoding any data;
- `bad_rows` / `check_rows` / `clean_rows`: values of each row group as `read_row_group`
  decodes it (NaN, which footers do not record, and anything a file written without
  statistics hides).
The reader stops at the first problem; `app.data.scan` (`mmoe data check`) lists them all.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from app.data.errors import DataError, one_line
from app.data.hugectr import subtract_offsets
from app.data.schema import Columns, is_list

SKIP_HINT = 'fix the data, or set data.on_bad_rows = "skip" to give such rows weight 0'


# ---------------------------------------------------------------------------------------
# Footers


def type_ok(column: str, tp: pa.DataType, columns: Columns) -> bool:
    """Labels and dense: integer or floating point; categorical: integer ids or strings
    (hashed by the reader), or lists of either (multi-hot)."""
    if column in columns.categorical:
        if is_list(tp):
            tp = tp.value_type
        return pa.types.is_integer(tp) or pa.types.is_string(tp)
    return pa.types.is_integer(tp) or pa.types.is_floating(tp)


def check_file(path: Path, columns: Columns, reference: tuple[Path, pa.Schema] | None):
    """Footer of one file: readable, not empty, has the columns with usable types that agree
    with the first file's (`reference`). Extra columns are ignored. Returns its FileMetaData."""
    try:
        meta = pq.ParquetFile(path).metadata
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file, truncated or of another format "
                        f"({one_line(e)}); rewrite it with the converter") from e
    if meta.num_rows == 0:
        raise DataError(f"{path}: file has no rows; remove it or rewrite it with the converter")
    schema = meta.schema.to_arrow_schema()
    for name in columns.all:
        if name not in schema.names:
            present = ", ".join(schema.names[:12]) + (", ..." if len(schema.names) > 12 else "")
            raise DataError(f"{path}: missing column {name!r}, which the schema or config lists "
                            f"(the file has {present}); fix the schema.json or the config")
        tp = schema.field(name).type
        if not type_ok(name, tp, columns):
            role = "categorical" if name in columns.categorical else "numeric"
            need = ("integer ids or strings, or lists of them" if role == "categorical"
                    else "integer or floating point")
            raise DataError(f"{path}: column {name!r} has type {tp}, which is not usable as "
                            f"{role} (needs {need})")
        if reference is not None and reference[1].field(name).type != tp:
            raise DataError(f"{path}: column {name!r} is {tp} but {reference[0]} has "
                            f"{reference[1].field(name).type}; files of a split must share one schema")
    return meta


def _stat_problem(name: str, stats, tp: pa.DataType, columns: Columns,
                  kinds: dict[str, str]) -> str | None:
    """What a column chunk's footer statistics prove wrong, or None."""
    if stats is None:
        return None
    nulls = stats.null_count if stats.has_null_count and not is_list(tp) else 0
    lo, hi = (stats.min, stats.max) if stats.has_min_max else (None, None)
    if isinstance(lo, (bytes, str)):  # string categoricals are hashed; nothing to bound
        return None
    if nulls:
        return f"{nulls} null values"
    if lo is None:
        return None
    lo, hi = lo + 0, hi + 0  # writers store a float min of 0 as -0.0
    if name in columns.categorical:
        i = columns.categorical.index(name)
        card, offset = columns.cardinality[i], _offset(columns, i)
        lo, hi = lo - offset, hi - offset
        if lo < 0 or hi >= card:
            shifted = f", keys minus the slot offset {offset}" if offset else ""
            return (f"ids span [{lo}, {hi}]{shifted} but {columns.sizes_from} gives cardinality "
                    f"{card} (ids must lie in [0, {card}); raise it there if the ids are right)")
        return None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"values span [{lo}, {hi}], not finite"
    if kinds.get(name) == "binary" and (lo < 0 or hi > 1):
        return f"labels span [{lo}, {hi}] but a binary task needs 0 or 1"
    return None


def _offset(columns: Columns, i: int) -> int:
    """HugeCTR data sets store id + a per-column slot offset (`Columns.offsets`, () for none)."""
    offsets = getattr(columns, "offsets", ())
    return offsets[i] if offsets else 0


def statistics_problems(meta: pq.FileMetaData, columns: Columns,
                        label_kinds: tuple[str, ...]) -> Iterator[tuple[int, str, str]]:
    """(row group, column, what is wrong) for each column chunk whose footer min/max and null
    counts break the schema: ids outside [0, cardinality), binary labels outside [0, 1],
    nulls, inf. NaN is not recorded in footers and is caught when the row group is decoded
    (`bad_rows`)."""
    wanted = set(columns.all)
    kinds = dict(zip(columns.labels, label_kinds))
    arrow = meta.schema.to_arrow_schema()
    leaves = [(j, meta.schema.column(j).path.split(".")[0]) for j in range(meta.num_columns)]
    leaves = [(j, name) for j, name in leaves if name in wanted]
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        for j, name in leaves:
            problem = _stat_problem(name, group.column(j).statistics, arrow.field(name).type,
                                    columns, kinds)
            if problem:
                yield i, name, problem


def check_statistics(path: Path, meta: pq.FileMetaData, columns: Columns,
                     label_kinds: tuple[str, ...]) -> None:
    """The first of the footer's `statistics_problems`, raised."""
    first = next(statistics_problems(meta, columns, label_kinds), None)
    if first:
        i, name, problem = first
        raise DataError(f"{problem_line(f'{path}: row group {i}', name, problem)}; {SKIP_HINT}")


def problem_line(where: str, column: str, what: str) -> str:
    """A problem as every message states it: file and row group (`where`), column, what."""
    return f"{where}, column {column!r}: {what}"


# ---------------------------------------------------------------------------------------
# Values of a decoded row group


def read_row_group(path: str, index: int, columns: Columns, footers: dict[str, pq.FileMetaData],
                   use_threads: bool) -> pa.Table:
    """One row group's columns as the value checks take them: decoded (a damaged file is a
    DataError) and with HugeCTR's slot offsets subtracted. `footers` keeps each file's parsed
    footer; files are not memory-mapped: one cut short while it is read must raise the error
    below, not kill the process with SIGBUS."""
    try:
        file = pq.ParquetFile(path, metadata=footers.get(path))
        footers[path] = file.metadata
        table = file.read_row_group(index, columns=columns.all, use_threads=use_threads)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: row group {index} cannot be read ({one_line(e)}); "
                        f"the file is damaged: rewrite it with the converter") from e
    return subtract_offsets(table, columns)


def _array(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):  # combine_chunks copies even a single chunk
        return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    return col


def _floats(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Values as numpy, nulls as NaN (zero-copy for a float column without nulls)."""
    col = _array(col)
    if not pa.types.is_floating(col.type):
        col = col.cast(pa.float64())
    return col.to_numpy(zero_copy_only=False)


def _not_finite(x: np.ndarray) -> np.ndarray | None:
    finite = np.isfinite(x)
    return None if finite.all() else ~finite


def bad_rows(table: pa.Table, columns: Columns, label_kinds: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Masks of rows whose values the model cannot take, for the columns that have any:
    NaN/inf/null dense or label values, binary labels other than 0/1, null ids, and ids
    outside [0, cardinality). An empty dict means every row is good."""
    masks: dict[str, np.ndarray] = {}
    for name in columns.dense:
        mask = _not_finite(_floats(table.column(name)))
        if mask is not None:
            masks[name] = mask
    for name, kind in zip(columns.labels, label_kinds):
        y = _floats(table.column(name))
        mask = _not_finite(y)
        if kind == "binary" and y.size and not np.all((y == 0) | (y == 1)):
            mask = (y != 0) & (y != 1)  # NaN compares unequal, so it is caught here too
        if mask is not None:
            masks[name] = mask
    for name, card in zip(columns.categorical, columns.cardinality):
        mask = _bad_ids(_array(table.column(name)), card)
        if mask is not None:
            masks[name] = mask
    return masks


def _bad_ids(arr: pa.Array, card: int) -> np.ndarray | None:
    n = len(arr)
    if is_list(arr.type):
        flat = pc.list_flatten(arr)  # null lists count as empty; null ids inside a list are bad
        if pa.types.is_string(flat.type):
            if not flat.null_count:
                return None
            bad_flat = _null_mask(flat)
        else:
            if not _ids_out_of_range(flat, card):
                return None
            ids = pc.fill_null(flat, -1).to_numpy(zero_copy_only=False)
            bad_flat = (ids < 0) | (ids >= card)
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy()
        mask = np.zeros(n, bool)
        mask[np.repeat(np.arange(n), lengths)[bad_flat]] = True
        return mask
    if pa.types.is_string(arr.type):
        return _null_mask(arr) if arr.null_count else None
    if not _ids_out_of_range(arr, card):
        return None
    ids = pc.fill_null(arr, -1).to_numpy(zero_copy_only=False)
    return (ids < 0) | (ids >= card)


def _ids_out_of_range(ids: pa.Array, card: int) -> bool:
    """Cheap test first: the masks are built only for a column that fails it."""
    if ids.null_count:
        return True
    if len(ids) == 0:
        return False
    v = ids.to_numpy()  # zero-copy without nulls
    return bool(v.min() < 0 or v.max() >= card)


def _null_mask(arr: pa.Array) -> np.ndarray:
    return np.asarray(arr.is_null().to_numpy(zero_copy_only=False), bool)


def describe(table: pa.Table, name: str, mask: np.ndarray, columns: Columns) -> str:
    """`N bad values, first at row R (value V)`, for a message."""
    row = int(np.flatnonzero(mask)[0])
    value = table.column(name)[row].as_py()
    if name in columns.categorical:
        i = columns.categorical.index(name)
        offset = _offset(columns, i)
        what = f"ids outside [0, {columns.cardinality[i]}) or null" + (
            f" (ids are keys minus the slot offset {offset})" if offset else "")
    elif name in columns.labels:
        what = "labels that are not 0/1 (binary) or not finite"
    else:
        what = "NaN, inf or null values"
    return f"{int(mask.sum())} rows with {what}, first at row {row} ({value!r})"


def check_rows(table: pa.Table, columns: Columns, label_kinds: tuple[str, ...], where: str,
               skip: bool) -> np.ndarray | None:
    """Mask of the bad rows of one decoded row group, or None when all are good. Unless
    `skip`, the first bad column raises a DataError prefixed by `where` (file, row group)."""
    masks = bad_rows(table, columns, label_kinds)
    if not masks:
        return None
    if not skip:
        name = next(iter(masks))
        raise DataError(f"{problem_line(where, name, describe(table, name, masks[name], columns))}; "
                        f"{SKIP_HINT}")
    bad = np.zeros(table.num_rows, bool)
    for mask in masks.values():
        bad |= mask
    return bad


def clean_rows(table: pa.Table, columns: Columns, bad: np.ndarray) -> pa.Table:
    """Replaces every value of skipped rows by 0 (they then carry weight 0)."""
    keep = pa.array(~bad)
    out = table
    for name in columns.all:
        i = out.schema.get_field_index(name)
        col = out.column(i)
        if is_list(col.type):
            empty = pa.array([[]] * len(col), type=col.type)
            out = out.set_column(i, name, pc.if_else(keep, col, empty))
        else:
            zero = pa.scalar(0, type=col.type) if not pa.types.is_string(col.type) \
                else pa.scalar("", type=col.type)
            out = out.set_column(i, name, pc.if_else(keep, pc.fill_null(col, zero), zero))
    return out
