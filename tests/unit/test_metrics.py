import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from app.config import ModelConfig
from app.heads import MMoE
from app.metrics import TrainMetrics
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
