import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from app.data import (Columns, ParquetBatches, Position, Schema, arrow_to_batch, consume,
                      iter_batches, rank_share, span_rows)


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
