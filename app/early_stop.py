"""Early stopping on an evaluation metric (`train.early_stop`, `train.patience`), and which
evaluation was the best: its checkpoint is kept, and scoring a run folder uses it."""
from __future__ import annotations

HIGHER_IS_BETTER = ("auc",)
METRICS = ("auc", "logloss", "ne", "rmse")


class EarlyStop:
    """Tracks the best value of `metric` ("mean_auc" or "<task>/<auc|logloss|ne|rmse>"); `stopped`
    once `patience` evaluations in a row brought no improvement. `state` continues a resumed run."""

    def __init__(self, metric: str, patience: int, state: dict | None = None):
        self.metric, self.patience = metric, patience
        self.higher = metric.rsplit("/", 1)[-1].endswith(HIGHER_IS_BETTER)
        saved = (state or {}).get("best") or {}
        self.step, self.value, self.result = saved.get("step"), saved.get("value"), saved.get("result")
        self.waited = saved.get("waited", 0)
        self.stopped = bool((state or {}).get("early_stopped"))

    def update(self, step: int, result: dict[str, float]) -> bool:
        """After the evaluation at `step`; True when it is the best so far."""
        if not self.metric:
            return False
        value = result[f"eval/{self.metric}"]
        if self.value is None or (value > self.value if self.higher else value < self.value):
            self.step, self.value, self.result, self.waited = step, value, result, 0
            return True
        self.waited += 1
        self.stopped = self.waited >= self.patience
        return False

    def state(self) -> dict:
        """What a checkpoint keeps of it."""
        return {"early_stopped": self.stopped,
                "best": {"metric": self.metric, "step": self.step, "value": self.value, "waited": self.waited,
                         "result": self.result}}
