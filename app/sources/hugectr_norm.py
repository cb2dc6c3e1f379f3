"""HugeCTR Norm binary files -> our Parquet and schema.json: `mmoe data hugectr-norm`.

Norm (removed from HugeCTR in v23.12): a file is a header of eight int64 (error_check,
number_of_records, label_dim, dense_dim, slot_num, three reserved), then per record
label_dim + dense_dim float32, and per slot an int32 nnz followed by nnz keys (uint32, or
int64 with 64-bit keys). With checksums (error_check 1) the header and every record are
framed as int32 payload length, payload, one byte holding the payload's byte sum mod 256.
The file list is HugeCTR's (`app.data.hugectr.read_file_list`); HugeCTR's Parquet splits
need no conversion (the reader takes them in place, `app.data.hugectr`).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc  # noqa: F401  (pa.ipc)

from app.data.errors import DataError
from app.data.hugectr import read_file_list, slot_offsets
from app.data.schema import SCHEMA_FILE, Schema
from app.sources.row_groups import RowGroupWriter

log = logging.getLogger("app")

HEADER_FIELDS = ("error_check", "number_of_records", "label_dim", "dense_dim", "slot_num")
HEADER = struct.Struct("<8q")
INT32 = struct.Struct("<i")
CHUNK_BYTES = 8 << 20  # Norm bytes parsed at once
MAX_RECORD_BYTES = 256 << 20  # a record longer than this is taken as a misread length
LARGE_CARDINALITY = 50_000_000  # beyond this a scanned max id + 1 gets a warning


@dataclass(frozen=True)
class NormLayout:
    label_dim: int
    dense_dim: int
    slot_num: int
    i64_keys: bool
    checksum: bool | None  # None: as each file's header says

    @property
    def key_dtype(self) -> np.dtype:
        return np.dtype("<i8") if self.i64_keys else np.dtype("<u4")

    @property
    def floats(self) -> int:
        return self.label_dim + self.dense_dim


@dataclass
class Records:
    """Decoded records of one chunk: floats [n, label_dim + dense_dim]; per slot (nnz, keys)."""

    first: int  # index of the first record in its file
    floats: np.ndarray
    slots: list[tuple[np.ndarray, np.ndarray]]


def read_header(path: Path, f, layout: NormLayout) -> tuple[bool, int]:
    """Checks a file's header against the layout; returns (checksummed, number of records)."""
    head = f.read(HEADER.size + 5)
    if len(head) < HEADER.size:
        raise DataError(f"{path}: {len(head)} bytes, shorter than the 64-byte Norm header")
    # a checksummed header is framed: int32 length 64, the header, its check byte
    framed = INT32.unpack_from(head)[0] == HEADER.size and len(head) == HEADER.size + 5 \
        and HEADER.unpack_from(head, 4)[0] == 1
    values = HEADER.unpack_from(head, 4 if framed else 0)
    fields = dict(zip(HEADER_FIELDS, values))
    if not framed and fields["error_check"] != 0:
        raise DataError(f"{path}: not a Norm file: header error_check is {fields['error_check']} "
                        f"(0 without checksums, 1 with)")
    if layout.checksum is not None and layout.checksum != framed:
        given, fix = ("--checksum", "--no-checksum") if layout.checksum else ("--no-checksum", "--checksum")
        raise DataError(f"{path}: header error_check is {int(framed)} ({'with' if framed else 'no'} "
                        f"checksums) but {given} was given; pass {fix}")
    if framed and sum(head[4:4 + HEADER.size]) % 256 != head[4 + HEADER.size]:
        raise DataError(f"{path}: header checksum does not match; the file is corrupt")
    for name, flag in (("label_dim", layout.label_dim), ("dense_dim", layout.dense_dim),
                       ("slot_num", layout.slot_num)):
        if fields[name] != flag:
            raise DataError(f"{path}: header says {name} {fields[name]} but "
                            f"--{name.replace('_', '-')} is {flag}; pass --{name.replace('_', '-')} "
                            f"{fields[name]} if the header is right")
    if fields["number_of_records"] < 0:
        raise DataError(f"{path}: header says {fields['number_of_records']} records")
    f.seek(HEADER.size + 5 if framed else HEADER.size)
    return framed, fields["number_of_records"]


def _fields(u8: np.ndarray, pos: np.ndarray, dtype: str | np.dtype) -> np.ndarray:
    """Values of `dtype` at byte positions `pos`, read through one view of the buffer per
    byte alignment (int64 keys follow 4-byte fields, so they need not be 8-aligned)."""
    dtype = np.dtype(dtype)
    size = dtype.itemsize
    rem = pos % size
    if not rem.any():  # all aligned: one gather
        return u8[:len(u8) // size * size].view(dtype)[pos // size]
    out = np.empty(len(pos), dtype)
    for a in np.flatnonzero(np.bincount(rem, minlength=size)):
        sel = rem == a
        out[sel] = u8[a:a + (len(u8) - a) // size * size].view(dtype)[(pos[sel] - a) // size]
    return out


def _framed_bounds(buf: bytes, limit: int) -> tuple[list[int], list[int], int]:
    """Payload starts and lengths of the complete checksummed records at the start of `buf`
    (at most `limit`), and the bytes they take."""
    starts, lengths, pos, end = [], [], 0, len(buf)
    unpack = INT32.unpack_from
    while len(starts) < limit and pos + 4 <= end:
        (n,) = unpack(buf, pos)
        if not 0 < n <= MAX_RECORD_BYTES:
            starts.append(pos + 4)  # reported by the caller as a bad length
            lengths.append(n)
            return starts, lengths, pos
        if pos + 5 + n > end:
            break
        starts.append(pos + 4)
        lengths.append(n)
        pos += 5 + n
    return starts, lengths, pos


def _plain_bounds(buf: bytes, layout: NormLayout, limit: int) -> tuple[list[int], int]:
    """Starts of the complete records at the start of `buf` (no checksums, so no lengths:
    walk the nnz fields), and the bytes they take. After each walked record, the records
    that follow with the same nnz in every slot are found vectorized, in growing windows."""
    u8 = np.frombuffer(buf, np.uint8)
    ks, head = layout.key_dtype.itemsize, 4 * layout.floats
    starts: list[int] = []
    pos, end, wait, backoff = 0, len(buf), 0, 1
    while len(starts) < limit:
        p, nnz = pos + head, []
        for _ in range(layout.slot_num):
            if p + 4 > end:
                return starts, pos
            (n,) = INT32.unpack_from(buf, p)
            if not 0 <= n <= MAX_RECORD_BYTES // ks:
                raise _BadRecord(len(starts), f"slot {len(nnz)} has nnz {n}")
            nnz.append(n)
            p += 4 + n * ks
        if p > end:
            return starts, pos
        starts.append(pos)
        size, pos = p - pos, p
        if wait:  # the last tries found no run: walk a while before trying again
            wait -= 1
            continue
        fields = head + np.concatenate([[0], np.cumsum(4 + np.array(nnz[:-1], np.int64) * ks)]) \
            if nnz else np.zeros(0, np.int64)
        fit, run, window = min((end - pos) // size, limit - len(starts)), 0, 16
        while run < fit:
            at = pos + size * np.arange(run, min(run + window, fit))
            same = np.ones(len(at), bool)
            for off, n in zip(fields, nnz):
                same &= _fields(u8, at + off, "<i4") == n
            run += int(np.argmin(same)) if not same.all() else len(at)
            if not same.all():
                break
            window *= 4
        starts.extend(range(pos, pos + run * size, size))
        pos += run * size
        wait, backoff = (0, 1) if run else (backoff, min(2 * backoff, 256))
    return starts, pos


class _BadRecord(Exception):
    def __init__(self, index: int, what: str):
        super().__init__(what)
        self.index, self.what = index, what


def _decode(u8: np.ndarray, starts: np.ndarray, ends: np.ndarray | None, layout: NormLayout
            ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Fields of the records at `starts`, slot by slot across all records at once. `ends`
    (checksummed files): where each payload must end; the first record that breaks it raises."""
    n = len(starts)
    at = (starts[:, None] + 4 * np.arange(layout.floats)).ravel()
    floats = _fields(u8, at, "<f4").reshape(n, layout.floats)
    ks, dtype = layout.key_dtype.itemsize, layout.key_dtype
    pos, slots = starts + 4 * layout.floats, []
    broken: dict[int, str] = {}  # record -> what broke first; its later fields are not read
    ok = np.ones(n, bool)

    def drop(mask: np.ndarray, what) -> None:
        for i in np.flatnonzero(mask & ok)[:1]:
            broken.setdefault(int(i), what(int(i)))
        ok[mask] = False

    for k in range(layout.slot_num):
        if ends is not None:
            drop(pos + 4 > ends, lambda i: f"slot {k}'s nnz lies past the record's end")
        nnz = np.where(ok, _fields(u8, np.where(ok, pos, 0), "<i4"), 0).astype(np.int64)
        drop(nnz < 0, lambda i: f"slot {k} has nnz {nnz[i]}")
        if ends is not None:
            drop(pos + 4 + nnz * ks > ends, lambda i: f"slot {k}'s {nnz[i]} keys run past the record's end")
        nnz[~ok] = 0
        total = int(nnz.sum())
        rec = np.repeat(np.arange(n), nnz)
        within = np.arange(total) - np.repeat(np.cumsum(nnz) - nnz, nnz)
        keys = _fields(u8, pos[rec] + 4 + within * ks, dtype)
        slots.append((nnz, keys.astype(np.int64)))
        pos = pos + 4 + nnz * ks
    if ends is not None:
        drop(pos != ends, lambda i: f"fields take {pos[i] - starts[i]} bytes of a "
                                    f"{ends[i] - starts[i]}-byte payload")
    if broken:
        first = min(broken)
        raise _BadRecord(first, broken[first])
    return floats, slots


def read_norm(path: Path, layout: NormLayout, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Records]:
    """Streams the records of one Norm file, `chunk_bytes` at a time, checking framing,
    checksums and the header's record count."""
    with open(path, "rb") as f:
        framed, total = read_header(path, f, layout)
        hint = " (is --i64-keys right?)" if framed else \
            " (no checksums: a wrong --label-dim/--dense-dim/--slot-num or --i64-keys misreads " \
            "everything after it)"
        buf, done, eof = b"", 0, False
        while not eof:
            more = f.read(max(chunk_bytes, len(buf)))  # doubles the buffer for a long record
            eof = not more
            buf += more
            try:
                if framed:
                    s, n, used = _framed_bounds(buf, total - done)
                    if s and not 0 < n[-1] <= MAX_RECORD_BYTES:
                        raise _BadRecord(len(s) - 1, f"record length {n[-1]}")
                    starts, lengths = np.array(s, np.int64), np.array(n, np.int64)
                else:
                    s, used = _plain_bounds(buf, layout, total - done)
                    starts, ends = np.array(s, np.int64), None
                if not len(starts):
                    if eof and buf:
                        break
                    continue
                u8 = np.frombuffer(buf, np.uint8)
                if framed:
                    # payloads back to back, without their framing: every field is aligned
                    check = u8[starts + lengths]
                    keep = np.ones(used, bool)
                    keep[(starts[:, None] - 4 + np.arange(4)).ravel()] = False
                    keep[starts + lengths] = False
                    u8 = u8[:used][keep]
                    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
                    ends = starts + lengths
                    sums = np.add.reduceat(u8, starts, dtype=np.uint64) % 256
                    if (bad := np.flatnonzero(sums != check)).size:
                        i = int(bad[0])
                        raise DataError(f"{path}: record {done + i}: checksum byte {check[i]} but "
                                        f"the payload sums to {int(sums[i])} (mod 256); the file is "
                                        f"corrupt from there")
                floats, slots = _decode(u8, starts, ends, layout)
            except _BadRecord as e:
                raise DataError(f"{path}: record {done + e.index}: {e.what}; the file does not match "
                                f"the layout{hint}") from None
            yield Records(done, floats, slots)
            done += len(starts)
            buf = buf[used:]
            if done == total:
                break
        left = len(buf) + len(f.read(1))
        if done < total:
            raise DataError(f"{path}: header says {total} records but the file ends after {done} "
                            f"({left} bytes of a partial record left){hint}")
        if left:
            raise DataError(f"{path}: {left}+ bytes after the {total} records the header announces"
                            f"{hint}")


@dataclass
class SlotStats:
    single_hot: bool = True  # every row has exactly one key
    max_id: int = -1


def _slot_ids(keys: np.ndarray, nnz: np.ndarray, k: int, sizes: list[int], offsets: list[int],
              path: Path, first: int) -> np.ndarray:
    ids = keys - offsets[k] if offsets else keys
    bad = (ids < 0) | (ids >= sizes[k]) if sizes else ids < 0
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        row = first + int(np.searchsorted(np.cumsum(nnz), j, side="right"))
        rng = f"[{offsets[k] if offsets else 0}, {(offsets[k] if offsets else 0) + sizes[k]})" \
            if sizes else "[0, 2^63)"
        raise DataError(f"{path}: record {row}, slot {k}: key {int(keys[j])} is outside {rng}; "
                        f"check --slot-size-array and --keys-have-offsets")
    return ids


def _stage(path: Path, stage: Path, layout: NormLayout, floats: list[str], cats: list[str],
           sizes: list[int], offsets: list[int], stats: list[SlotStats], chunk_bytes: int) -> int:
    """One Norm file -> Arrow IPC at `stage`, unencoded (whether a slot is single-hot is known
    only once every file is read); returns its rows, 0 without writing a file."""
    writer, rows = None, 0
    try:
        for rec in read_norm(path, layout, chunk_bytes):
            cols = {name: pa.array(np.ascontiguousarray(rec.floats[:, j])) for j, name in enumerate(floats)}
            for k, (nnz, keys) in enumerate(rec.slots):
                ids = _slot_ids(keys, nnz, k, sizes, offsets, path, rec.first)
                stats[k].single_hot &= bool((nnz == 1).all())
                if len(ids):
                    stats[k].max_id = max(stats[k].max_id, int(ids.max()))
                bounds = np.concatenate([[0], np.cumsum(nnz)]).astype(np.int32)
                cols[cats[k]] = pa.ListArray.from_arrays(pa.array(bounds), pa.array(ids))
            batch = pa.RecordBatch.from_pydict(cols)
            writer = writer or pa.ipc.new_file(stage, batch.schema)
            writer.write_batch(batch)
            rows += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    return rows


def convert_norm(file_list: str | Path, out: str | Path, split: str, layout: NormLayout, *,
                 slot_sizes: list[int] | None = None, keys_have_offsets: bool = False,
                 label_names: list[str] | None = None, row_group_size: int = 65_536,
                 force: bool = False, chunk_bytes: int = CHUNK_BYTES) -> Schema:
    """Norm files of one split -> `out/split/part-<i>.parquet` (one per input file) and
    `out/schema.json` (merged with the one another split wrote)."""
    out, sizes = Path(out), list(slot_sizes or [])
    labels = list(label_names or [f"label{i}" for i in range(layout.label_dim)])
    dense = [f"d{i}" for i in range(layout.dense_dim)]
    cats = [f"c{i}" for i in range(layout.slot_num)]
    if len(labels) != layout.label_dim or len(set(labels)) != len(labels) or set(labels) & {*dense, *cats}:
        raise DataError(f"--label-names {labels}: give {layout.label_dim} distinct names, none of "
                        f"d0.., c0..")
    if sizes and (len(sizes) != layout.slot_num or min(sizes) < 1):
        raise DataError(f"--slot-size-array {sizes}: give {layout.slot_num} sizes of at least 1")
    if keys_have_offsets and not sizes:
        raise DataError("--keys-have-offsets needs --slot-size-array: a slot's offset is the sum of "
                        "the sizes of the slots before it")
    offsets = slot_offsets(sizes) if keys_have_offsets else []
    files = read_file_list(Path(file_list))
    folder = out / split
    if folder.exists() and any(folder.iterdir()):
        if not force:
            raise DataError(f"{folder} is not empty; pass --force to replace split {split!r}")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stats = [SlotStats() for _ in cats]
    staged, rows, start = [], 0, time.perf_counter()
    try:
        for i, path in enumerate(files):
            stage = folder / f"part-{i}.arrow"
            n = _stage(path, stage, layout, [*labels, *dense], cats, sizes, offsets, stats, chunk_bytes)
            if n:  # a file of no records writes none
                staged.append(stage)
                rows += n
        single = [c for c, s in zip(cats, stats) if s.single_hot]
        for stage in staged:
            _write_parquet(stage, stage.with_suffix(".parquet"), single, row_group_size)
            stage.unlink()
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # it was empty: the next run needs no --force
        raise
    seconds = time.perf_counter() - start
    cardinality = sizes or [s.max_id + 1 for s in stats]
    for name, card in zip(cats, cardinality):
        if not sizes and card > LARGE_CARDINALITY:
            log.warning("%s: max id + 1 is %s, a large table; if the keys carry slot offsets, pass "
                        "--slot-size-array and --keys-have-offsets", name, f"{card:,}")
    schema = Schema(labels=labels, dense=dense, categorical=dict(zip(cats, [max(c, 1) for c in cardinality])),
                    multi_hot=[c for c in cats if c not in single],
                    meta={"source": f"HugeCTR Norm files of {file_list}", "rows": {split: rows}})
    if (out / SCHEMA_FILE).exists():
        schema = _merge(Schema.load(out), schema, out, split)
    schema.save(out)
    print(f"hugectr-norm {split}: {rows:,} rows from {len(files)} files in {seconds:.1f}s "
          f"({rows / max(seconds, 1e-9):,.0f} rows/s) -> {folder}")
    return schema


def _write_parquet(stage: Path, target: Path, single_hot: list[str], row_group_size: int) -> None:
    """Staged Arrow IPC -> Parquet row groups of `row_group_size`, single-hot list columns
    (one id per row) as plain int64 columns."""
    with pa.memory_map(str(stage)) as source, RowGroupWriter(target, row_group_size) as writer:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            table = pa.Table.from_batches([reader.get_batch(i)])
            for name in single_hot:
                table = table.set_column(table.schema.get_field_index(name), name,
                                         pc.list_flatten(table.column(name)))
            writer.write(table)


def _merge(old: Schema, new: Schema, out: Path, split: str) -> Schema:
    """One schema for splits converted one at a time: the larger cardinality of each column."""
    if (old.labels, old.dense, list(old.categorical)) != (new.labels, new.dense, list(new.categorical)):
        raise DataError(f"{out}/schema.json has labels {old.labels}, dense {old.dense} and "
                        f"{len(old.categorical)} slots, but split {split!r} has {new.labels}, "
                        f"{new.dense} and {len(new.categorical)}; convert it into another --out")
    old.categorical = {c: max(n, new.categorical[c]) for c, n in old.categorical.items()}
    old.multi_hot = [c for c in old.categorical if c in old.multi_hot or c in new.multi_hot]
    old.meta.setdefault("rows", {})[split] = new.meta["rows"][split]
    return old


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.replace(" ", "").split(",") if v]


def add_data_command(sub) -> None:
    p = sub.add_parser("hugectr-norm", help="HugeCTR Norm binary files (a file list) -> Parquet",
                       description=convert_norm.__doc__)
    p.add_argument("--file-list", required=True, help="HugeCTR file list: the count, then one path a line")
    p.add_argument("--label-dim", type=int, required=True)
    p.add_argument("--dense-dim", type=int, required=True)
    p.add_argument("--slot-num", type=int, required=True)
    p.add_argument("--i64-keys", action="store_true", help="int64 keys (HugeCTR's i64_input_key)")
    p.add_argument("--slot-size-array", type=_ints, help="N0,N1,...: rows per slot's table; "
                   "default: max id + 1 of the converted split")
    p.add_argument("--keys-have-offsets", action="store_true",
                   help="keys carry cumulative slot offsets (needs --slot-size-array)")
    p.add_argument("--checksum", action=argparse.BooleanOptionalAction, default=None,
                   help="require (--checksum) or forbid (--no-checksum) checksummed files; "
                        "default: as each header says")
    p.add_argument("--label-names", type=lambda s: s.split(","), help="default: label0,label1,...")
    p.add_argument("--out", required=True)
    p.add_argument("--split", required=True, help="split folder to write, e.g. train or test")
    p.add_argument("--row-group-size", type=int, default=65_536)
    p.add_argument("--force", action="store_true", help="replace the split if present")

    def run(args) -> None:
        layout = NormLayout(args.label_dim, args.dense_dim, args.slot_num, args.i64_keys, args.checksum)
        convert_norm(args.file_list, args.out, args.split, layout, slot_sizes=args.slot_size_array,
                     keys_have_offsets=args.keys_have_offsets, label_names=args.label_names,
                     row_group_size=args.row_group_size, force=args.force)

    p.set_defaults(run=run)
