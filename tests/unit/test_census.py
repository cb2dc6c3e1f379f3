"""The census converter against the raw file: row counts, known rows, label rates."""
import numpy as np
import pyarrow.parquet as pq
import pytest

from app.data.schema import Schema


def test_rows_labels_and_rates(census):
    raw, out = census
    train = pq.read_table(out / "train")
    assert train.num_rows == 199_523 and pq.read_table(out / "test").num_rows == 99_762
    # known rows of the raw file: 0 is widowed and under 50k, 2 never married, leading spaces gone
    assert raw["train"].column("marital_stat")[0].as_py() == "Widowed"
    assert raw["train"].column("marital_stat")[2].as_py() == "Never married"
    assert train.column("never_married").to_pylist()[:3] == [0.0, 0.0, 1.0]
    assert train.column("income").to_pylist()[:3] == [0.0, 0.0, 0.0]
    income = np.array(raw["train"].column("income_raw").to_pylist()) == "50000+."
    assert np.array_equal(train.column("income").to_numpy() == 1, income)
    assert train.column("income").to_numpy().mean() == pytest.approx(0.0621, abs=5e-5)
    assert train.column("never_married").to_numpy().mean() == pytest.approx(0.4335, abs=5e-5)


def test_schema_and_features(census):
    _, out = census
    schema = Schema.load(out)
    assert schema.labels == ["income", "never_married"]
    assert "instance_weight" not in schema.dense + list(schema.categorical)
    assert "marital_stat" not in schema.categorical  # the label's source is not a feature
    train = pq.read_table(out / "train")
    for column, cardinality in schema.categorical.items():
        ids = train.column(column).to_numpy()
        assert ids.min() >= 1 and ids.max() < cardinality  # 0 is kept for "unseen in train"
    assert abs(train.column("age").to_numpy().mean()) < 1e-3  # standardized
