"""Criteo TSV files read in parallel pieces: plain files cut into byte ranges at line ends,
compressed files whole, each streamed through pyarrow's CSV reader; hexadecimal fields parsed
vectorized."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from app.data.errors import DataError, one_line

BLOCK_BYTES = 1 << 20  # CSV bytes parsed at once: larger blocks only cost memory (readahead)
COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")


@dataclass(frozen=True)
class Piece:
    """One unit of work: bytes [start, end) of a plain file, or a whole file (end None)."""

    path: str
    start: int = 0
    end: int | None = None

    @property
    def where(self) -> str:
        return self.path if self.end is None or self.start == 0 else f"{self.path} (from byte {self.start})"


def _line_start(f, pos: int) -> int:
    """The first line start at or after `pos` (a line starting exactly at `pos` stays there)."""
    if pos == 0:
        return 0
    f.seek(pos - 1)
    while True:
        block = f.read(1 << 16)
        if not block:
            return f.tell()
        nl = block.find(b"\n")
        if nl >= 0:
            return f.tell() - len(block) + nl + 1


def pieces(path: str | Path, range_bytes: int) -> list[Piece]:
    """Ranges of about `range_bytes`, each holding whole lines; compressed files stay whole."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such input file")
    if path.suffix in COMPRESSED:
        return [Piece(str(path))]
    size = path.stat().st_size
    with open(path, "rb") as f:
        cuts = sorted({_line_start(f, p) for p in range(0, size, max(range_bytes, 1))} | {size})
    return [Piece(str(path), a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


class _Range(io.RawIOBase):
    """Bytes [start, end) of a file as a readable stream."""

    def __init__(self, path: str, start: int, end: int):
        self._f = open(path, "rb")
        self._f.seek(start)
        self._left = end - start

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self._f.readinto(memoryview(buf)[:min(len(buf), self._left)])
        self._left -= n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def read_batches(piece: Piece, names: list[str], types: dict[str, pa.DataType],
             include: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches of one piece; a malformed line raises a DataError naming the file."""
    source = (pa.input_stream(piece.path, compression="detect") if piece.end is None
              else _Range(piece.path, piece.start, piece.end))
    read = pacsv.ReadOptions(column_names=names, block_size=BLOCK_BYTES, use_threads=False)
    parse = pacsv.ParseOptions(delimiter="\t", quote_char=False, double_quote=False,
                               escape_char=False, newlines_in_values=False)
    convert = pacsv.ConvertOptions(column_types=types, null_values=[""], strings_can_be_null=True,
                                   include_columns=include)
    try:
        with source:
            try:
                reader = pacsv.open_csv(source, read_options=read, parse_options=parse,
                                        convert_options=convert)
            except pa.ArrowInvalid as e:
                if "Empty CSV file" in str(e):
                    return
                raise
            yield from reader
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{piece.where}: cannot parse as Criteo TSV ({one_line(e)[:300]}); "
                        f"expected {len(names)} tab-separated fields a line: labels, "
                        f"integer dense, hexadecimal categorical") from e


_HEX = np.full(256, 255, np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def parse_hex(arr: pa.Array, at: Callable[[int], str]) -> tuple[np.ndarray, np.ndarray]:
    """Hex strings -> (uint64 values, mask of present values); null or "" is missing.
    Vectorized over the string buffer; `at(row)` names a row for an error message."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, np.int32, count=n + 1, offset=4 * arr.offset)
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    if arr.null_count:
        lengths = np.where(arr.is_valid().to_numpy(zero_copy_only=False), lengths, 0)
    present = lengths > 0
    m, width, total = int(np.count_nonzero(present)), int(lengths.max(initial=0)), int(lengths.sum())
    if width > 16:
        row = int(np.flatnonzero(lengths > 16)[0])
        raise DataError(f"{at(row)}: value {arr[row].as_py()!r} has more than 16 hex digits")
    if m and total == m * width and int(offsets[-1] - offsets[0]) == total:
        # one width (Criteo: 8 digits) and the values back to back: a [m, width] view of the
        # bytes, no gather. ASCII arithmetic instead of a table lookup (a lookup is 10x slower):
        # '0'-'9' -> 0-9, 'a'-'f' and 'A'-'F' -> 10-15; right-aligned nibbles are then packed
        # into big-endian bytes and read as one number.
        chars = data[offsets[0]:offsets[0] + total].reshape(m, width)
        lower = chars | np.uint8(32)
        ok = ((lower - np.uint8(48)) < 10) | ((lower - np.uint8(97)) < 6)
        bad = None if ok.all() else ~ok.all(axis=1)
        digits = (chars & np.uint8(15)) + np.uint8(9) * (chars >> np.uint8(6))
        size = 8 if width <= 8 else 16
        if width < size:
            digits = np.concatenate([np.zeros((m, size - width), np.uint8), digits], axis=1)
        packed = (digits[:, 0::2] << np.uint8(4)) | digits[:, 1::2]
        values = packed.view(">u4" if size == 8 else ">u8")[:, 0].astype(np.uint64)
    else:  # mixed widths: one gather per digit position
        starts, lengths = offsets[:-1][present], lengths[present]
        values, bad = np.zeros(m, np.uint64), np.zeros(m, bool)
        for j in range(width):
            act = lengths > j
            digit = _HEX[data[starts[act] + j]]
            bad[act] |= digit == 255
            values[act] = (values[act] << np.uint64(4)) | digit.astype(np.uint64)
        bad = bad if bad.any() else None
    if bad is not None:
        row = int(np.flatnonzero(present)[np.flatnonzero(bad)[0]])
        raise DataError(f"{at(row)}: value {arr[row].as_py()!r} is not hexadecimal")
    out = np.zeros(n, np.uint64)
    out[present] = values
    return out, present
