import argparse
import json
import logging
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from app.data.errors import DataError
from app.data.layout import load_schema
from app.data.loader import iter_batches
from app.data.reader import ParquetBatches
from app.data.schema import Columns, Schema
from app.data.hugectr import read_file_list, slot_offsets
from app.sources.hugectr_norm import add_data_command, convert_norm, NormLayout

SIZES = [5, 7]  # slot sizes of the Parquet data set: a (single-hot), b (multi-hot)


def read_all(root, split, columns, skip=False):
    """Every row of a split through the training reader, in file order."""
    ds = ParquetBatches(root, split, columns, ("binary",) * len(columns.labels), 4, 0, 1,
                        train=False, shuffle=False, on_bad_rows="skip" if skip else "error")
    batches = list(iter_batches(ds, num_workers=0, pin_memory=False))
    kjts = [b.sparse_features for b in batches]
    return {
        "dense": torch.cat([b.dense for b in batches]).numpy(),
        "labels": torch.cat([b.labels for b in batches]).numpy(),
        "weights": torch.cat([b.weights for b in batches]).numpy(),
        **{k: (torch.cat([j[k].lengths() for j in kjts]).tolist(),
               torch.cat([j[k].values() for j in kjts]).tolist()) for k in columns.categorical},
    }


def rows(n, seed):
    """Known rows: per-table ids of a (one each) and b (0 to 3 each)."""
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=n).astype(np.float32), "y": (rng.random(n) < 0.5).astype(np.float32),
            "a": rng.integers(0, SIZES[0], n).tolist(),
            "b": [rng.integers(0, SIZES[1], rng.integers(0, 4)).tolist() for _ in range(n)]}


def write_split(folder, data, key_type, offsets, parts=(6, 5), names=None):
    """HugeCTR layout: Parquet files (columns x, a, y, b: roles by index), a file list with
    one relative and one absolute path, and _metadata.json as HugeCTR's generator and NVTabular
    write it: file_stats names with the generator's output prefix, cats not in index order."""
    folder.mkdir(parents=True)
    start, listed, stats = 0, [], []
    for i, n in enumerate(parts):
        s = slice(start, start + n)
        table = pa.table({
            "x": data["x"][s],
            "a": pa.array([v + offsets[0] for v in data["a"][s]], key_type),
            "y": data["y"][s],
            "b": pa.array([[v + offsets[1] for v in r] for r in data["b"][s]], pa.list_(key_type)),
        })
        pq.write_table(table, folder / f"{i}.parquet", row_group_size=4)
        listed.append(f"{i}.parquet" if i == 0 else str(folder / f"{i}.parquet"))
        stats.append({"file_name": f"./dcn_parquet/{folder.name}/{i}.parquet", "num_rows": n})
        start += n
    names = names or {"x": "x", "a": "a", "y": "y", "b": "b"}
    meta = {"file_stats": stats, "conts": [{"col_name": names["x"], "index": 0}],
            "cats": [{"col_name": names["b"], "index": 3}, {"col_name": names["a"], "index": 1}],
            "labels": [{"col_name": names["y"], "index": 2}]}
    (folder / "_metadata.json").write_text(json.dumps(meta))
    (folder / "_file_list.txt").write_text(f"{len(parts)}\n" + "\n".join(listed) + "\n")


def hugectr_dataset(root, key_type=pa.int64(), with_offsets=False, **kw):
    offsets = slot_offsets(SIZES) if with_offsets else [0, 0]
    data = {"train": rows(11, 0), "val": rows(7, 1)}
    write_split(root / "train", data["train"], key_type, offsets, **kw)
    write_split(root / "val", data["val"], key_type, offsets, parts=(7,), **kw)
    return data


def expect(got, data):
    np.testing.assert_array_equal(got["dense"][:, 0], data["x"])
    np.testing.assert_array_equal(got["labels"][:, 0], data["y"])
    assert got["a"] == ([1] * len(data["a"]), data["a"])
    assert got["b"] == ([len(r) for r in data["b"]], [v for r in data["b"] for v in r])


@pytest.mark.parametrize("key_type", [pa.int32(), pa.int64()])
@pytest.mark.parametrize("with_offsets", [False, True])
def test_parquet_split_read_in_place(tmp_path, key_type, with_offsets):
    data = hugectr_dataset(tmp_path, key_type, with_offsets)
    schema, where = load_schema(tmp_path, ["train", "val"], SIZES, with_offsets)
    assert where.endswith("_metadata.json")
    assert (schema.labels, schema.dense, schema.categorical) == (["y"], ["x"], {"a": 5, "b": 7})
    assert schema.multi_hot == ["b"]
    columns = Columns.resolve(schema, ["y"], [], [], where)
    assert columns.offsets == ((0, 5) if with_offsets else ())
    for split in ("train", "val"):
        expect(read_all(tmp_path, split, columns), data[split])


def test_cardinalities_from_a_scan_are_logged(tmp_path, caplog):
    data = hugectr_dataset(tmp_path)
    with caplog.at_level(logging.WARNING, logger="app"):
        schema, _ = load_schema(tmp_path, ["train", "val"])
    top = {c: max(max(data[s][c]) if c == "a" else max(v for r in data[s][c] for v in r)
                  for s in data) for c in ("a", "b")}
    assert schema.categorical == {c: top[c] + 1 for c in ("a", "b")}
    assert "max id + 1" in caplog.text


def test_metadata_names_map_to_parquet_columns_by_index(tmp_path, caplog):
    data = hugectr_dataset(tmp_path, names={"x": "I1", "a": "C1", "y": "label", "b": "C2"})
    with caplog.at_level(logging.WARNING, logger="app"):
        schema, where = load_schema(tmp_path, ["train", "val"], SIZES)
    assert list(schema.categorical) == ["a", "b"] and "C1->a" in caplog.text
    expect(read_all(tmp_path, "train", Columns.resolve(schema, ["y"], [], [], where)), data["train"])


def test_key_outside_its_slot_is_a_bad_value(tmp_path):
    hugectr_dataset(tmp_path, with_offsets=True)
    # a key of slot b written without its offset falls into slot a's range
    path = tmp_path / "train" / "0.parquet"
    table = pq.read_table(path)
    b = table.column("b").to_pylist()
    b[1] = [2]
    table = table.set_column(3, "b", pa.array(b, pa.list_(pa.int64())))
    pq.write_table(table, path, row_group_size=4)
    schema, where = load_schema(tmp_path, ["train", "val"], SIZES, True)
    columns = Columns.resolve(schema, ["y"], [], [], where)
    with pytest.raises(DataError, match=r"0\.parquet: row group 0, column 'b'.*slot offset 5"):
        read_all(tmp_path, "train", columns)
    got = read_all(tmp_path, "train", columns, skip=True)
    assert got["weights"].tolist() == [1, 0] + [1] * 9


def test_row_count_mismatch_names_the_file(tmp_path):
    hugectr_dataset(tmp_path)
    meta = json.loads((tmp_path / "train" / "_metadata.json").read_text())
    meta["file_stats"][1]["num_rows"] = 6
    (tmp_path / "train" / "_metadata.json").write_text(json.dumps(meta))
    schema, where = load_schema(tmp_path, ["train", "val"], SIZES)
    with pytest.raises(DataError, match=r"1\.parquet: 5 rows but .*_metadata\.json file_stats says 6"):
        read_all(tmp_path, "train", Columns.resolve(schema, ["y"], [], [], where))


def test_slot_sizes_pair_with_cats_in_index_order(tmp_path):
    data = hugectr_dataset(tmp_path, with_offsets=True)  # cats list b (index 3) before a (index 1)
    schema, where = load_schema(tmp_path, ["train", "val"], SIZES, True)
    assert list(schema.categorical.items()) == [("a", 5), ("b", 7)]
    assert schema.offsets == {"a": 0, "b": 5}
    expect(read_all(tmp_path, "train", Columns.resolve(schema, ["y"], [], [], where)), data["train"])


def test_ids_beyond_the_slot_size_array_name_it(tmp_path):
    hugectr_dataset(tmp_path)
    schema, where = load_schema(tmp_path, ["train", "val"], [5, 2])
    with pytest.raises(DataError, match=r"column 'b': ids span \[\d, \d\] but data\.slot_size_array "
                                        r"gives cardinality 2 .*raise it there"):
        read_all(tmp_path, "train", Columns.resolve(schema, ["y"], [], [], where))


def test_file_list_and_file_stats_as_the_generator_writes_them(tmp_path, caplog):
    """The list beside the data folder, paths with the generator's prefix, every name twice."""
    data = hugectr_dataset(tmp_path / "dcn_parquet")
    names = [f"./dcn_parquet/train/{i}.parquet" for i in range(2)]
    (tmp_path / "file_list.txt").write_text("2\n" + "\n".join(names * 2) + "\n")
    with caplog.at_level(logging.WARNING, logger="app"):
        schema, where = load_schema(tmp_path, ["file_list.txt"], SIZES)
    assert "says 2 files; the 2 lines after them are ignored" in caplog.text
    assert where == str(tmp_path / "dcn_parquet" / "train" / "_metadata.json")
    expect(read_all(tmp_path, "file_list.txt", Columns.resolve(schema, ["y"], [], [], where)), data["train"])


def test_file_stats_basenames_must_be_unique(tmp_path):
    hugectr_dataset(tmp_path)
    path = tmp_path / "train" / "_metadata.json"
    meta = json.loads(path.read_text())
    meta["file_stats"][1]["file_name"] = "./other/0.parquet"
    path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"_metadata\.json: file_stats lists './dcn_parquet/train/0\.parquet' "
                                        r"and './other/0\.parquet'"):
        load_schema(tmp_path, ["train"], SIZES)


def test_layout_errors(tmp_path):
    hugectr_dataset(tmp_path)
    listing = tmp_path / "train" / "_file_list.txt"
    listing.write_text("3\n0.parquet\n1.parquet\n")
    with pytest.raises(DataError, match="first line says 3 files but 2 paths follow"):
        read_file_list(listing)
    listing.write_text("0\n")
    with pytest.raises(DataError, match="number of files \\(at least 1\\)"):
        read_file_list(listing)
    listing.write_text("1\nmissing.parquet\n")
    with pytest.raises(DataError, match="listed file missing.parquet is not under"):
        read_file_list(listing)
    meta = json.loads((tmp_path / "val" / "_metadata.json").read_text())
    meta["cats"][0]["index"] = 1
    (tmp_path / "val" / "_metadata.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="_metadata.json: cats columns 'b' and 'a' share index 1"):
        load_schema(tmp_path, ["val"])
    meta["cats"][0]["index"] = 3
    (tmp_path / "val" / "_metadata.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="slot_size_array has 3 sizes but .* lists 2"):
        load_schema(tmp_path, ["val"], [1, 2, 3])
    with pytest.raises(DataError, match="keys_have_offsets needs data.slot_size_array"):
        load_schema(tmp_path, ["val"], [], True)
    Schema(labels=["y"], dense=["x"], categorical={"a": 5, "b": 7}).save(tmp_path)
    with pytest.raises(DataError, match="remove those keys"):
        load_schema(tmp_path, ["val"], SIZES)
    assert load_schema(tmp_path, ["val"])[1].endswith("schema.json")  # schema.json wins


# ---------------------------------------------------------------------------------------
# Norm files


def write_norm(path, records, label_dim, dense_dim, slot_num, i64=False, checksum=True):
    """HugeCTR's writer: header and records, each framed (length, payload, byte sum) with
    checksums."""
    def frame(payload):
        return struct.pack("<i", len(payload)) + payload + bytes([sum(payload) % 256]) \
            if checksum else payload

    out = [frame(struct.pack("<8q", int(checksum), len(records), label_dim, dense_dim, slot_num, 0, 0, 0))]
    for floats, slots in records:
        payload = struct.pack(f"<{len(floats)}f", *floats)
        for keys in slots:
            payload += struct.pack("<i", len(keys)) + np.array(keys, "<i8" if i64 else "<u4").tobytes()
        out.append(frame(payload))
    path.write_bytes(b"".join(out))


def norm_records(n, seed, sizes=(4, 9, 6), offsets=(0, 0, 0)):
    """Label, 2 dense; slot 0 single-hot, slot 1 multi-hot (0 to 4 keys), slot 2 single-hot
    except in row 0 when `multi` (then 2 keys)."""
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        floats = [float(rng.integers(0, 2)), *rng.normal(size=2).round(3).tolist()]
        slots = [[int(rng.integers(0, sizes[0]))], rng.integers(0, sizes[1], rng.integers(0, 5)).tolist(),
                 [int(rng.integers(0, sizes[2]))]]
        recs.append((floats, [[k + o for k in s] for s, o in zip(slots, offsets)]))
    return recs


def norm_files(tmp_path, records, **kw):
    """Norm files and their list as HugeCTR's generator writes it: the count, then every path
    (with the generator's `./` prefix) twice."""
    files = []
    for i, part in enumerate(records):
        files.append(tmp_path / f"part{i}.data")
        write_norm(files[-1], part, 1, 2, 3, **kw)
    listing = tmp_path / "file_list.txt"
    listing.write_text(f"{len(files)}\n" + "\n".join(f"./{f.name}" for f in files * 2) + "\n")
    return listing


@pytest.mark.parametrize("checksum", [True, False])
@pytest.mark.parametrize("i64", [False, True])
def test_norm_converts_to_the_same_rows(tmp_path, checksum, i64):
    parts = [norm_records(40, 0), norm_records(9, 1), []]
    listing = norm_files(tmp_path, parts, i64=i64, checksum=checksum)
    # small chunks and row groups: records straddle chunk ends
    schema = convert_norm(listing, tmp_path / "out", "train", NormLayout(1, 2, 3, i64, checksum),
                          label_names=["click"], row_group_size=16, chunk_bytes=64)
    assert schema.labels == ["click"] and schema.dense == ["d0", "d1"]
    assert schema.multi_hot == ["c1"]
    assert pq.read_schema(tmp_path / "out" / "train" / "part-0.parquet").field("c0").type == pa.int64()
    recs = [r for part in parts for r in part]
    assert schema.categorical == {f"c{k}": max(k_ for _, s in recs for k_ in s[k]) + 1 for k in range(3)}
    loaded, where = load_schema(tmp_path / "out")
    got = read_all(tmp_path / "out", "train", Columns.resolve(loaded, ["click"], [], [], where))
    np.testing.assert_allclose(got["labels"][:, 0], [r[0][0] for r in recs])
    np.testing.assert_allclose(got["dense"], np.array([r[0][1:] for r in recs], np.float32))
    for k in range(3):
        assert got[f"c{k}"] == ([len(r[1][k]) for r in recs], [v for r in recs for v in r[1][k]])


def test_norm_file_list_as_the_generator_writes_it(tmp_path, caplog):
    recs = [norm_records(5, 7), norm_records(3, 8)]
    listing = norm_files(tmp_path, recs)
    with caplog.at_level(logging.WARNING, logger="app"):
        schema = convert_norm(listing, tmp_path / "out", "train", NormLayout(1, 2, 3, False, None))
    assert "says 2 files; the 2 lines after them are ignored, as HugeCTR does" in caplog.text
    assert schema.meta["rows"] == {"train": 8}  # each file once
    written = sorted(p.name for p in (tmp_path / "out" / "train").iterdir())
    assert written == ["part-0.parquet", "part-1.parquet"]
    listing.write_text("3\n./part0.data\n./part1.data\n")
    with pytest.raises(DataError, match=r"file_list\.txt: first line says 3 files but 2 paths follow"):
        convert_norm(listing, tmp_path / "out", "train", NormLayout(1, 2, 3, False, None), force=True)


def test_failed_norm_conversion_leaves_nothing(tmp_path):
    recs = [norm_records(6, 9), norm_records(4, 10)]
    listing = norm_files(tmp_path, recs)
    good = (tmp_path / "part1.data").read_bytes()
    (tmp_path / "part1.data").write_bytes(good[:-3])
    layout = NormLayout(1, 2, 3, False, None)
    with pytest.raises(DataError, match=r"part1\.data: header says 4 records"):
        convert_norm(listing, tmp_path / "out", "train", layout)
    assert not (tmp_path / "out" / "train").exists()
    (tmp_path / "part1.data").write_bytes(good)
    assert convert_norm(listing, tmp_path / "out", "train", layout).meta["rows"] == {"train": 10}


def test_norm_offsets_are_removed_and_checked(tmp_path):
    sizes = [4, 9, 6]
    recs = norm_records(20, 2, sizes, slot_offsets(sizes))
    listing = norm_files(tmp_path, [recs])
    layout = NormLayout(1, 2, 3, False, None)
    schema = convert_norm(listing, tmp_path / "out", "test", layout, slot_sizes=sizes,
                          keys_have_offsets=True)
    assert schema.categorical == {"c0": 4, "c1": 9, "c2": 6}
    got = pq.read_table(tmp_path / "out" / "test" / "part-0.parquet")
    assert got.column("c2").to_pylist() == [r[1][2][0] - 13 for r in recs]
    recs[5][1][2][0] = 3  # slot 2's offset is 13: key 3 belongs to slot 0
    norm_files(tmp_path, [recs])
    with pytest.raises(DataError, match=r"part0\.data: record 5, slot 2: key 3 is outside \[13, 19\)"):
        convert_norm(listing, tmp_path / "out", "test", layout, slot_sizes=sizes,
                     keys_have_offsets=True, force=True)


def test_norm_corrupt_checksum_names_file_and_record(tmp_path):
    listing = norm_files(tmp_path, [norm_records(10, 3)])
    data = bytearray((tmp_path / "part0.data").read_bytes())
    pos = 69  # after the framed header: record 0
    for _ in range(3):  # to record 3's payload
        pos += 5 + struct.unpack_from("<i", data, pos)[0]
    data[pos + 6] ^= 0x10
    (tmp_path / "part0.data").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"part0\.data: record 3: checksum byte"):
        convert_norm(listing, tmp_path / "out", "train", NormLayout(1, 2, 3, False, True))


@pytest.mark.parametrize("layout,checksum,match", [
    (NormLayout(1, 2, 2, False, None), True, "header says slot_num 3 but --slot-num is 2"),
    (NormLayout(2, 2, 3, False, None), False, "header says label_dim 1 but --label-dim is 2"),
    (NormLayout(1, 2, 3, False, False), True, "checksums\\) but --no-checksum was given; pass --checksum"),
    (NormLayout(1, 2, 3, False, True), False, "but --checksum was given; pass --no-checksum"),
    (NormLayout(1, 2, 3, True, True), True, "record 0: .*does not match the layout"),
])
def test_norm_layout_errors(tmp_path, layout, checksum, match):
    listing = norm_files(tmp_path, [norm_records(5, 4)], checksum=checksum)
    with pytest.raises(DataError, match=match):
        convert_norm(listing, tmp_path / "out", "train", layout)


def test_norm_record_count_and_truncation(tmp_path):
    listing = norm_files(tmp_path, [norm_records(6, 5)], checksum=False)
    data = (tmp_path / "part0.data").read_bytes()
    (tmp_path / "part0.data").write_bytes(data[:-3])
    with pytest.raises(DataError, match="header says 6 records but the file ends after 5"):
        convert_norm(listing, tmp_path / "out", "train", NormLayout(1, 2, 3, False, None))
    (tmp_path / "part0.data").write_bytes(data + b"\0" * 8)
    with pytest.raises(DataError, match="8\\+ bytes after the 6 records"):
        convert_norm(listing, tmp_path / "out", "train", NormLayout(1, 2, 3, False, None), force=True)


def test_norm_command_line(tmp_path):
    listing = norm_files(tmp_path, [norm_records(8, 6)])
    parser = argparse.ArgumentParser()
    add_data_command(parser.add_subparsers(dest="source"))
    args = parser.parse_args(["hugectr-norm", "--file-list", str(listing), "--label-dim", "1",
                              "--dense-dim", "2", "--slot-num", "3", "--checksum",
                              "--slot-size-array", "4,9,6", "--out", str(tmp_path / "out"),
                              "--split", "train"])
    args.run(args)
    assert Schema.load(tmp_path / "out").categorical == {"c0": 4, "c1": 9, "c2": 6}
