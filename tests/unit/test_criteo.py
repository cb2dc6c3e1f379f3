import gzip
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from app.data.errors import DataError
from app.cli import main
from app.sources.criteo import Options, convert, label_names, parse_hex, pieces
from app.data.loader import iter_batches
from app.data.reader import ParquetBatches
from app.data.schema import Columns, Schema

# label, d0, d1, c0, c1, c2; empty fields are missing
SMALL = "1\t0\t5\t0000000a\tff\t\n" \
        "0\t\t-3\t0000000a\t\t1F\n" \
        "1\t7\t\tabc\tff\t1f\n"
SHAPE = dict(num_dense=2, num_categorical=3)


def write(path, text, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    (gzip.open if gz else open)(path, "wt").write(text)
    return path


def read_split(root, split):
    files = sorted((root / split).glob("*.parquet"))
    return {k: v for k, v in pq.read_table(files).to_pydict().items()}


def test_hash_mode_known_answers(tmp_path):
    src = write(tmp_path / "day0.tsv", SMALL)
    opts = Options(hash_sizes=(5, 3, 100), **SHAPE)
    schema = convert({"train": [src]}, tmp_path / "out", opts, workers=1)
    got = read_split(tmp_path / "out", "train")
    assert got["click"] == [1.0, 0.0, 1.0]
    assert got["c0"] == [1 + 10 % 4, 1 + 10 % 4, 1 + 0xABC % 4]
    assert got["c1"] == [1 + 255 % 2, 0, 1 + 255 % 2]  # missing -> 0
    assert got["c2"] == [0, 1 + 31 % 99, 1 + 31 % 99]  # hex is case-insensitive
    assert np.allclose(got["d0"], [0.0, 0.0, math.log1p(7)])  # missing -> 0
    assert np.allclose(got["d1"], [math.log1p(5), 0.0, 0.0])  # negative clipped to 0
    assert schema.categorical == {"c0": 5, "c1": 3, "c2": 100}
    assert schema.labels == ["click"] and schema.dense == ["d0", "d1"]
    assert schema.meta["rows"] == {"train": 3} and schema.meta["label_rate"]["train"]["click"] == 2 / 3
    assert Schema.load(tmp_path / "out").categorical == schema.categorical
    types = pq.read_schema(next((tmp_path / "out" / "train").glob("*.parquet")))
    assert [str(types.field(c).type) for c in ("click", "d0", "c0")] == ["float", "float", "int64"]


def test_vocab_mode_rare_missing_and_unseen_ids(tmp_path):
    # c0 counts: a x3, b x2, c x2, d x1; min_count 2 keeps a, b, c
    c0 = ["a", "b", "a", "c", "b", "a", "c", "d", ""]
    train = "".join(f"{i % 2}\t1\t2\t{v}\t7\t\n" for i, v in enumerate(c0))
    src = write(tmp_path / "train.tsv", train)
    test = write(tmp_path / "test.tsv", "0\t1\t2\te\t7\t\n1\t1\t2\ta\t\t\n")
    opts = Options(mode="vocab", min_count=2, **SHAPE)
    schema = convert({"train": [src], "test": [test]}, tmp_path / "out", opts, workers=1)
    got = read_split(tmp_path / "out", "train")
    # ids 2.. by decreasing count, ties by value; rare -> 1, missing -> 0
    assert got["c0"] == [2, 3, 2, 4, 3, 2, 4, 1, 0]
    assert got["c1"] == [2] * 9 and got["c2"] == [0] * 9
    assert schema.categorical == {"c0": 5, "c1": 3, "c2": 2}
    assert read_split(tmp_path / "out", "test")["c0"] == [1, 2]  # unseen in train -> rare
    assert read_split(tmp_path / "out", "test")["c1"] == [2, 0]
    assert (tmp_path / "out" / "vocab.npz").exists()
    assert schema.meta["categorical_transform"]["mode"] == "vocab"


def test_gzip_input_gives_the_same_output(tmp_path):
    plain = write(tmp_path / "a.tsv", SMALL)
    packed = write(tmp_path / "b.tsv.gz", SMALL, gz=True)
    opts = Options(hash_sizes=(5, 3, 100), **SHAPE)
    convert({"train": [plain]}, tmp_path / "plain", opts, workers=1)
    convert({"train": [packed]}, tmp_path / "packed", opts, workers=1)
    assert read_split(tmp_path / "plain", "train") == read_split(tmp_path / "packed", "train")


def test_byte_ranges_and_workers_do_not_change_the_rows(tmp_path):
    rng = np.random.default_rng(0)
    lines = [f"{rng.integers(2)}\t{rng.integers(100)}\t\t{rng.integers(1 << 32):x}\t"
             f"{rng.integers(50):x}\t{i:x}\n" for i in range(3000)]
    src = write(tmp_path / "big.tsv", "".join(lines))
    cut = pieces(src, 4096)
    assert len(cut) > 10 and cut[0].start == 0 and cut[-1].end == src.stat().st_size
    assert all(a.end == b.start for a, b in zip(cut, cut[1:]))
    text = src.read_bytes()
    assert all(text[p.start - 1:p.start] == b"\n" for p in cut[1:])  # cut at line ends
    opts = Options(hash_sizes=(1000,) * 3, row_group_size=256, **SHAPE)
    convert({"train": [src]}, tmp_path / "one", opts, workers=1, range_bytes=1 << 30)
    convert({"train": [src]}, tmp_path / "many", opts, workers=2, range_bytes=4096)
    one, many = read_split(tmp_path / "one", "train"), read_split(tmp_path / "many", "train")
    assert one == many and len(one["click"]) == 3000
    assert one["c2"][:3] == [0 + 1, 1 + 1, 2 + 1]  # file order kept
    meta = pq.ParquetFile(next((tmp_path / "one" / "train").glob("*.parquet"))).metadata
    assert meta.row_group(0).num_rows == 256


def test_output_trains_through_the_reader(tmp_path):
    # two label columns first: click, convert
    lines = "".join(f"{i % 2}\t{(i // 2) % 2}\t{i % 3}\t{i}\t{i % 7:x}\t{i % 5:x}\t{i:x}\n"
                    for i in range(200))
    src = write(tmp_path / "train.tsv", lines)
    opts = Options(labels=label_names(2, None), hash_sizes=(10, 10, 64), **SHAPE)
    schema = convert({"train": [src], "test": [write(tmp_path / "t.tsv", lines)]}, tmp_path / "out", opts)
    assert schema.labels == ["click", "convert"]
    columns = Columns.resolve(Schema.load(tmp_path / "out"), ["click", "convert"], [], [], "test")
    ds = ParquetBatches(tmp_path / "out", "test", columns, ("binary", "binary"), 64, 0, 1, train=False)
    batches = list(iter_batches(ds, num_workers=0, pin_memory=False))
    assert sum(len(b) for b in batches) == 200
    assert batches[0].labels[:4].tolist() == [[0, 0], [1, 0], [0, 1], [1, 1]]


def test_label_names():
    assert label_names(None, None) == ("click",)
    assert label_names(2, None) == ("click", "convert")
    assert label_names(3, None) == ("click", "convert", "label2")
    assert label_names(None, "ctr,cvr") == ("ctr", "cvr")
    with pytest.raises(DataError, match="--num-labels 1 but --label-names lists 2"):
        label_names(1, "ctr,cvr")


@pytest.mark.parametrize("line, match", [
    ("2\t1\t2\ta\tb\tc\n", r"bad\.tsv, line 2, label 'click': 2; labels must be 0 or 1"),
    ("\t1\t2\ta\tb\tc\n", r"bad\.tsv, line 2, label 'click': empty"),
    ("1\t1\t2\tzz\tb\tc\n", r"bad\.tsv, line 2, column c0: value 'zz' is not hexadecimal"),
    ("1\t1\t2\ta\tb\n", r"bad\.tsv: cannot parse as Criteo TSV .*Expected 6 columns"),
    ("1\tx\t2\ta\tb\tc\n", r"bad\.tsv: cannot parse as Criteo TSV"),
])
def test_bad_tsv_lines_are_named_and_leave_no_output(tmp_path, line, match):
    src = write(tmp_path / "bad.tsv", "0\t1\t2\ta\tb\tc\n" + line)
    with pytest.raises(DataError, match=match):
        convert({"train": [src]}, tmp_path / "out", Options(hash_sizes=(9,) * 3, **SHAPE), workers=1)
    assert not (tmp_path / "out" / "schema.json").exists()
    assert not (tmp_path / "out" / "train").exists() and not (tmp_path / "out" / ".incomplete").exists()


def test_parse_hex_variable_lengths_and_missing():
    import pyarrow as pa

    values, present = parse_hex(pa.array(["1", None, "", "ffffffffffffffff", "0a0", "ABCdef12"]), str)
    assert present.tolist() == [True, False, False, True, True, True]
    assert values.tolist() == [1, 0, 0, 2**64 - 1, 160, 0xABCDEF12]
    with pytest.raises(DataError, match="more than 16 hex digits"):
        parse_hex(pa.array(["1" * 17]), str)


def test_refuses_to_overwrite_without_force(tmp_path):
    src = write(tmp_path / "a.tsv", SMALL)
    opts = Options(hash_sizes=(5, 3, 100), **SHAPE)
    convert({"train": [src]}, tmp_path / "out", opts, workers=1)
    with pytest.raises(DataError, match="already holds a data set; pass --force"):
        convert({"train": [src]}, tmp_path / "out", opts, workers=1)
    convert({"test": [src]}, tmp_path / "out", opts, workers=1, force=True)
    assert not (tmp_path / "out" / "train").exists()  # the old split went with the old data set


def test_command_line(tmp_path, capsys):
    a = write(tmp_path / "a.tsv", SMALL)
    b = write(tmp_path / "b.tsv.gz", SMALL, gz=True)
    main(["data", "criteo-tsv", "--train", str(a), "--test", str(b), "--out", str(tmp_path / "out"),
          "--num-dense", "2", "--num-categorical", "3", "--hash-size", "5,3,100", "--workers", "2"])
    schema = Schema.load(tmp_path / "out")
    assert schema.meta["rows"] == {"train": 3, "test": 3} and schema.categorical["c0"] == 5
    assert "wrote" in capsys.readouterr().out
