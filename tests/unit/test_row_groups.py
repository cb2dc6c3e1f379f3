import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.sources.row_groups import RowGroupWriter


def table(start, n):
    return pa.table({"x": pa.array(range(start, start + n), pa.int64())})


def test_row_groups_of_exactly_the_size_from_tables_of_any_length(tmp_path):
    path = tmp_path / "out.parquet"
    with RowGroupWriter(path, 4) as writer:
        start = 0
        for n in (3, 2, 9, 1, 0, 2):  # 17 rows: cuts fall inside tables and across them
            writer.write(table(start, n))
            start += n
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [4, 4, 4, 4, 1]
    assert pq.read_table(path).column("x").to_pylist() == list(range(17))


def test_no_rows_no_file_and_a_failure_writes_no_remainder(tmp_path):
    with RowGroupWriter(tmp_path / "empty.parquet", 4) as writer:
        writer.write(table(0, 0))
    assert not (tmp_path / "empty.parquet").exists()
    with pytest.raises(RuntimeError), RowGroupWriter(tmp_path / "cut.parquet", 4) as writer:
        writer.write(table(0, 6))
        raise RuntimeError
    assert pq.ParquetFile(tmp_path / "cut.parquet").metadata.num_rows == 4  # closed, readable
