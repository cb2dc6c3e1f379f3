"""Per-task metrics, accumulated on the device and read only when logged.

Keys follow `split/task/metric`. Evaluation uses torchmetrics (exact AUC over the whole
split, synchronized across ranks); torchrec.metrics is not used because its `compute()`
fails with the torchmetrics/lightning-utilities releases torchrec 1.8 installs beside.
"""
from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import BinaryAUROC

from app.config import TaskConfig


class TrainMetrics:
    """Running sums of per-task losses (and gate statistics) since the last `take`, on the device."""

    def __init__(self, tasks: list[str], device: torch.device):
        self.tasks = tasks
        self.losses = torch.zeros(len(tasks), device=device)
        self.gates: torch.Tensor | None = None  # [T, E + 1]
        self.steps = 0

    def update(self, losses: torch.Tensor, gates: torch.Tensor | None) -> None:
        self.losses += losses
        if gates is not None:
            self.gates = gates.clone() if self.gates is None else self.gates + gates
        self.steps += 1

    def take(self) -> tuple[torch.Tensor, list[str]]:
        """(means since the last take, still on the device, and their names); starts over. The
        caller reads them (a host sync) when it likes."""
        n = max(self.steps, 1)
        names = [f"train/{t}/loss" for t in self.tasks]
        parts = [self.losses / n]
        if self.gates is not None:
            experts = self.gates.shape[1] - 1
            names += [f"train/{t}/{k}" for t in self.tasks
                      for k in [*(f"gate_e{e}" for e in range(experts)), "gate_entropy"]]
            parts.append(self.gates.flatten() / n)
        self.losses.zero_()
        self.gates, self.steps = None, 0
        return torch.cat(parts), names


class EvalMetrics(nn.Module):
    """AUC, logloss, label and prediction means (binary); RMSE and means (regression)."""

    def __init__(self, tasks: dict[str, TaskConfig]):
        super().__init__()
        self.tasks = tasks
        self.auc = nn.ModuleDict({t: BinaryAUROC() for t, c in tasks.items() if c.type == "binary"})
        self.loss = nn.ModuleDict({t: MeanMetric() for t in tasks})  # logloss or squared error
        self.label_mean = nn.ModuleDict({t: MeanMetric() for t in tasks})
        self.pred_mean = nn.ModuleDict({t: MeanMetric() for t in tasks})
        self.rows = SumMetric()
        self.skipped = SumMetric()

    def update(self, preds: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> None:
        keep = weights > 0  # rows skipped as bad input are counted, not scored
        self.rows.update(keep.sum())
        self.skipped.update((~keep).sum())
        preds, labels = preds[keep], labels[keep]
        for i, (name, cfg) in enumerate(self.tasks.items()):
            p, y = preds[:, i], labels[:, i]
            if cfg.type == "binary":
                self.auc[name].update(p, y.long())
                err = nn.functional.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), y, reduction="none")
            else:
                err = (p - y) ** 2
            self.loss[name].update(err)
            self.label_mean[name].update(y)
            self.pred_mean[name].update(p)

    def compute(self, split: str = "eval") -> dict[str, float]:
        out: dict[str, float] = {}
        aucs = []
        for name, cfg in self.tasks.items():
            loss = float(self.loss[name].compute())
            if cfg.type == "binary":
                aucs.append(float(self.auc[name].compute()))
                out[f"{split}/{name}/auc"] = aucs[-1]
                out[f"{split}/{name}/logloss"] = loss
            else:
                out[f"{split}/{name}/rmse"] = loss ** 0.5
            out[f"{split}/{name}/label_mean"] = float(self.label_mean[name].compute())
            out[f"{split}/{name}/pred_mean"] = float(self.pred_mean[name].compute())
        if aucs:
            out[f"{split}/mean_auc"] = sum(aucs) / len(aucs)
        out[f"{split}/rows"] = int(self.rows.compute())
        out[f"{split}/skipped_rows"] = int(self.skipped.compute())
        return out
