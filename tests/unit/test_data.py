import dataclasses
import hashlib
import os
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from app.data.batch import arrow_to_batch
from app.data.loader import ChunkSlots, iter_batches, start_worker_server
from app.data.order import Position, consume, rank_share, span_rows
from app.data.reader import ParquetBatches
from app.data.schema import Columns, Schema


def uneven_dataset(root):
    """Three files of 1000, 37 and 5003 rows with uneven row groups; id == row index % 97."""
    (root / "train").mkdir(parents=True)
    start = 0
    for i, (rows, group) in enumerate([(1000, 300), (37, 37), (5003, 1024)]):
        idx = np.arange(start, start + rows)
        table = pa.table({"y": (idx % 2).astype(np.float32), "x": idx.astype(np.float32),
                          "c": (idx % 97).astype(np.int64)})
        pq.write_table(table, root / "train" / f"part-{i}.parquet", row_group_size=group)
        start += rows
    Schema(labels=["y"], dense=["x"], categorical={"c": 97}).save(root)
    return Columns.resolve(Schema.load(root), ["y"], [], [], "test")


def ranks(root, columns, world, train, batch_size=128, position=None):
    out = []
    for r in range(world):
        ds = ParquetBatches(root, "train", columns, ("binary",), batch_size, r, world, train=train, seed=3)
        if position:
            ds.set_position(position)
        out.append((len(ds), list(iter_batches(ds, num_workers=0, pin_memory=False))))
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("train", [True, False])
def test_equal_batch_counts_and_disjoint_shares(tmp_path, world, train):
    columns = uneven_dataset(tmp_path)
    per_rank = ranks(tmp_path, columns, world, train)
    counts = {n for n, _ in per_rank} | {len(b) for _, b in per_rank}
    assert len(counts) == 1, f"batch counts differ across ranks: {counts}"
    ids = np.concatenate([b.row_ids.numpy() for _, bs in per_rank for b in bs])
    assert len(ids) == len(set(ids.tolist())), "a row was read by two ranks or twice"
    total = 1000 + 37 + 5003
    if train:  # drops fewer than world_size rows so every rank has the same rows
        assert total - world < len(ids) <= total
        assert len({len(b) for _, bs in per_rank for b in bs[:-1]}) <= 1
    else:  # evaluation scores every row once
        assert sorted(ids.tolist()) == list(range(total))
    for _, bs in per_rank:  # features travel with their row
        for b in bs:
            assert torch.equal(b.dense[:, 0], b.row_ids.float())
            assert torch.equal(b.sparse_features["c"].values(), b.row_ids % 97)


def test_workers_give_the_same_batches(tmp_path):
    columns = uneven_dataset(tmp_path)
    ds = ParquetBatches(tmp_path, "train", columns, ("binary",), 100, 1, 2, train=True, seed=5,
                        chunk_batches=3)
    one = [b.row_ids for b in iter_batches(ds, num_workers=0, pin_memory=False)]
    two = [b.row_ids for b in iter_batches(ds, num_workers=2, pin_memory=False)]
    assert len(one) == len(two) and all(torch.equal(a, b) for a, b in zip(one, two))


def test_epochs_reshuffle_and_seed_repeats(tmp_path):
    columns = uneven_dataset(tmp_path)
    first = ranks(tmp_path, columns, 1, True, position=Position(0))[0][1][0].row_ids
    again = ranks(tmp_path, columns, 1, True, position=Position(0))[0][1][0].row_ids
    other = ranks(tmp_path, columns, 1, True, position=Position(1))[0][1][0].row_ids
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 3)])
def test_resume_on_another_world_size_neither_repeats_nor_skips(tmp_path, before, after):
    columns = uneven_dataset(tmp_path)
    full = {int(i) for _, bs in ranks(tmp_path, columns, before, True) for b in bs for i in b.row_ids}
    steps = 5
    seen = {int(i) for _, bs in ranks(tmp_path, columns, before, True) for b in bs[:steps]
            for i in b.row_ids}
    total = 1000 + 37 + 5003
    remaining = consume([(0, total)], before, steps * 128)
    rest = ranks(tmp_path, columns, after, True, position=Position(0, remaining))
    later = [int(i) for _, bs in rest for b in bs for i in b.row_ids]
    assert not seen & set(later), "a resumed run repeated rows"
    assert len(later) == len(set(later))
    assert len(seen) + len(later) > len(full) - after  # at most after-1 rows left over
    assert Position.from_state_dict(Position(0, remaining).state_dict()).remaining == remaining


def test_rank_share_is_contiguous_and_equal():
    spans = [(0, 10), (20, 25)]
    shares = [rank_share(spans, r, 2, equal=True) for r in range(2)]
    assert shares == [[(0, 7)], [(7, 10), (20, 24)]]
    assert [span_rows(rank_share(spans, r, 4, equal=False)) for r in range(4)] == [4, 4, 4, 3]


def test_arrow_to_batch_multi_hot_and_strings():
    table = pa.table({
        "y": pa.array([1.0, 0.0, 1.0], pa.float32()),
        "d": pa.array([0.5, 1.5, -2.0], pa.float32()),
        "tags": pa.array([[1, 2], [], [3]], pa.list_(pa.int64())),
        "city": pa.array(["paris", "oslo", "paris"]),
    })
    schema = Schema(labels=["y"], dense=["d"], categorical={"tags": 10, "city": 1000}, multi_hot=["tags"])
    columns = Columns.resolve(schema, ["y"], [], ["city", "tags"], "test")
    batch = arrow_to_batch(table, columns, np.arange(3))
    kjt = batch.sparse_features
    assert kjt.keys() == ["city", "tags"]  # config order, not file order
    assert kjt["tags"].lengths().tolist() == [2, 0, 1]
    assert kjt["tags"].values().tolist() == [1, 2, 3]
    city = kjt["city"].values().tolist()
    assert city[0] == city[2] != city[1] and all(0 <= c < 1000 for c in city)
    assert batch.dense.shape == (3, 1) and batch.labels.tolist() == [[1.0], [0.0], [1.0]]
    again = arrow_to_batch(table, columns, np.arange(3)).sparse_features["city"].values().tolist()
    assert again == city  # string hashing is stable


def test_a_reader_batch_moves_as_one_buffer():
    """Its tensors are views of one buffer: moved (here: copied) as one, each is the same view
    of the new buffer, with the same values."""
    table = pa.table({
        "y": pa.array([1.0, 0.0, 1.0], pa.float32()),
        "z": pa.array([0.0, 0.0, 1.0], pa.float32()),
        "d": pa.array([0.5, 1.5, -2.0], pa.float32()),
        "e": pa.array([1.0, 2.0, 3.0], pa.float32()),
        "tags": pa.array([[1, 2], [], [3, 4, 5]], pa.list_(pa.int64())),
        "c": pa.array([7, 8, 9], pa.int64()),
    })
    schema = Schema(labels=["y", "z"], dense=["d", "e"], categorical={"tags": 10, "c": 10}, multi_hot=["tags"])
    batch = arrow_to_batch(table, Columns.resolve(schema, ["y", "z"], [], [], "test"), np.arange(3) + 40)
    moved = batch._map(torch.clone)
    assert moved.packed.data_ptr() != batch.packed.data_ptr()
    start, end = moved.packed.data_ptr(), moved.packed.data_ptr() + moved.packed.nbytes
    for old, new in [(getattr(batch, f), getattr(moved, f)) for f in ("dense", "labels", "weights", "row_ids")] + [
            (batch.sparse_features.values(), moved.sparse_features.values()),
            (batch.sparse_features.lengths(), moved.sparse_features.lengths())]:
        assert new.dtype == old.dtype and torch.equal(new, old)
        assert start <= new.data_ptr() and new.data_ptr() + new.nbytes <= end
    assert moved.row_ids.tolist() == [40, 41, 42] and moved.labels.tolist() == [[1, 0], [0, 0], [1, 1]]
    assert moved.sparse_features.values().tolist() == [1, 2, 3, 4, 5, 7, 8, 9]
    assert moved.sparse_features.length_per_key() == [5, 3] and moved.sparse_features.stride() == 3


# ---------------------------------------------------------------------------------------
# The reader against a reference built straight from pyarrow


def _hash(s: str, card: int) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") % card


def reference(root, columns, batch_size, rank, world, *, train, seed, shuffle, position, bad=()):
    """Expected batches of one rank, from pyarrow and numpy alone (none of the reader's order
    functions): the epoch's order is the non-empty row groups in the order of a permutation
    drawn from (seed, epoch), each group's rows in that of one drawn from (seed, epoch, its first
    row); a rank's share is a contiguous run of the positions left, equal on every rank in
    training (the rows left over dropped), the first ranks one row more in evaluation; training
    cuts a share into full batches and a tail, evaluation into as many near-equal batches as
    rank 0 needs. `bad` rows (indices in the split) carry weight 0, zero values and empty lists."""
    files = sorted((root / "train").glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f, columns=columns.all) for f in files])
    footers = [pq.ParquetFile(f).metadata for f in files]
    sizes = [n for m in footers for n in (m.row_group(i).num_rows for i in range(m.num_row_groups)) if n]
    firsts = np.cumsum([0] + sizes[:-1])
    shuffle = shuffle and train
    visit = np.arange(len(sizes))
    if shuffle:
        np.random.default_rng([seed, position.epoch]).shuffle(visit)
    order = np.concatenate([firsts[g] + (np.random.default_rng([seed, position.epoch, firsts[g]]).permutation(
        sizes[g]) if shuffle else np.arange(sizes[g])) for g in visit])
    left = np.arange(len(order)) if position.remaining is None else \
        np.concatenate([np.arange(a, b) for a, b in position.remaining])
    if train:
        per_rank = len(left) // world
        share = left[rank * per_rank:(rank + 1) * per_rank]
        positions = [share[i:i + batch_size] for i in range(0, len(share), batch_size)]
    else:
        shares = np.array_split(left, world)
        positions = np.array_split(shares[rank], -(-len(shares[0]) // batch_size))
    offsets = dict(zip(columns.categorical, columns.offsets or [0] * len(columns.categorical)))
    out = []
    for rows in (order[p] for p in positions):
        size = len(rows)
        weights = np.array([0.0 if r in bad else 1.0 for r in rows], np.float32)

        def cells(name):  # None for a bad row
            return [None if r in bad else table.column(name)[int(r)].as_py() for r in rows]

        def floats(names):
            cols = [[0.0 if v is None else v for v in cells(n)] for n in names]
            return np.array(cols, np.float32).T.reshape(size, len(names))

        lengths, values = [], []
        for name, card in zip(columns.categorical, columns.cardinality):
            strings = pa.types.is_string(_leaf(table.schema.field(name).type))
            for cell in cells(name):
                # a bad row has no ids (multi-hot), or id 0, or the hash of "" (strings)
                ids = (cell or []) if name in columns.multi_hot else [cell]
                ids = [_hash(x or "", card) if strings else 0 if x is None else x - offsets[name]
                       for x in ids]
                lengths.append(len(ids))
                values += ids
        out.append({"dense": floats(columns.dense), "labels": floats(columns.labels), "weights": weights,
                    "row_ids": rows.astype(np.int64), "keys": list(columns.categorical),
                    "values": np.array(values, np.int64), "lengths": np.array(lengths, np.int32)})
    return out


def _leaf(tp):
    return tp.value_type if pa.types.is_list(tp) else tp


def assert_same(batches, expected):
    assert len(batches) == len(expected)
    for i, (b, e) in enumerate(zip(batches, expected)):
        got = {"dense": b.dense, "labels": b.labels, "weights": b.weights, "row_ids": b.row_ids,
               "values": b.sparse_features.values(), "lengths": b.sparse_features.lengths()}
        assert b.sparse_features.keys() == e["keys"], f"batch {i}: keys"
        # the cached ids per key that TorchRec's input distribution reads instead of summing
        per_key = e["lengths"].reshape(len(e["keys"]), -1).sum(1).tolist() if e["keys"] else []
        assert b.sparse_features.length_per_key() == per_key, f"batch {i}: length_per_key"
        assert b.sparse_features.stride() == len(e["dense"]), f"batch {i}: stride"
        for name, tensor in got.items():
            want = e[name]
            have = tensor.numpy()
            assert have.dtype == want.dtype and have.shape == want.shape, \
                f"batch {i}, {name}: {have.dtype}{have.shape} != {want.dtype}{want.shape}"
            assert have.tobytes() == want.tobytes(), f"batch {i}, {name}: values differ"


def mixed_dataset(root, offsets=(0, 0)):
    """Two files in row groups of 50: int32 and string ids, a multi-hot int list (some lists
    null or empty), a multi-hot string list, one of lists of equal length, two labels, float64
    and int dense columns."""
    (root / "train").mkdir(parents=True)
    rng = np.random.default_rng(0)
    start = 0
    for i, rows in enumerate([230, 170]):
        idx = np.arange(start, start + rows)
        tags = [None if r % 11 == 0 else rng.integers(0, 9, r % 4).tolist() for r in idx]
        table = pa.table({
            "y": (idx % 2).astype(np.float32), "z": (idx % 3 == 0).astype(np.float64),
            "x": idx.astype(np.float64) / 7, "n": pa.array(idx % 5, pa.int32()),
            "c": pa.array(idx % 13 + offsets[0], pa.int32()),
            "city": pa.array([f"city{r % 17}" for r in idx]),
            "tags": pa.array([None if t is None else [v + offsets[1] for v in t] for t in tags],
                             pa.list_(pa.int64())),
            "words": pa.array([[f"w{r % 5}"] * (r % 3) for r in idx], pa.list_(pa.string())),
            # lists of one length in a file (2, then 3), as MLPerf's multi-hot Criteo
            "pair": pa.array([[(int(r) + j) % 7 for j in range(2 + i)] for r in idx], pa.list_(pa.int64())),
        })
        pq.write_table(table, root / "train" / f"part-{i}.parquet", row_group_size=50)
        start += rows
    schema = Schema(labels=["y", "z"], dense=["x", "n"],
                    categorical={"c": 13, "city": 1000, "tags": 9, "words": 50, "pair": 7},
                    multi_hot=["tags", "words", "pair"])
    schema.save(root)
    columns = Columns.resolve(schema, ["y", "z"], [], ["tags", "c", "words", "city", "pair"], "test")
    return dataclasses.replace(columns, offsets=tuple(offsets[0] if c == "c" else offsets[1] if c == "tags"
                                                      else 0 for c in columns.categorical))


def read_rank(root, columns, batch_size, rank, world, *, workers=0, position=None, kinds=("binary",),
              **kwargs):
    ds = ParquetBatches(root, "train", columns, kinds, batch_size, rank, world, **kwargs)
    if position is not None:
        ds.set_position(position)
    return list(iter_batches(ds, num_workers=workers, pin_memory=False))


@pytest.mark.parametrize("world,train,shuffle,batch_size,chunk", [
    (1, True, True, 128, 8), (2, True, False, 100, 3), (3, False, True, 250, 1), (3, True, True, 64, 5)])
@pytest.mark.parametrize("resume", [False, True])
def test_batches_match_a_pyarrow_reference(tmp_path, world, train, shuffle, batch_size, chunk, resume):
    columns = uneven_dataset(tmp_path)
    position = Position(1, consume([(0, 6040)], 2, 700) if resume else None)
    for rank in range(world):
        got = read_rank(tmp_path, columns, batch_size, rank, world, position=position, train=train,
                        seed=3, shuffle=shuffle, chunk_batches=chunk)
        assert_same(got, reference(tmp_path, columns, batch_size, rank, world, train=train, seed=3,
                                   shuffle=shuffle, position=position))


@pytest.mark.parametrize("offsets", [(0, 0), (100, 7)])
@pytest.mark.parametrize("world,train", [(1, True), (2, False)])
def test_multi_hot_strings_and_offsets_match_the_reference(tmp_path, offsets, world, train):
    columns = mixed_dataset(tmp_path, offsets)
    for rank in range(world):
        got = read_rank(tmp_path, columns, 32, rank, world, kinds=("binary", "binary"), train=train,
                        seed=1, chunk_batches=2)
        assert_same(got, reference(tmp_path, columns, 32, rank, world, train=train, seed=1, shuffle=True,
                                   position=Position()))


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_match_the_reference(tmp_path, workers):
    columns = mixed_dataset(tmp_path, (3, 2))
    got = read_rank(tmp_path, columns, 24, 1, 2, workers=workers, kinds=("binary", "binary"),
                    train=True, seed=4, chunk_batches=3)
    assert_same(got, reference(tmp_path, columns, 24, 1, 2, train=True, seed=4, shuffle=True,
                               position=Position()))


def test_skipped_rows_match_the_reference(tmp_path):
    (tmp_path / "train").mkdir()
    n = 40
    x = np.arange(n, dtype=np.float32)
    x[[3, 17]] = [np.nan, np.inf]
    c = (np.arange(n) % 10).tolist()
    c[21], c[30] = 10, None
    city = [f"c{i % 4}" for i in range(n)]
    city[8] = None
    tags = [[i % 10, (i + 1) % 10] for i in range(n)]
    tags[25], tags[33] = [1, None], [12]
    y = (np.arange(n) % 2).astype(np.float32)
    y[36] = 0.5
    pq.write_table(pa.table({"y": y, "x": x, "c": pa.array(c, pa.int64()), "city": city,
                             "tags": pa.array(tags, pa.list_(pa.int64()))}),
                   tmp_path / "train" / "part-0.parquet", row_group_size=16)
    schema = Schema(labels=["y"], dense=["x"], categorical={"c": 10, "city": 100, "tags": 10},
                    multi_hot=["tags"])
    schema.save(tmp_path)
    columns = Columns.resolve(schema, ["y"], [], [], "test")
    bad = {3, 17, 21, 30, 8, 25, 33, 36}
    for workers in (0, 1):
        got = read_rank(tmp_path, columns, 6, 0, 1, workers=workers, train=True, seed=2,
                        on_bad_rows="skip", chunk_batches=4)
        assert_same(got, reference(tmp_path, columns, 6, 0, 1, train=True, seed=2, shuffle=True,
                                   position=Position(), bad=bad))


@pytest.mark.parametrize("chunk", [1, 8])
def test_evaluation_batches_of_a_short_share_match_the_reference(tmp_path, chunk):
    """10 rows on 4 ranks in batches of 1: ranks 2 and 3 have 2 rows for 3 steps, so their
    last batch is empty (every rank takes the same number of steps)."""
    (tmp_path / "train").mkdir()
    idx = np.arange(10)
    pq.write_table(pa.table({"y": (idx % 2).astype(np.float32), "x": idx.astype(np.float32),
                             "c": idx % 7, "tags": [[i] * (i % 3) for i in idx]}),
                   tmp_path / "train" / "part-0.parquet", row_group_size=4)
    schema = Schema(labels=["y"], dense=["x"], categorical={"c": 7, "tags": 10}, multi_hot=["tags"])
    schema.save(tmp_path)
    columns = Columns.resolve(schema, ["y"], [], [], "test")
    for rank in range(4):
        got = read_rank(tmp_path, columns, 1, rank, 4, train=False, chunk_batches=chunk)
        assert_same(got, reference(tmp_path, columns, 1, rank, 4, train=False, seed=0, shuffle=False,
                                   position=Position()))
    assert [len(b) for b in got] == [1, 1, 0]


def _copy(batch):
    """What the trainer's pipeline does with a reader batch as it takes it: a copy of its own."""
    return batch._map(torch.clone)


def _in(slots, batch):
    start = slots.memory().data_ptr()
    return start <= batch.packed.data_ptr() < start + slots.size


@pytest.mark.parametrize("fit", ["all", "some"])
def test_workers_packing_into_slots_match_the_reference(tmp_path, fit):
    """Multi-hot chunks in slots, and chunks too big for a slot packed outside them."""
    columns = mixed_dataset(tmp_path, (3, 2))
    ds = ParquetBatches(tmp_path, "train", columns, ("binary", "binary"), 32, 0, 1, train=True, seed=4,
                        chunk_batches=2)
    plain = list(iter_batches(ds, 0, pin_memory=False))
    chunk_sizes = sorted(sum(-(-b.packed.nbytes // 8) * 8 for b in plain[i:i + 2]) for i in range(0, len(plain), 2))
    slots = ChunkSlots(2, 2, ds.chunk_bytes() if fit == "all" else chunk_sizes[len(chunk_sizes) // 2], pin=False)
    inside, got = [], []
    for batch in iter_batches(ds, 2, pin_memory=False, slots=slots):
        inside.append(_in(slots, batch))
        got.append(_copy(batch))
    assert_same(got, reference(tmp_path, columns, 32, 0, 1, train=True, seed=4, shuffle=True,
                               position=Position()))
    assert all(inside) if fit == "all" else 0 < sum(inside) < len(inside)


def test_a_slot_is_written_again_only_after_the_next_chunk(tmp_path):
    """A chunk's batches stay intact while the next chunk's are taken: one worker with two
    slots is then waiting to pack the chunk after into the first one."""
    columns = uneven_dataset(tmp_path)
    ds = ParquetBatches(tmp_path, "train", columns, ("binary",), 128, 0, 1, train=True, seed=2, chunk_batches=2)
    slots = ChunkSlots(1, 2, ds.chunk_bytes(), pin=False)
    previous, current, checked = [], [], 0
    for i, batch in enumerate(iter_batches(ds, 1, pin_memory=False, slots=slots)):
        if i % 2 == 0:  # a chunk's first batch: the previous chunk's must still be there
            previous, current = current, []
            if previous:
                time.sleep(0.1)  # time for the worker to write over a slot released too early
                assert all(torch.equal(view.packed, copy.packed) for view, copy in previous), f"batch {i}"
                checked += 1
        current.append((batch, _copy(batch)))
    assert checked > 10


def test_chunks_too_big_for_a_slot_do_not_hold_back_the_next_one(tmp_path):
    """One worker, three slots: chunk 0 fits its slot, chunks 1 and 2 (8 ids a row) are packed
    outside, chunk 3 needs chunk 0's slot. Holding chunk 0's slot until another chunk in a slot
    is done would wait forever."""
    (tmp_path / "train").mkdir()
    idx = np.arange(256)
    tags = [[int(r) % 9] * (8 if 64 <= r < 192 else 1) for r in idx]
    pq.write_table(pa.table({"y": (idx % 2).astype(np.float32), "x": idx.astype(np.float32),
                             "tags": pa.array(tags, pa.list_(pa.int64()))}),
                   tmp_path / "train" / "part-0.parquet", row_group_size=64)
    Schema(labels=["y"], dense=["x"], categorical={"tags": 9}, multi_hot=["tags"]).save(tmp_path)
    columns = Columns.resolve(Schema.load(tmp_path), ["y"], [], [], "test")
    ds = ParquetBatches(tmp_path, "train", columns, ("binary",), 32, 0, 1, train=True, shuffle=False, chunk_batches=2)
    first_chunk = sum(-(-b.packed.nbytes // 8) * 8 for b in list(iter_batches(ds, 0, pin_memory=False))[:2])
    slots = ChunkSlots(1, 3, first_chunk, pin=False)  # room for one id a row
    got, inside = [], []

    def read():
        for batch in iter_batches(ds, 1, pin_memory=False, slots=slots):
            inside.append(_in(slots, batch))
            got.append(_copy(batch))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive(), f"the reader stalled after {len(got)} batches"
    assert inside == [True] * 2 + [False] * 4 + [True] * 2
    assert torch.cat([b.row_ids for b in got]).tolist() == list(range(256))


@pytest.mark.parametrize("ids", [1, 8, 100])
def test_slots_fit_chunks_of_long_lists(tmp_path, ids):
    """Slots are sized from the footers' ids a row: chunks of 100 ids a row are packed into
    them, not into memory of their own, with little room to spare."""
    (tmp_path / "train").mkdir()
    idx = np.arange(512)
    pq.write_table(pa.table({"y": (idx % 2).astype(np.float32), "x": idx.astype(np.float32),
                             "tags": pa.array([[int(r) % 9] * ids for r in idx], pa.list_(pa.int64()))}),
                   tmp_path / "train" / "part-0.parquet", row_group_size=128)
    Schema(labels=["y"], dense=["x"], categorical={"tags": 9}, multi_hot=["tags"]).save(tmp_path)
    columns = Columns.resolve(Schema.load(tmp_path), ["y"], [], [], "test")
    ds = ParquetBatches(tmp_path, "train", columns, ("binary",), 64, 0, 1, train=True, seed=1, chunk_batches=2)
    chunk = sum(-(-b.packed.nbytes // 8) * 8 for b in list(iter_batches(ds, 0, pin_memory=False))[:2])
    assert chunk <= ds.chunk_bytes() < 1.1 * chunk
    slots = ChunkSlots(1, 2, ds.chunk_bytes(), pin=False)
    got = [(_in(slots, b), _copy(b)) for b in iter_batches(ds, 1, pin_memory=False, slots=slots)]
    assert all(inside for inside, _ in got) and len(got) == 8
    assert torch.cat([b.sparse_features.values() for _, b in got]).view(-1, ids)[:, 0].tolist() == \
        (torch.cat([b.row_ids for _, b in got]) % 9).tolist()


def _children() -> set[int]:
    return {int(pid) for task in Path(f"/proc/{os.getpid()}/task").iterdir()
            for pid in (task / "children").read_text().split()}


def test_reader_workers_are_not_forked_from_the_trainer(tmp_path):
    """They come from a server process, started once (forking a trainer with a CUDA context
    and page-locked memory held it up 50 ms a worker at every epoch's start)."""
    columns = uneven_dataset(tmp_path)
    ds = ParquetBatches(tmp_path, "train", columns, ("binary",), 100, 0, 1, train=True, seed=1, chunk_batches=2)
    start_worker_server()
    before = _children()
    batches = iter_batches(ds, 2, pin_memory=False)
    first = next(batches)
    assert _children() == before  # no new child of this process
    assert [b.row_ids.tolist() for b in [first, *batches]] == \
        [b.row_ids.tolist() for b in iter_batches(ds, 0, pin_memory=False)]


def test_a_reader_stopped_early_frees_its_slots(tmp_path):
    columns = uneven_dataset(tmp_path)
    ds = ParquetBatches(tmp_path, "train", columns, ("binary",), 100, 0, 1, train=True, seed=1, chunk_batches=2)
    slots = ChunkSlots(2, 2, ds.chunk_bytes(), pin=False)
    batches = iter_batches(ds, 2, pin_memory=False, slots=slots)
    first = [_copy(next(batches)) for _ in range(5)]
    batches.close()  # the workers hold slots and wait for more
    again = [_copy(b) for b in iter_batches(ds, 2, pin_memory=False, slots=slots)]
    plain = list(iter_batches(ds, 0, pin_memory=False))
    assert len(again) == len(plain) > 5
    assert all(torch.equal(a.packed, b.packed) for a, b in zip(first + again, plain[:5] + plain))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_page_locked_slots_feed_the_gpu(tmp_path):
    """On a GPU machine pinned batches come from page-locked slots, copied on a side stream
    as TorchRec's pipeline does, over several rounds of slot reuse and two epochs."""
    columns = uneven_dataset(tmp_path)
    ds = ParquetBatches(tmp_path, "train", columns, ("binary",), 64, 0, 1, train=True, seed=2, chunk_batches=2)
    copies = torch.cuda.Stream()
    for epoch in range(2):
        ds.set_position(Position(epoch))
        got = []
        for batch in iter_batches(ds, 2, pin_memory=True):
            with torch.cuda.stream(copies):
                assert batch.packed.is_pinned()
                got.append(batch.to(torch.device("cuda"), non_blocking=True))
        torch.cuda.synchronize()
        plain = list(iter_batches(ds, 0, pin_memory=False))
        assert len(got) == len(plain) > 20
        assert all(torch.equal(a.packed.cpu(), b.packed) for a, b in zip(got, plain))
