import gzip
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from app.cli import main
from app.sources.criteo import Options, convert
from app.data.schema import Schema
from app.sources.synthetic import SyntheticSpec, _Truth, generate, generate_tsv

SMALL = dict(rows={"train": 3000, "test": 1000}, num_dense=3, cardinalities=[40, 300, 7])


def tables(root, split):
    return [pq.read_table(f) for f in sorted((root / split).glob("*.parquet"))]


def test_output_does_not_depend_on_the_worker_count(tmp_path):
    spec = SyntheticSpec(files_per_split=3, row_group_size=256, **SMALL)
    one = generate(tmp_path / "one", spec, workers=1)
    two = generate(tmp_path / "two", spec, workers=2)
    assert one.meta == two.meta
    for split in spec.rows:
        a, b = tables(tmp_path / "one", split), tables(tmp_path / "two", split)
        assert len(a) == 3 and all(x.equals(y) for x, y in zip(a, b))
    assert sum(t.num_rows for t in a) == 1000
    first = next((tmp_path / "one" / "train").glob("*.parquet"))
    assert pq.ParquetFile(first).metadata.row_group(0).num_rows == 256
    other = generate(tmp_path / "other",
                     SyntheticSpec(seed=1, files_per_split=3, row_group_size=256, **SMALL))
    assert not tables(tmp_path / "other", "train")[0].equals(tables(tmp_path / "one", "train")[0])


def test_schema_meta_and_column_types(tmp_path):
    schema = generate(tmp_path, SyntheticSpec(**SMALL))
    assert schema.labels == ["click", "convert"] and schema.dense == ["d0", "d1", "d2"]
    assert schema.categorical == {"c0": 40, "c1": 300, "c2": 7}
    table = pq.read_table(tmp_path / "train")
    for task in schema.labels:
        assert 0.6 < schema.meta["best_auc"]["test"][task] < 1.0
        rate = schema.meta["label_rate"]["train"][task]
        assert rate == pytest.approx(float(np.mean(table.column(task).to_numpy())))
    assert schema.meta["best_auc_rows"] == {"train": 3000, "test": 1000}
    assert [str(table.schema.field(c).type) for c in ("click", "d0", "c0")] == ["float", "float", "int64"]
    ids = table.column("c1").to_numpy()
    assert ids.min() >= 0 and ids.max() < 300
    assert np.mean(ids < 30) > 0.4  # power law: a tenth of the ids carries almost half the rows


def test_best_auc_on_a_sample_says_so(tmp_path):
    schema = generate(tmp_path, SyntheticSpec(auc_rows=500, files_per_split=2, **SMALL))
    assert schema.meta["best_auc_rows"] == {"train": 500, "test": 500}
    assert schema.meta["rows"] == {"train": 3000, "test": 1000}


def test_multi_hot_columns_have_the_mean_length(tmp_path):
    schema = generate(tmp_path, SyntheticSpec(multi_hot={1: 4.0}, **SMALL))
    assert schema.multi_hot == ["c1"]
    lists = pq.read_table(tmp_path / "train").column("c1").to_pylist()
    assert np.mean([len(x) for x in lists]) == pytest.approx(4.0, rel=0.05)
    assert min(len(x) for x in lists) >= 1


@pytest.mark.parametrize("rho", [0.0, 0.8])
def test_task_correlation_is_a_dial(rho):
    truth = _Truth(SyntheticSpec(correlation=rho, cardinalities=[5000] * 4))
    effects = np.concatenate(truth.effects, axis=1)  # [tasks, ids]
    assert np.corrcoef(effects)[0, 1] == pytest.approx(rho, abs=0.05)


def test_tsv_has_the_criteo_layout(tmp_path):
    spec = SyntheticSpec(rows={"train": 2000, "test": 10}, missing=0.2, seed=3)
    meta = generate_tsv(tmp_path, spec, gzip=True)
    lines = gzip.open(tmp_path / "train" / "part-00000.tsv.gz", "rt").read().splitlines()
    fields = [line.split("\t") for line in lines]
    assert len(lines) == 2000 and {len(f) for f in fields} == {2 + 13 + 26}
    assert {f[0] for f in fields} == {"0", "1"}
    dense = [v for f in fields for v in f[2:15]]
    cats = [v for f in fields for v in f[15:]]
    assert all(int(v) >= 0 for v in dense if v)
    assert all(len(v) == 8 and int(v, 16) >= 0 for v in cats if v)
    assert np.mean([v == "" for v in dense + cats]) == pytest.approx(0.2, abs=0.02)
    assert json.loads((tmp_path / "truth.json").read_text())["best_auc"] == meta["best_auc"]


def test_tsv_and_parquet_share_the_hidden_model(tmp_path):
    spec = SyntheticSpec(num_dense=2, cardinalities=[60, 5], tasks=["click"], **{
        k: v for k, v in SMALL.items() if k == "rows"})
    parquet = generate(tmp_path / "pq", spec)
    generate_tsv(tmp_path / "tsv", spec)
    opts = Options(num_dense=2, num_categorical=2, mode="vocab", min_count=1)
    converted = convert({s: [tmp_path / "tsv" / s / "part-00000.tsv"] for s in spec.rows},
                        tmp_path / "conv", opts, workers=1)
    a, b = pq.read_table(tmp_path / "pq" / "train"), pq.read_table(tmp_path / "conv" / "train")
    assert a.column("click").equals(b.column("click"))  # same rows, same labels
    for c in ("c0", "c1"):  # the hex ids map one to one onto the hidden ids
        pairs = set(zip(a.column(c).to_pylist(), b.column(c).to_pylist()))
        assert len(pairs) == len({x for x, _ in pairs}) == len({y for _, y in pairs})
    x, logged = a.column("d0").to_numpy(), b.column("d0").to_numpy()
    assert np.all(np.diff(logged[np.argsort(x)]) >= 0)  # log1p of the counts is monotone in x
    assert converted.meta["label_rate"] == parquet.meta["label_rate"]


def test_command_line_writes_both_formats(tmp_path, capsys):
    main(["data", "synthetic", "--out", str(tmp_path / "pq"), "--rows", "train=500,valid=50,test=100",
          "--cardinalities", "10,20", "--dense", "2", "--multi-hot", "1:2", "--files-per-split", "2",
          "--workers", "2"])
    schema = Schema.load(tmp_path / "pq")
    assert set(schema.meta["rows"]) == {"train", "valid", "test"} and schema.multi_hot == ["c1"]
    assert len(list((tmp_path / "pq" / "train").glob("*.parquet"))) == 2
    main(["data", "synthetic", "--out", str(tmp_path / "tsv"), "--format", "tsv", "--rows", "500,100",
          "--cardinalities", "10,20", "--dense", "2"])
    assert (tmp_path / "tsv" / "test" / "part-00000.tsv").exists()
    assert "best achievable" in capsys.readouterr().out
