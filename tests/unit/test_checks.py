"""The bad-input matrix: each case gives a one-line DataError naming the file (and row group
and column where they apply) before or while reading, or with on_bad_rows = "skip" a counted
skip. Data sets are a few rows written with pyarrow into tmp_path."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.data.checks import bad_rows, check_statistics, statistics_problems
from app.data.errors import DataError
from app.data.loader import iter_batches
from app.data.reader import ParquetBatches
from app.data.schema import Columns, Schema

SCHEMA = Schema(labels=["y"], dense=["x"], categorical={"c": 10})


def rows(n=8, **columns) -> pa.Table:
    """Good rows: y 0/1, x finite, c in [0, 10); keyword arguments replace or add columns."""
    cols = {"y": pa.array(np.arange(n) % 2, pa.float32()), "x": pa.array(np.linspace(0, 1, n), pa.float32()),
            "c": pa.array(np.arange(n) % 10, pa.int64())}
    cols.update(columns)
    return pa.table({k: v for k, v in cols.items() if v is not None})


def dataset(root, *tables: pa.Table, schema: Schema = SCHEMA, row_group_size: int = 4):
    (root / "train").mkdir(parents=True)
    for i, table in enumerate(tables):
        pq.write_table(table, root / "train" / f"part-{i}.parquet", row_group_size=row_group_size)
    schema.save(root)
    return root


def read(root, on_bad_rows="error", world_size=1, workers=0, kinds=("binary",)) -> list:
    """Opens the split as training does and reads every batch of rank 0."""
    columns = Columns.resolve(Schema.load(root), ["y"], [], [], str(root / "schema.json"))
    ds = ParquetBatches(root, "train", columns, kinds, 4, 0, world_size, train=True,
                        on_bad_rows=on_bad_rows)
    return list(iter_batches(ds, num_workers=workers, pin_memory=False))


def fails(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(DataError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value), f"not one line: {info.value}"
    return str(info.value)


def with_value(column: str, value, row: int = 5, n: int = 8, tp=pa.float32()) -> dict:
    values = rows(n).column(column).to_pylist()
    values[row] = value
    return {column: pa.array(values, tp)}


# ---------------------------------------------------------------------------------------
# Files and their footers


def test_missing_column(tmp_path):
    dataset(tmp_path, rows(x=None))
    fails(r"part-0\.parquet: missing column 'x'", read, tmp_path)


def test_extra_columns_are_ignored(tmp_path):
    dataset(tmp_path, rows(junk=pa.array(["a"] * 8), more=pa.array([np.nan] * 8)))
    assert sum(len(b) for b in read(tmp_path)) == 8


def test_wrong_dtype(tmp_path):
    dataset(tmp_path, rows(c=pa.array([0.5] * 8, pa.float64())))
    fails(r"part-0\.parquet: column 'c' has type double, which is not usable as categorical", read, tmp_path)


@pytest.mark.parametrize("how", ["zero bytes", "zero rows"])
def test_empty_file(tmp_path, how):
    dataset(tmp_path, rows(), rows(0))
    if how == "zero bytes":
        (tmp_path / "train" / "part-1.parquet").write_bytes(b"")
        fails(r"part-1\.parquet: not a readable Parquet file", read, tmp_path)
    else:
        fails(r"part-1\.parquet: file has no rows", read, tmp_path)


@pytest.mark.parametrize("how", ["truncated", "text"])
def test_truncated_or_not_parquet(tmp_path, how):
    dataset(tmp_path, rows(), rows())
    path = tmp_path / "train" / "part-1.parquet"
    path.write_bytes(path.read_bytes()[:-100] if how == "truncated" else b"y,x,c\n1,0.5,3\n")
    fails(r"part-1\.parquet: not a readable Parquet file, truncated or of another format", read, tmp_path)


def test_damaged_row_group(tmp_path):
    dataset(tmp_path, rows(16))
    path = tmp_path / "train" / "part-0.parquet"
    chunk = pq.ParquetFile(path).metadata.row_group(2).column(1)  # footer intact, a page broken
    data = bytearray(path.read_bytes())
    data[chunk.data_page_offset:chunk.data_page_offset + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    fails(r"part-0\.parquet: row group 2 cannot be read", read, tmp_path)


def test_files_whose_schemas_disagree(tmp_path):
    dataset(tmp_path, rows(), rows(x=pa.array([0.5] * 8, pa.float64())))
    fails(r"part-1\.parquet: column 'x' is double but .*part-0\.parquet has float; files of a split "
          r"must share one schema", read, tmp_path)


def test_rank_that_would_get_zero_rows(tmp_path):
    dataset(tmp_path, rows(3))
    fails(r"train: 3 rows cannot give each of 4 ranks at least one row", read, tmp_path, world_size=4)


# ---------------------------------------------------------------------------------------
# Values (row group 1 of each file holds the bad row: 8 rows in row groups of 4)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_a_dense_column(tmp_path, value):
    dataset(tmp_path, rows(**with_value("x", value)))
    fails(r"part-0\.parquet: row group 1, column 'x': .*not finite|"
          r"part-0\.parquet: row group 1, column 'x': .*NaN", read, tmp_path)


@pytest.mark.parametrize("value", [-1, 10])
def test_id_outside_the_cardinality(tmp_path, value):
    dataset(tmp_path, rows(**with_value("c", value, tp=pa.int64())))
    fails(r"part-0\.parquet: row group 1, column 'c': .*(ids|id outside)", read, tmp_path)


def test_footers_name_bad_ids_before_the_first_batch(tmp_path):
    dataset(tmp_path, rows(), rows(**with_value("c", 10, tp=pa.int64())))
    columns = Columns.resolve(SCHEMA, ["y"], [], [], "test")
    fails(r"part-1\.parquet: row group 1, column 'c': ids span \[4, 10\]", ParquetBatches, tmp_path,
          "train", columns, ("binary",), 4, 0, 1, train=True)  # at construction: nothing decoded


@pytest.mark.parametrize("value", [2.0, 0.5, -1.0, np.nan])
def test_binary_label_not_0_or_1(tmp_path, value):
    dataset(tmp_path, rows(**with_value("y", value)))
    fails(r"part-0\.parquet: row group 1, column 'y'", read, tmp_path)


def test_null_values(tmp_path):
    dataset(tmp_path, rows(**with_value("c", None, tp=pa.int64())))
    fails(r"part-0\.parquet: row group 1, column 'c'", read, tmp_path)


def test_skip_counts_bad_rows_with_weight_zero(tmp_path):
    x = rows(8).column("x").to_pylist()
    x[1], x[6] = np.nan, np.inf
    c = (np.arange(8) % 10).tolist()
    c[6], c[7] = 99, -1  # row 6 is bad twice over
    y = rows(8).column("y").to_pylist()
    y[3] = 0.5
    dataset(tmp_path, rows(x=pa.array(x, pa.float32()), c=pa.array(c), y=pa.array(y, pa.float32())))
    batches = read(tmp_path, on_bad_rows="skip")
    weights = np.concatenate([b.weights.numpy() for b in batches])
    ids = np.concatenate([b.row_ids.numpy() for b in batches])
    assert sorted(ids[weights == 0].tolist()) == [1, 3, 6, 7]  # four rows skipped and counted
    assert len(weights) == 8
    for b in batches:  # skipped rows carry zeros, so nothing NaN reaches the model
        assert np.isfinite(b.dense.numpy()).all()
        assert (b.sparse_features["c"].values().numpy() < 10).all()


def test_worker_errors_stay_one_line(tmp_path):
    dataset(tmp_path, rows(**with_value("x", np.nan)))
    fails(r"^\S*part-0\.parquet: row group 1, column 'x'", read, tmp_path, workers=1)


# ---------------------------------------------------------------------------------------
# The schema file and the config against the data


def test_schema_lists_a_column_the_files_lack(tmp_path):
    dataset(tmp_path, rows(), schema=Schema(labels=["y"], dense=["x", "z"], categorical={"c": 10}))
    fails(r"part-0\.parquet: missing column 'z', which the schema or config lists", read, tmp_path)


def test_schema_cardinality_smaller_than_the_ids(tmp_path):
    dataset(tmp_path, rows(), schema=Schema(labels=["y"], dense=["x"], categorical={"c": 5}))
    fails(r"part-0\.parquet: row group 1, column 'c'", read, tmp_path)  # ids 4..7 in row group 1


@pytest.mark.parametrize("text, match", [
    ("{not json", "not JSON"),
    (json.dumps({"labels": "y", "dense": ["x"], "categorical": {}}), "'labels' must be a list"),
    (json.dumps({"labels": ["y"], "dense": ["x"]}), "'categorical' must map"),
    (json.dumps({"labels": ["y"], "dense": ["x"], "categorical": {"c": {"cardinality": "ten"}}}),
     "column 'c' needs a positive integer cardinality"),
    (json.dumps({"labels": ["y"], "dense": ["y"], "categorical": {}}), "column 'y' is listed twice"),
])
def test_malformed_schema_file(tmp_path, text, match):
    dataset(tmp_path, rows())
    (tmp_path / "schema.json").write_text(text)
    fails(rf"schema\.json: malformed schema.*{match}", Schema.load, tmp_path)


def test_config_names_an_unknown_column(tmp_path):
    dataset(tmp_path, rows())
    fails(r"schema\.json: the config names label column 'clicks', which the schema does not list",
          Columns.resolve, Schema.load(tmp_path), ["clicks"], [], [], str(tmp_path / "schema.json"))


# ---------------------------------------------------------------------------------------
# The checks themselves


def test_footer_statistics_name_bad_row_groups_without_decoding(tmp_path):
    dataset(tmp_path, rows(**with_value("c", 12, tp=pa.int64())), rows(**with_value("y", 3.0)))
    ids, labels = sorted((tmp_path / "train").glob("*.parquet"))
    columns = Columns.resolve(SCHEMA, ["y"], [], [], "test")
    fails(r"part-0\.parquet: row group 1, column 'c': ids span \[4, 12\] but schema\.json gives "
          r"cardinality 10 .*raise it there", check_statistics, ids, pq.ParquetFile(ids).metadata,
          columns, ("binary",))
    fails(r"part-1\.parquet: row group 1, column 'y': labels span \[0.0, 3.0\] but a binary task",
          check_statistics, labels, pq.ParquetFile(labels).metadata, columns, ("binary",))
    check_statistics(labels, pq.ParquetFile(labels).metadata, columns, ("regression",))


def test_statistics_problems_lists_every_bad_column_chunk(tmp_path):
    ids = with_value("c", 12, tp=pa.int64())["c"].to_pylist()
    ids[0] = -1
    dataset(tmp_path, rows(c=pa.array(ids, pa.int64()), **with_value("y", 3.0, row=6)))
    (path,) = (tmp_path / "train").glob("*.parquet")
    found = list(statistics_problems(pq.ParquetFile(path).metadata,
                                     Columns.resolve(SCHEMA, ["y"], [], [], "test"), ("binary",)))
    assert [(i, name) for i, name, _ in found] == [(0, "c"), (1, "y"), (1, "c")]


def test_bad_rows_multi_hot_and_strings():
    table = pa.table({
        "y": pa.array([1, 0, 1, 0], pa.float32()),
        "tags": pa.array([[1, 2], [], [3, 11], [None]], pa.list_(pa.int64())),
        "city": pa.array(["a", None, "b", "c"]),
    })
    schema = Schema(labels=["y"], dense=[], categorical={"tags": 10, "city": 100}, multi_hot=["tags"])
    masks = bad_rows(table, Columns.resolve(schema, ["y"], [], [], "test"), ("binary",))
    assert set(masks) == {"tags", "city"}  # only columns with bad rows
    assert masks["tags"].tolist() == [False, False, True, True]
    assert masks["city"].tolist() == [False, True, False, False]
