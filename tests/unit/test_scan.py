"""`mmoe data check`: every bad row group of a data set, one line each, through the command."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.cli import main
from app.data.schema import Schema

SCHEMA = Schema(labels=["y"], dense=["x"], categorical={"c": 10})


def good(n=12):
    return {"y": np.arange(n, dtype=np.float32) % 2, "x": np.linspace(0, 1, n, dtype=np.float32),
            "c": np.arange(n) % 10}


def write(root, split, *parts):
    """One file per part (column -> values), row groups of 4 rows."""
    (root / split).mkdir(parents=True)
    for i, cols in enumerate(parts):
        pq.write_table(pa.table(cols), root / split / f"part-{i}.parquet", row_group_size=4)
    SCHEMA.save(root)


def with_value(column, row, value):
    cols = good()
    cols[column] = cols[column].copy()
    cols[column][row] = value
    return cols


def check(capsys, *args):
    """The command's exit code and output lines."""
    with pytest.raises(SystemExit) as stop:
        main(["data", "check", *map(str, args)])
        raise SystemExit(0)
    return stop.value.code, capsys.readouterr().out.splitlines()


@pytest.fixture
def bad_set(tmp_path):
    """A NaN dense value, an id out of range and a label of 3, in three row groups of three
    files of the train split; test is clean."""
    write(tmp_path, "train", with_value("x", 5, np.nan), good(), with_value("c", 8, 12),
          with_value("y", 2, 3.0))
    write(tmp_path, "test", good())
    return tmp_path


@pytest.mark.parametrize("workers", [1, 2])
def test_every_bad_row_group_gives_one_line(bad_set, capsys, workers):
    code, lines = check(capsys, bad_set, "--workers", workers)
    train = bad_set / "train"
    assert code == 1
    assert lines[:-1] == [
        f"{train}/part-0.parquet: row group 1, column 'x': 1 rows with NaN, inf or null values, "
        f"first at row 1 (nan)",
        f"{train}/part-2.parquet: row group 2, column 'c': 1 rows with ids outside [0, 10) or null, "
        f"first at row 0 (12)",
        f"{train}/part-3.parquet: row group 0, column 'y': 1 rows with labels that are not 0/1 "
        f"(binary) or not finite, first at row 2 (3.0)",
    ]
    assert lines[-1].startswith("checked 5 files, 15 row groups, 60 rows in ")
    assert lines[-1].endswith("s: 3 problems; bad rows: x 1, c 1, y 1")


def test_a_clean_data_set_exits_0(bad_set, capsys):
    code, lines = check(capsys, bad_set, "--split", "test", "--workers", 2)
    assert (code, len(lines)) == (0, 1)
    assert lines[0].startswith("checked 1 files, 3 row groups, 12 rows in ")
    assert lines[0].endswith(": no problems")


def test_the_config_gives_columns_and_label_kinds(bad_set, tmp_path, capsys):
    config = tmp_path / "regression.toml"
    config.write_text('[tasks.y]\ntype = "regression"\n')
    code, lines = check(capsys, bad_set, "--config", config, "--workers", 1)
    assert code == 1 and [ln.split(": row group")[0].rsplit("/", 1)[1] for ln in lines[:-1]] == \
        ["part-0.parquet", "part-2.parquet"]  # a label of 3 is a regression target


def test_files_and_splits_that_cannot_be_read_are_lines_too(bad_set, capsys):
    (bad_set / "train" / "part-1.parquet").write_bytes(b"not parquet")
    code, lines = check(capsys, bad_set, "--split", "train", "--split", "val", "--workers", 2)
    assert code == 1 and len(lines) == 6
    assert lines[1].startswith(f"{bad_set}/train/part-1.parquet: not a readable Parquet file")
    assert lines[4] == f"{bad_set}/val: no .parquet files for split 'val'"
    assert lines[-1].startswith("checked 4 files, 9 row groups, 36 rows")


def test_hugectr_metadata_and_slot_size_array_from_the_config(tmp_path, capsys):
    """Without schema.json the sizes come from data.slot_size_array, in cats index order."""
    folder = tmp_path / "train"
    folder.mkdir()
    pq.write_table(pa.table(good()), folder / "0.parquet", row_group_size=4)
    meta = {"file_stats": [{"file_name": "./hugectr/train/0.parquet", "num_rows": 12}],
            "labels": [{"col_name": "y", "index": 0}], "conts": [{"col_name": "x", "index": 1}],
            "cats": [{"col_name": "c", "index": 2}]}
    (folder / "_metadata.json").write_text(json.dumps(meta))
    config = tmp_path / "hugectr.toml"
    config.write_text('[data]\neval_split = "train"\nslot_size_array = [8]\n[tasks.y]\n')
    code, lines = check(capsys, tmp_path, "--config", config, "--workers", 2)
    assert code == 1 and len(lines) == 2
    assert lines[0] == (f"{folder}/0.parquet: row group 2, column 'c': 2 rows with ids outside [0, 8) "
                        f"or null, first at row 0 (8)")


def test_footer_statistics_count_where_the_values_do_not_show_them(tmp_path, capsys):
    """Training refuses a file whose footer statistics are out of range before decoding it;
    the scan reports it too. Here the footer of a file with id 12 sits on the values of one
    with id 2 (no compression or dictionary: both files have the same layout)."""
    options = dict(row_group_size=4, compression="none", use_dictionary=False)
    pq.write_table(pa.table(with_value("c", 8, 12)), tmp_path / "a.parquet", **options)
    pq.write_table(pa.table(with_value("c", 8, 2)), tmp_path / "b.parquet", **options)
    (tmp_path / "train").mkdir()
    footer, values = (tmp_path / "a.parquet").read_bytes(), (tmp_path / "b.parquet").read_bytes()
    size = int.from_bytes(footer[-8:-4], "little") + 8
    assert len(footer) == len(values)
    (tmp_path / "train" / "part-0.parquet").write_bytes(values[:-size] + footer[-size:])
    SCHEMA.save(tmp_path)
    code, lines = check(capsys, tmp_path, "--split", "train", "--workers", 1)
    assert code == 1 and lines[:-1] == [
        f"{tmp_path}/train/part-0.parquet: row group 2, column 'c': ids span [0, 12] but schema.json "
        f"gives cardinality 10 (ids must lie in [0, 10); raise it there if the ids are right)"]
    assert lines[-1].endswith(": 1 problem; bad rows: none counted")


def test_each_bad_column_of_a_row_group_is_a_line(tmp_path, capsys):
    cols = with_value("x", 0, np.inf)
    cols["y"][1] = 0.5
    write(tmp_path, "train", cols)
    code, lines = check(capsys, tmp_path, "--split", "train", "--workers", 1)
    assert code == 1 and [ln.split(": ")[1] for ln in lines[:-1]] == [
        "row group 0, column 'y'", "row group 0, column 'x'"]  # labels, dense, categorical
    assert lines[-1].endswith(": 2 problems; bad rows: y 1, x 1")
