"""Per-task metrics, accumulated on the device and read only when logged.

Keys follow `split/task/metric`. Evaluation uses torchmetrics (synchronized across ranks) and
sums of its own for logloss, NE and calibration, defined as TorchRec's RecMetrics define them
(torchrec/metrics/ne.py, calibration.py). torchrec.metrics itself is not used: its `compute()`
fails with the torchmetrics releases after 1.0 (the GPU image has 1.9).
"""
from __future__ import annotations

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC

from app.config import TaskConfig

ETA = 1e-12  # TorchRec's clamp of predictions and of the label rate, so log() stays finite
BINARY = ("auc", "logloss", "ne", "calibration", "label_mean", "pred_mean")
REGRESSION = ("rmse", "label_mean", "pred_mean")


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


class EvalSums(Metric):
    """Per task, in float64 and summed over ranks: rows, loss (cross-entropy in nats for binary
    tasks, squared error for regression), labels and predictions; and the rows skipped.

    float64 because float32 counts stop being exact past 2**24 rows.
    """

    full_state_update = False

    def __init__(self, binary: list[bool]):
        super().__init__()
        self.register_buffer("binary", torch.tensor(binary), persistent=False)
        self.add_state("sums", torch.zeros(len(binary), 4, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("skipped", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, labels: torch.Tensor, skipped: torch.Tensor) -> None:
        """preds, labels: [B, T] of the rows kept; skipped: how many rows were left out."""
        p, y = preds.double(), labels.double()
        q = p.clamp(ETA, 1 - ETA)
        loss = torch.where(self.binary, -(y * q.log() + (1 - y) * (1 - q).log()), (p - y) ** 2)
        rows = p.new_full(p.shape[1:], len(p))
        self.sums += torch.stack([rows, loss.sum(0), y.sum(0), p.sum(0)], dim=1)
        self.skipped += skipped

    def compute(self) -> dict[str, torch.Tensor]:
        """Each metric as a [T] tensor (a binary task reads the keys in BINARY, a regression
        task those in REGRESSION), and the rows skipped."""
        rows, loss, label, pred = self.sums.unbind(1)
        rate = (label / rows).clamp(ETA, 1 - ETA)
        entropy = -(rate * rate.log() + (1 - rate) * (1 - rate).log())  # of always predicting the rate
        return {"logloss": loss / rows, "rmse": (loss / rows).sqrt(),
                "ne": loss / rows / entropy,  # the same in any log base; TorchRec's is in bits
                "calibration": torch.where(label > 0, pred / label, 0.0),  # 0 without positives, as TorchRec
                "label_mean": label / rows, "pred_mean": pred / rows, "rows": rows, "skipped": self.skipped}


class BinnedAUROC(Metric):
    """AUC from counts of negatives and positives in `bins` equal bins of [0, 1]: memory stays
    2 x bins whatever the split's size, where BinaryAUROC() keeps 12 bytes a row (and needs ~6x
    that to compute). It is the exact AUC of the predictions cut to their bin (ties count half);
    on census, 10,000 bins are within 1e-6 of the exact AUC. BinaryAUROC(thresholds=N) has the
    same fixed memory but compares each batch with every threshold: 17 s for census at 10,000
    bins, against 2 ms here.
    """

    full_state_update = False

    def __init__(self, bins: int):
        super().__init__()
        self.bins = bins
        self.add_state("counts", torch.zeros(2, bins, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        """preds: [B] probabilities; labels: [B] 0 or 1."""
        b = (preds.double() * self.bins).long().clamp(0, self.bins - 1) + self.bins * labels.long()
        self.counts.view(-1).index_add_(0, b, torch.ones_like(b))

    def compute(self) -> torch.Tensor:
        neg, pos = self.counts.double()
        below = neg.cumsum(0) - neg  # negatives in lower bins
        return (pos * (below + neg / 2)).sum() / (pos.sum() * neg.sum())


class EvalMetrics(nn.Module):
    """Binary tasks: AUC, logloss, NE, calibration, label and prediction means; regression:
    RMSE and the means. AUC is exact with `auc_bins` 0, else a BinnedAUROC of that many bins."""

    def __init__(self, tasks: dict[str, TaskConfig], auc_bins: int = 0):
        super().__init__()
        self.tasks = tasks
        self.auc = nn.ModuleDict({t: BinnedAUROC(auc_bins) if auc_bins else BinaryAUROC()
                                  for t, c in tasks.items() if c.type == "binary"})
        self.sums = EvalSums([c.type == "binary" for c in tasks.values()])

    def update(self, preds: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> None:
        """preds, labels: [B, T]; weights: [B], 0 for rows skipped as bad input (counted, not scored)."""
        keep = weights > 0
        preds, labels = preds[keep], labels[keep]
        self.sums.update(preds, labels, (~keep).sum())
        for i, name in enumerate(self.tasks):
            if name in self.auc:
                self.auc[name].update(preds[:, i], labels[:, i].long())

    def compute(self, split: str = "eval") -> dict[str, float]:
        # torchmetrics squeezes one-element results to scalars (one task): keep every sum a list
        sums = {k: v.reshape(-1).tolist() for k, v in self.sums.compute().items()}
        aucs = {t: float(m.compute()) for t, m in self.auc.items()}
        out: dict[str, float] = {}
        for i, (name, cfg) in enumerate(self.tasks.items()):
            for key in BINARY if cfg.type == "binary" else REGRESSION:
                out[f"{split}/{name}/{key}"] = aucs[name] if key == "auc" else sums[key][i]
        if aucs:
            out[f"{split}/mean_auc"] = sum(aucs.values()) / len(aucs)
        out[f"{split}/rows"] = int(sums["rows"][0])
        out[f"{split}/skipped_rows"] = int(sums["skipped"][0])
        return out
