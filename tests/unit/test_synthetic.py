import gzip
import json
import tracemalloc

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from app.cli import main
from app.data.errors import DataError
from app.sources.criteo import Options, convert
from app.data.schema import Schema
from app.sources.synthetic import (SHAPES, SyntheticSpec, _Truth, fixed_multi_hot, generate, generate_tsv,
                                   zipf_ids)

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
    generate(tmp_path / "other", SyntheticSpec(seed=1, files_per_split=3, row_group_size=256, **SMALL))
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


def test_fixed_multi_hot_sizes_give_every_row_that_many_ids(tmp_path):
    spec = SyntheticSpec(multi_hot_sizes={0: 3, 1: 100}, distribution="zipf", **SMALL)
    schema = generate(tmp_path, spec)
    assert schema.multi_hot == ["c0", "c1"]
    table = pq.read_table(tmp_path / "train")
    for column, size, card in (("c0", 3, 40), ("c1", 100, 300)):
        lengths = pc.list_value_length(table.column(column)).to_numpy()
        assert (lengths == size).all(), (column, np.unique(lengths))
        ids = pc.list_flatten(table.column(column)).to_numpy()
        assert ids.min() >= 0 and ids.max() < card
    assert str(table.schema.field("c2").type) == "int64"
    assert all(0.6 < auc < 1.0 for auc in schema.meta["best_auc"]["test"].values())


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.05])
def test_zipf_ids_follow_the_power_law(alpha):
    ids = zipf_ids(np.random.default_rng(0).random(1_000_000), 1000, alpha)
    assert ids.min() == 0 and ids.max() == 999
    counts = np.bincount(ids, minlength=1000)
    ranks = np.arange(10, 500)  # log p(id) against log(id + 1) is a line of slope -alpha
    slope = np.polyfit(np.log(ranks + 1), np.log(counts[ranks]), 1)[0]
    assert slope == pytest.approx(-alpha, abs=0.03)


def test_zipf_ids_of_a_large_table_are_skewed_and_in_range():
    card = 40_000_000
    ids = zipf_ids(np.random.default_rng(0).random(1_000_000), card, 1.05)
    assert ids.min() >= 0 and ids.max() < card
    assert np.mean(ids < card // 100) > 0.7  # the top 1% of ids: over 70% of the draws
    uniform = np.random.default_rng(0).random(1_000_000)
    assert np.mean(zipf_ids(uniform, 7, 1.05) < 7) == 1.0


def test_uniform_ids_are_not_skewed(tmp_path):
    generate(tmp_path, SyntheticSpec(distribution="uniform", **SMALL))
    ids = pq.read_table(tmp_path / "train").column("c1").to_numpy()
    assert ids.min() >= 0 and ids.max() < 300
    assert np.mean(ids < 30) == pytest.approx(0.1, abs=0.02)


def test_zipf_and_fixed_multi_hot_do_not_depend_on_the_worker_count(tmp_path):
    spec = SyntheticSpec(files_per_split=3, row_group_size=256, multi_hot_sizes={1: 5},
                         distribution="zipf", zipf_alpha=1.2, **SMALL)
    one, two = generate(tmp_path / "one", spec, workers=1), generate(tmp_path / "two", spec, workers=2)
    assert one.meta == two.meta
    for split in spec.rows:
        a, b = tables(tmp_path / "one", split), tables(tmp_path / "two", split)
        assert len(a) == 3 and all(x.equals(y) for x, y in zip(a, b))


def test_the_criteo_1tb_shape_needs_no_memory_per_id(tmp_path):
    """40M-row tables: the hidden effects repeat every EFFECTS_PER_COLUMN ids and the ids are
    drawn in closed form, so a few thousand rows take tens of MiB, not a table per id."""
    rows, sizes = SHAPES["criteo1tb"]
    spec = SyntheticSpec(rows={"train": 2000, "test": 500}, cardinalities=rows,
                         multi_hot_sizes=fixed_multi_hot(sizes), distribution="zipf")
    tracemalloc.start()
    try:
        schema = generate(tmp_path, spec)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 * 2**20, f"{peak / 2**20:.0f} MiB"  # one array of 40M int64 alone is 305 MiB
    table = pq.read_table(tmp_path / "train")
    ids_per_row = sum(pc.list_flatten(table.column(c)).length() if c in schema.multi_hot else len(table)
                      for c in schema.categorical) / len(table)
    assert ids_per_row == sum(sizes) == 214
    assert len(rows) == 26 and sum(rows) == pytest.approx(204e6, rel=0.01)


@pytest.mark.parametrize("change, message", [
    (dict(distribution="pareto"), "distribution 'pareto' is unknown"),
    (dict(distribution="zipf", zipf_alpha=0.0), "zipf_alpha is 0.0"),
    (dict(multi_hot={1: 2.0}, multi_hot_sizes={1: 3}), "column 1 has a mean list length and a fixed one"),
    (dict(multi_hot_sizes={3: 2}), "multi-hot column 3 does not exist; columns are 0..2"),
    (dict(multi_hot_sizes={0: 0}), "a list holds at least one id"),
    (dict(compression="lz77"), "compression 'lz77' is unknown"),
])
def test_settings_that_cannot_be_drawn_are_named(tmp_path, change, message):
    with pytest.raises(DataError, match=message):
        generate(tmp_path, SyntheticSpec(**SMALL, **change))


def test_command_line_multi_hot_sizes_and_zipf(tmp_path, capsys):
    main(["data", "synthetic", "--out", str(tmp_path), "--rows", "300,100", "--cardinalities", "10,20,1000",
          "--dense", "2", "--multi-hot-sizes", "1,4,2", "--distribution", "zipf", "--zipf-alpha", "1.5"])
    schema = Schema.load(tmp_path)
    assert schema.multi_hot == ["c1", "c2"]
    assert schema.meta["spec"]["multi_hot_sizes"] == {"1": 4, "2": 2}
    assert (schema.meta["spec"]["distribution"], schema.meta["spec"]["zipf_alpha"]) == ("zipf", 1.5)
    assert pq.ParquetFile(next((tmp_path / "train").glob("*.parquet"))).metadata.row_group(0).column(0).compression \
        == "SNAPPY"
    main(["data", "synthetic", "--out", str(tmp_path / "raw"), "--rows", "300,100", "--compression", "none"])
    files = list((tmp_path / "raw" / "train").glob("*.parquet"))
    meta = pq.ParquetFile(files[0]).metadata.row_group(0)
    assert {meta.column(j).compression for j in range(meta.num_columns)} == {"UNCOMPRESSED"}
    with pytest.raises(SystemExit):
        main(["data", "synthetic", "--out", str(tmp_path), "--cardinalities", "10,20,30",
              "--multi-hot-sizes", "1,4"])
    assert "--multi-hot-sizes has 2 entries for 3 columns" in capsys.readouterr().err


def test_command_line_shape(tmp_path, capsys, monkeypatch):
    seen = []
    monkeypatch.setattr("app.sources.synthetic.generate", lambda out, spec, workers: seen.append(spec) or Schema(
        [], [], {}, meta={"best_auc": {"test": {}}}))
    main(["data", "synthetic", "--out", str(tmp_path), "--shape", "criteo1tb", "--distribution", "zipf"])
    rows, sizes = SHAPES["criteo1tb"]
    assert seen[0].cardinalities == rows and seen[0].multi_hot_sizes == fixed_multi_hot(sizes)
    assert seen[0].multi_hot_sizes[20] == 100 and 2 not in seen[0].multi_hot_sizes
    with pytest.raises(SystemExit):
        main(["data", "synthetic", "--out", str(tmp_path), "--shape", "criteo1tb", "--cardinalities", "10"])
    assert "--shape criteo1tb gives the cardinalities" in capsys.readouterr().err
