import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from app.config import ModelConfig, TaskConfig
from app.heads import MMoE
from app.metrics import BinnedAUROC, EvalMetrics, TrainMetrics
from app.progress import RunLog
from app.model import _gate_stats
from reference import TASKS, direct_eval, eval_data, pairwise_auc


def test_gate_statistics_equal_a_direct_computation():
    torch.manual_seed(0)
    head = MMoE(12, 2, ModelConfig(num_experts=3, expert_layers=[8]))
    x = torch.randn(5, 12)
    weights = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])  # row 2 was skipped as bad input
    _, gates = head(x)
    stats = _gate_stats(gates, weights.unsqueeze(1))  # [T, E + 1]; the trainer passes [B, 1]
    direct = head.gates(x).view(5, 2, 3).softmax(-1)[weights > 0]  # [4, T, E]
    torch.testing.assert_close(stats[:, :3], direct.mean(0))
    entropy = -(direct * direct.log()).sum(-1).mean(0)
    torch.testing.assert_close(stats[:, 3], entropy)
    torch.testing.assert_close(stats[:, :3].sum(1), torch.ones(2))


def test_train_metrics_average_since_the_last_take():
    m = TrainMetrics(["a", "b"], torch.device("cpu"))
    m.update(torch.tensor([1.0, 2.0]), torch.tensor([[0.25, 0.75, 0.5], [1.0, 0.0, 0.0]]))
    m.update(torch.tensor([3.0, 4.0]), torch.tensor([[0.75, 0.25, 0.5], [1.0, 0.0, 0.0]]))
    values, names = m.take()
    out = dict(zip(names, values.tolist()))
    assert out == {"train/a/loss": 2.0, "train/b/loss": 3.0, "train/a/gate_e0": 0.5, "train/a/gate_e1": 0.5,
                   "train/a/gate_entropy": 0.5, "train/b/gate_e0": 1.0, "train/b/gate_e1": 0.0,
                   "train/b/gate_entropy": 0.0}
    values, names = m.take()
    assert names == ["train/a/loss", "train/b/loss"] and values.tolist() == [0.0, 0.0]  # reset


def test_event_files_hold_the_logged_tags(tmp_path):
    log = RunLog(tmp_path, enabled=True, tensorboard=True)
    log.write(10, {"epoch": 0, "train/ctr/loss": 0.5, "samples_per_sec": 100.0, "train/ctr/gate_e0": 0.4})
    log.write(20, {"epoch": 0, "eval/ctr/auc": 0.7})
    log.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/ctr/loss", "samples_per_sec", "train/ctr/gate_e0", "eval/ctr/auc"} <= tags
    assert "epoch" not in tags
    assert [e.value for e in events.Scalars("eval/ctr/auc")] == [0.699999988079071]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2


def test_eval_metrics_equal_a_direct_computation():
    preds, labels, weights = eval_data(300, seed=0)
    metrics = EvalMetrics(TASKS)
    for chunk in torch.arange(300).split(128):  # several batches, the last one short
        metrics.update(preds[chunk], labels[chunk], weights[chunk])
    got, want = metrics.compute(), direct_eval(preds, labels, weights)
    assert list(got) == list(want)
    assert got["eval/rows"] == 257 and got["eval/skipped_rows"] == 43
    assert got == pytest.approx(want, rel=1e-6)
    assert 0.5 < got["eval/click/ne"] < 1.0  # labels drawn from the predictions: better than the rate


def test_binned_auc_is_the_auc_of_the_binned_predictions():
    preds, labels, _ = eval_data(2000, seed=1)
    p, y = preds[:, 0], labels[:, 0].long()
    p[:3] = torch.tensor([0.0, 1.0, 0.5])  # the ends fall into the first and last bins
    for bins in (7, 100, 100_000):
        auc = BinnedAUROC(bins)
        auc.update(p[:1000], y[:1000])
        auc.update(p[1000:], y[1000:])
        binned = np.minimum(np.floor(p.double().numpy() * bins), bins - 1)
        assert float(auc.compute()) == pytest.approx(pairwise_auc(binned, y.numpy()), rel=1e-12)
    assert float(auc.compute()) == pytest.approx(pairwise_auc(p.numpy(), y.numpy()), abs=1e-5)


def test_eval_metrics_with_binned_auc():
    preds, labels, weights = eval_data(300, seed=2)
    exact, binned = EvalMetrics(TASKS), EvalMetrics(TASKS, auc_bins=100_000)
    for m in (exact, binned):
        m.update(preds, labels, weights)
    assert binned.compute() == pytest.approx(exact.compute(), abs=1e-4)
    assert isinstance(binned.auc["click"], BinnedAUROC) and "watch" not in binned.auc


def test_auc_counts_ties_as_one_half():
    """9 (positive, negative) pairs: 7 ordered, 2 tied at 0.4 (task a); the same scores with
    the labels flipped (task b)."""
    scores = torch.tensor([0.1, 0.4, 0.4, 0.8, 0.4, 0.9])
    labels = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    assert pairwise_auc(scores.numpy(), labels.numpy()) == pytest.approx(8 / 9)
    metrics = EvalMetrics({"a": TaskConfig(), "b": TaskConfig()})
    metrics.update(torch.stack([scores, scores], 1), torch.stack([labels, 1 - labels], 1), torch.ones(6))
    got = metrics.compute()
    assert (got["eval/a/auc"], got["eval/b/auc"]) == pytest.approx((8 / 9, 1 / 9), rel=1e-6)


def test_eval_metrics_of_a_single_task():
    preds, labels, weights = eval_data(100, seed=4)
    metrics = EvalMetrics({"click": TaskConfig()})
    metrics.update(preds[:, :1], labels[:, :1], weights)
    want = direct_eval(preds[:, :1], labels[:, :1], weights, {"click": TaskConfig()})
    assert metrics.compute() == pytest.approx(want, rel=1e-6)


def test_eval_metrics_with_ties_and_an_empty_batch():
    """Binary predictions on a grid of 0.05 (many ties), batches of several sizes, one empty."""
    preds, labels, weights = eval_data(400, seed=3)
    preds[:, [0, 2]] = (preds[:, [0, 2]] * 20).round().clamp(1, 19) / 20
    metrics = EvalMetrics(TASKS)
    for a, b in [(0, 150), (150, 150), (150, 330), (330, 400)]:
        metrics.update(preds[a:b], labels[a:b], weights[a:b])
    assert metrics.compute() == pytest.approx(direct_eval(preds, labels, weights), rel=1e-6)
