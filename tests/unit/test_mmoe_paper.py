import numpy as np
import pyarrow.parquet as pq
import pytest

from app.data.schema import Schema
from app.sources.mmoe_paper import PaperSpec, _truth, draw, generate


@pytest.mark.parametrize("p", [1.0, 0.5, 0.0, -0.3])
def test_task_weights_have_the_asked_cosine(p):
    w, alpha, beta = _truth(PaperSpec(dim=20, correlation=p, scale=2.0))
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), [2.0, 2.0])
    np.testing.assert_allclose(w[0] @ w[1] / 4.0, p, atol=1e-12)
    assert alpha.shape == beta.shape == (10,)


def test_labels_follow_the_paper_formula():
    spec = PaperSpec(dim=8, correlation=0.5, noise_var=0.0)
    x, y = draw(spec, "train", 50)
    w, alpha, beta = _truth(spec)
    z = x.astype(np.float64) @ w.T
    expected = z + np.sin(alpha * z[..., None] + beta).sum(-1)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_written_data_set(tmp_path):
    spec = PaperSpec(rows={"train": 3000, "test": 200}, dim=6, correlation=1.0, buckets=5)
    generate(tmp_path, spec)
    schema = Schema.load(tmp_path)
    assert schema.labels == ["y1", "y2"] and schema.dense == [f"x{i}" for i in range(6)]
    assert schema.categorical == {"x0_bucket": 5, "x1_bucket": 5}
    table = pq.read_table(tmp_path / "train")
    assert table.num_rows == 3000
    ids = table.column("x0_bucket").to_numpy()
    assert ids.min() == 0 and ids.max() == 4
    assert abs(np.bincount(ids) / 3000 - 0.2).max() < 0.05  # equal-mass buckets of N(0, 1)
    x0 = table.column("x0").to_numpy()
    assert (np.diff(ids[np.argsort(x0)]) >= 0).all()  # ids rise with x0
    assert schema.meta["label_corr"]["train"] > 0.95  # p = 1: the same task up to noise


def test_label_correlation_falls_with_p(tmp_path):
    corr = [generate(tmp_path / str(p), PaperSpec(rows={"train": 4000}, dim=10, correlation=p)).meta
            ["label_corr"]["train"] for p in (1.0, 0.5, 0.0)]
    assert corr[0] > corr[1] > corr[2]


def test_bad_correlation():
    with pytest.raises(ValueError, match="correlation 1.5 is outside"):
        generate("unused", PaperSpec(correlation=1.5))


def test_seeds_change_directions_not_sines():
    (w0, a0, b0), (w1, a1, b1) = _truth(PaperSpec(seed=0)), _truth(PaperSpec(seed=1))
    assert not np.allclose(w0, w1)
    assert np.array_equal(a0, a1) and np.array_equal(b0, b1)
    assert not np.array_equal(a0, _truth(PaperSpec(sine_seed=1))[1])
