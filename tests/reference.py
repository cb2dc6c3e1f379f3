"""Evaluation metrics computed from their definitions in numpy, for tests to hold the app's
metrics (torchmetrics, summed over ranks) against, and the scored rows they are checked on."""
from __future__ import annotations

import numpy as np
import torch

from app.config import TaskConfig

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


def direct_eval(preds, labels, weights, tasks: dict[str, TaskConfig] = TASKS,
                split: str = "eval") -> dict[str, float]:
    """EvalMetrics' keys computed in numpy over the kept rows of preds, labels [N, T] and
    weights [N] (tensors or arrays); NE as TorchRec computes it, in bits."""
    keep = np.asarray(weights) > 0
    p, y = np.asarray(preds, np.float64)[keep], np.asarray(labels, np.float64)[keep]
    out = {}
    for i, (task, cfg) in enumerate(tasks.items()):
        pi, yi = p[:, i], y[:, i]
        if cfg.type == "regression":
            out[f"{split}/{task}/rmse"] = np.sqrt(((pi - yi) ** 2).mean())
        else:
            q = np.clip(pi, 1e-12, 1 - 1e-12)
            bits = -(yi * np.log2(q) + (1 - yi) * np.log2(1 - q))
            rate = yi.mean()
            out[f"{split}/{task}/auc"] = pairwise_auc(pi, yi)
            out[f"{split}/{task}/logloss"] = bits.mean() * np.log(2)  # in nats
            out[f"{split}/{task}/ne"] = bits.mean() / -(rate * np.log2(rate) + (1 - rate) * np.log2(1 - rate))
            out[f"{split}/{task}/calibration"] = pi.sum() / yi.sum()
        out[f"{split}/{task}/label_mean"] = yi.mean()
        out[f"{split}/{task}/pred_mean"] = pi.mean()
    aucs = [v for k, v in out.items() if k.endswith("/auc")]
    if aucs:
        out[f"{split}/mean_auc"] = float(np.mean(aucs))
    out[f"{split}/rows"], out[f"{split}/skipped_rows"] = int(keep.sum()), int((~keep).sum())
    return out
