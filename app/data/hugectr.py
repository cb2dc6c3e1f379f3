"""HugeCTR's Parquet splits, read in place.

A split is a file list (first line the number of files, then one path per line;
`_file_list.txt` in a split folder, or any list file named as the split) or a folder holding
`_metadata.json` next to its Parquet files, as HugeCTR and NVTabular lay them out:

    {"file_stats": [{"file_name": "0.parquet", "num_rows": 199523}, ...],
     "labels": [{"col_name": "income", "index": 0}, ...], "conts": [...], "cats": [...]}

`index` is the column's position in the Parquet files; as in HugeCTR, the columns of a role
are taken in ascending `index` order, whatever order the JSON lists them in (NVTabular writes
`cats` in workflow order), and `file_stats` names are matched by basename (HugeCTR's
generator writes them with its output prefix). Without `schema.json`, the column roles come
from the metadata of the train split; cardinalities from `data.slot_size_array` (slot i is
the `cats` column of the i-th smallest index) or, without it, from max id + 1 found in the
splits. With
`data.keys_have_offsets`, keys carry HugeCTR's cumulative slot offsets (slot i's keys start
at the sum of the sizes of slots 0..i-1) and the reader subtracts them (`subtract_offsets`).
HugeCTR's Norm binary files are converted instead (`app.sources.hugectr_norm`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from app.data.errors import DataError
from app.data.schema import Columns, Schema, is_list

log = logging.getLogger("app")

FILE_LIST = "_file_list.txt"
METADATA = "_metadata.json"


@dataclass(frozen=True)
class Metadata:
    """`_metadata.json` of one folder: rows per file and (name, column index) per role."""

    path: Path
    file_rows: dict[str, int]
    labels: list[tuple[str, int]]
    dense: list[tuple[str, int]]
    cats: list[tuple[str, int]]


@dataclass(frozen=True)
class Split:
    """The Parquet files of a HugeCTR split, in list order, and their folders' metadata."""

    where: Path  # the file list, or the folder
    files: list[Path]
    metadata: dict[Path, Metadata]  # by folder; folders without _metadata.json are absent


def read_file_list(path: Path) -> list[Path]:
    """Paths of a HugeCTR file list: the first `count` paths, as HugeCTR reads it (its Norm
    generator writes every name twice under a count of one each). Relative paths are taken
    from the list's folder or the nearest parent that has them (HugeCTR resolves them from
    the folder it runs in)."""
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not lines or not lines[0].isdigit() or int(lines[0]) < 1:
        raise DataError(f"{path}: a file list starts with the number of files (at least 1), then "
                        f"one path per line; got {lines[0][:60]!r} as its first line" if lines else
                        f"{path}: empty file list")
    count, names = int(lines[0]), lines[1:]
    if count > len(names):
        raise DataError(f"{path}: first line says {count} files but {len(names)} paths follow; "
                        f"fix the count")
    if count < len(names):
        log.warning("%s: first line says %d files; the %d lines after them are ignored, as HugeCTR "
                    "does", path, count, len(names) - count)
    return [_resolve(path, Path(name)) for name in names[:count]]


def _resolve(file_list: Path, name: Path) -> Path:
    if name.is_absolute():
        if not name.is_file():
            raise DataError(f"{file_list}: listed file {name} does not exist")
        return name
    here = file_list.resolve().parent
    for base in (here, *here.parents):
        if (base / name).is_file():
            return base / name
    raise DataError(f"{file_list}: listed file {name} is not under {here} or any of its parents; "
                    f"write its absolute path or a path relative to the list")


def read_metadata(path: Path) -> Metadata:
    """`file_stats` by basename and each role's columns in ascending `index` order, as
    HugeCTR reads them (a name's folders and the JSON's column order do not count)."""
    try:
        raw = json.loads(path.read_text())
        stats = [(str(s["file_name"]), int(s["num_rows"])) for s in raw["file_stats"]]
        roles = {key: sorted(((str(c["col_name"]), int(c["index"])) for c in raw.get(key, [])),
                             key=lambda c: c[1]) for key in ("labels", "conts", "cats")}
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: malformed HugeCTR metadata ({e!r}); it needs file_stats "
                        f"[{{file_name, num_rows}}] and labels/conts/cats [{{col_name, index}}]") from e
    rows, named = {}, {}
    for name, n in stats:
        base = _basename(name)
        if base in named:
            raise DataError(f"{path}: file_stats lists {named[base]!r} and {name!r}, which HugeCTR "
                            f"matches by basename alone; keep one entry per file name")
        rows[base], named[base] = n, name
    for key, cols in roles.items():
        for (a, i), (b, j) in zip(cols, cols[1:]):
            if i == j:
                raise DataError(f"{path}: {key} columns {a!r} and {b!r} share index {i}; give each "
                                f"its own column position")
    return Metadata(path, rows, roles["labels"], roles["conts"], roles["cats"])


def _basename(name: str) -> str:
    return name.replace("\\", "/").rsplit("/", 1)[-1]


def find_split(dataset: str | Path, split: str) -> Split | None:
    """The split as HugeCTR lays it out, or None when `dataset/split` is not such a split."""
    target = Path(dataset) / split
    if target.is_file():
        where, files = target, read_file_list(target)
    elif (target / FILE_LIST).is_file():
        where, files = target / FILE_LIST, read_file_list(target / FILE_LIST)
    elif (target / METADATA).is_file():
        where, files = target, sorted(target.glob("*.parquet"))
    else:
        return None
    if not files:
        raise DataError(f"{where}: no Parquet files for split {split!r}")
    folders = {f.parent for f in files} | ({target} if target.is_dir() else set())
    metadata = {d: read_metadata(d / METADATA) for d in folders if (d / METADATA).is_file()}
    return Split(where, files, metadata)


def check_row_counts(split: Split) -> None:
    """Each file's rows against its folder's `file_stats`; unreadable files are left to the
    reader's footer checks, which name them."""
    for path in split.files:
        meta = split.metadata.get(path.parent)
        if meta is None:
            continue
        expected = meta.file_rows.get(path.name)
        if expected is None:
            listed = ", ".join(list(meta.file_rows)[:5]) + (", ..." if len(meta.file_rows) > 5 else "")
            raise DataError(f"{path}: not in the file_stats of {meta.path} (which lists {listed}); "
                            f"regenerate the metadata or drop the file from {split.where}")
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowInvalid, OSError):
            continue
        if rows != expected:
            raise DataError(f"{path}: {rows} rows but {meta.path} file_stats says {expected}; the "
                            f"file changed after the metadata was written: regenerate the metadata")


def slot_offsets(sizes: list[int]) -> list[int]:
    """Offset of slot i's keys: the sum of the sizes of the slots before it."""
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist() if sizes else []


def derive_schema(dataset: str | Path, splits: list[str], slot_size_array: list[int],
                  keys_have_offsets: bool) -> tuple[Schema, str]:
    """Column roles of a HugeCTR dataset without schema.json, from its first split's metadata.

    Names are those of the Parquet columns at each metadata index (the reader selects by
    name); cardinalities come from `slot_size_array` or a scan of every split in `splits`.
    """
    found = [(s, find_split(dataset, s)) for s in splits]
    if not found or found[0][1] is None:
        first = Path(dataset) / (splits[0] if splits else "")
        raise DataError(f"{dataset}: no schema.json, and {first} is neither a HugeCTR file list nor a "
                        f"folder with {FILE_LIST} or {METADATA}; prepare the data set (`mmoe data ...`) "
                        f"or point data.path at HugeCTR's data folder")
    split = found[0][1]
    first = split.files[0]
    meta = split.metadata.get(first.parent)
    if meta is None:
        raise DataError(f"{first.parent}: no {METADATA} next to the Parquet files of {split.where}, "
                        f"and no schema.json in {dataset}: one of them must give the column roles")
    try:
        arrow = pq.read_schema(first)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{first}: not a readable Parquet file ({e})") from e
    renamed: list[str] = []

    def names(entries: list[tuple[str, int]]) -> list[str]:
        out = []
        for name, index in entries:
            if not 0 <= index < len(arrow.names):
                raise DataError(f"{meta.path}: column {name!r} has index {index}, but {first} has "
                                f"{len(arrow.names)} columns")
            if arrow.names[index] != name:
                renamed.append(f"{name}->{arrow.names[index]}")
            out.append(arrow.names[index])
        return out

    labels, dense, cats = names(meta.labels), names(meta.dense), names(meta.cats)
    if renamed:
        log.warning("%s: metadata names differ from the Parquet columns at their index (%s); the "
                    "reader uses the Parquet names: use them in the config", meta.path,
                    ", ".join(renamed[:6]) + (", ..." if len(renamed) > 6 else ""))
    if keys_have_offsets and not slot_size_array:
        raise DataError("data.keys_have_offsets needs data.slot_size_array: a slot's offset is the sum "
                        "of the sizes of the slots before it")
    if slot_size_array:
        if len(slot_size_array) != len(cats):
            raise DataError(f"data.slot_size_array has {len(slot_size_array)} sizes but {meta.path} "
                            f"lists {len(cats)} categorical columns (cats); give one size per column, "
                            f"in ascending cats index order")
        if min(slot_size_array) < 1:
            raise DataError(f"data.slot_size_array {slot_size_array}: every size must be at least 1")
        sizes = list(slot_size_array)
    else:
        sizes = _scan_cardinalities([s for _, s in found if s is not None], cats)
        log.warning("%s: no schema.json and no data.slot_size_array: cardinalities are max id + 1 "
                    "from a scan of splits %s: %s", dataset, ", ".join(s for s, v in found if v),
                    sizes)
    if keys_have_offsets:
        for name in cats:
            tp = arrow.field(name).type
            if not pa.types.is_integer(tp.value_type if is_list(tp) else tp):
                raise DataError(f"{first}: column {name!r} is {tp}; data.keys_have_offsets needs "
                                f"integer keys")
    multi_hot = [c for c in cats if is_list(arrow.field(c).type)]
    schema = Schema(labels=labels, dense=dense, categorical=dict(zip(cats, sizes)),
                    multi_hot=multi_hot, meta={"source": f"HugeCTR split {split.where}"},
                    offsets=dict(zip(cats, slot_offsets(sizes))) if keys_have_offsets else {},
                    sizes_from="data.slot_size_array")
    return schema, str(meta.path)


def _scan_cardinalities(splits: list[Split], cats: list[str]) -> list[int]:
    """max id + 1 per column over every file: footer statistics, or the values where a
    writer stored none."""
    top = dict.fromkeys(cats, -1)
    for split in splits:
        for path in split.files:
            meta = pq.ParquetFile(path).metadata
            leaves = {meta.schema.column(j).path.split(".")[0]: j for j in range(meta.num_columns)}
            unbounded = []
            for name in cats:
                stats = [meta.row_group(i).column(leaves[name]).statistics
                         for i in range(meta.num_row_groups)] if name in leaves else []
                if stats and all(s is not None and s.has_min_max and isinstance(s.max, int)
                                 for s in stats):
                    top[name] = max(top[name], *(s.max for s in stats))
                elif name in leaves:
                    unbounded.append(name)
            if unbounded:
                table = pq.read_table(path, columns=unbounded)
                for name in unbounded:
                    col = table.column(name)
                    if is_list(col.type):
                        col = pc.list_flatten(col)
                    high = pc.max(col).as_py()
                    if isinstance(high, int):
                        top[name] = max(top[name], high)
    return [max(top[c] + 1, 1) for c in cats]


def subtract_offsets(table: pa.Table, columns: Columns) -> pa.Table:
    """Keys carrying slot offsets -> table ids, before the checks: a key outside its slot
    then shows as an id outside [0, cardinality)."""
    for name, offset in zip(columns.categorical, columns.offsets):
        if not offset:
            continue
        col = table.column(name).combine_chunks()
        if is_list(col.type):
            ids = pc.subtract(col.values.cast(pa.int64()), offset)
            col = type(col).from_arrays(col.offsets, ids, mask=col.is_null() if col.null_count else None)
        else:
            col = pc.subtract(col.cast(pa.int64()), offset)
        table = table.set_column(table.schema.get_field_index(name), name, col)
    return table
