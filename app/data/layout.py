"""Where a data set's schema and each split's files come from: our layout (`schema.json` and
one folder of Parquet files per split), or HugeCTR's (file lists and `_metadata.json`)."""
from __future__ import annotations

from pathlib import Path

from app.data import hugectr
from app.data.errors import DataError
from app.data.schema import SCHEMA_FILE, Schema


def load_schema(dataset: str | Path, splits: list[str] | tuple[str, ...] = (),
                slot_size_array: list[int] | tuple[int, ...] = (),
                keys_have_offsets: bool = False) -> tuple[Schema, str]:
    """(schema, where it came from): `schema.json` when the dataset has one, otherwise the
    `_metadata.json` of HugeCTR's split folders (`splits`, train first; `app.data.hugectr`)."""
    path = Path(dataset) / SCHEMA_FILE
    if path.exists() or not splits:
        if slot_size_array or keys_have_offsets:
            raise DataError(f"{path}: data.slot_size_array and data.keys_have_offsets are for HugeCTR "
                            f"data sets without schema.json; this one gives the cardinalities: "
                            f"remove those keys")
        return Schema.load(dataset), str(path)
    return hugectr.derive_schema(dataset, list(splits), list(slot_size_array), keys_have_offsets)


def split_files(dataset: str | Path, split: str) -> list[Path]:
    """A split's Parquet files: HugeCTR's file list order (rows checked against its
    `_metadata.json`), or the split folder's files sorted by name."""
    layout = hugectr.find_split(dataset, split)
    if layout is not None:
        hugectr.check_row_counts(layout)
        return layout.files
    folder = Path(dataset) / split
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        raise DataError(f"{folder}: no .parquet files for split {split!r}")
    return files
