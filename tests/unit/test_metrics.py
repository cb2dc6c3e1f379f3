import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from app.config import ModelConfig, TaskConfig
from app.heads import MMoE
from app.metrics import BinnedAUROC, EvalMetrics, TrainMetrics
from app.progress import RunLog
from app.model import _gate_stats


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


TASKS = {"click": TaskConfig(type="binary"), "watch": TaskConfig(type="regression"),
         "buy": TaskConfig(type="binary")}


def eval_data(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """preds, labels [rows, 3] for TASKS, weights [rows] with every 7th row skipped (weight 0);
    skipped rows carry values that would move every metric if they were scored."""
    g = torch.Generator().manual_seed(seed)
    preds = torch.rand(rows, 3, generator=g)
    labels = (torch.rand(rows, 3, generator=g) < preds).float()
    labels[:, 1] = preds[:, 1] + torch.randn(rows, generator=g)  # regression
    weights = torch.ones(rows)
    weights[::7] = 0
    preds[::7], labels[::7] = 0.999, 0.0
    return preds, labels, weights


def pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(a positive outscores a negative), ties counting half."""
    pos, neg = scores[labels == 1][:, None], scores[labels == 0][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def direct_eval(preds: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> dict[str, float]:
    """EvalMetrics' keys computed in numpy over the kept rows; NE as TorchRec computes it, in bits."""
    keep = weights.numpy() > 0
    p, y = preds.numpy().astype(np.float64)[keep], labels.numpy().astype(np.float64)[keep]
    out = {}
    for i, task in enumerate(TASKS):
        pi, yi = p[:, i], y[:, i]
        if TASKS[task].type == "regression":
            out[f"eval/{task}/rmse"] = np.sqrt(((pi - yi) ** 2).mean())
        else:
            q = np.clip(pi, 1e-12, 1 - 1e-12)
            bits = -(yi * np.log2(q) + (1 - yi) * np.log2(1 - q))
            rate = yi.mean()
            out[f"eval/{task}/auc"] = pairwise_auc(pi, yi)
            out[f"eval/{task}/logloss"] = bits.mean() * np.log(2)  # in nats
            out[f"eval/{task}/ne"] = bits.mean() / -(rate * np.log2(rate) + (1 - rate) * np.log2(1 - rate))
            out[f"eval/{task}/calibration"] = pi.sum() / yi.sum()
        out[f"eval/{task}/label_mean"] = yi.mean()
        out[f"eval/{task}/pred_mean"] = pi.mean()
    out["eval/mean_auc"] = (out["eval/click/auc"] + out["eval/buy/auc"]) / 2
    out["eval/rows"], out["eval/skipped_rows"] = int(keep.sum()), int((~keep).sum())
    return out


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
