"""What a run shows and records while it trains: the progress bar, per-task train metrics and
throughput read on log steps, evaluations, in RUN_DIR/metrics.jsonl and TensorBoard (rank 0)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from app.distributed import Env
from app.metrics import TrainMetrics
from app.model import Outputs


class RunLog:
    """Rank 0's record of a run: RUN_DIR/metrics.jsonl lines and TensorBoard scalars."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, step: int, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "epoch"):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Progress:
    """Per step: train metrics accumulated on the device, the bar moved. On log steps (every
    `log_every`): the metrics read (the one host sync), with samples/s and step time since the
    last log step, written and shown. Segments (`start`, `end`) time the training alone."""

    def __init__(self, run_dir: Path, env: Env, tasks: list[str], batch_size: int, log_every: int,
                 tensorboard: bool, step: int, total: int):
        self.env, self.tasks, self.log_every = env, tasks, log_every
        self.global_batch = batch_size * env.world_size
        self.metrics = TrainMetrics(tasks, env.device)
        self.log = RunLog(run_dir, env.rank == 0, tensorboard)
        self.bar = tqdm(total=total, initial=step, disable=env.rank != 0, unit="step", dynamic_ncols=True,
                        mininterval=1.0 if sys.stderr.isatty() else 30.0)
        self.train_time, self.samples, self.last_log = 0.0, 0, {}

    def _group_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.env.world_size == 1:
            return t
        dist.all_reduce(t)
        return t / self.env.world_size

    def start(self, step: int) -> None:
        self.start_time = self.log_time = time.perf_counter()
        self.start_step = self.log_step = step

    def update(self, step: int, out: Outputs, epoch: int) -> bool:
        """After training step `step`; True on log steps."""
        self.metrics.update(out.losses, out.gates)  # gates: None unless train.gate_stats
        self.bar.update()
        if step % self.log_every:
            return False
        now = time.perf_counter()
        rate = (step - self.log_step) * self.global_batch / (now - self.log_time)
        record = {"epoch": epoch, "samples_per_sec": rate,
                  "step_time_ms": 1000 * (now - self.log_time) / (step - self.log_step),
                  **self.metrics.read(self._group_mean)}
        if self.env.device.type == "cuda":
            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
        self.log.write(step, record)
        self.last_log, self.log_time, self.log_step = record, now, step
        self.bar.set_postfix(loss=f"{sum(record[f'train/{t}/loss'] for t in self.tasks):.4f}",
                             samples_s=f"{rate:,.0f}")
        return True

    def end(self, step: int) -> None:
        self.train_time += time.perf_counter() - self.start_time
        self.samples += (step - self.start_step) * self.global_batch

    def evaluated(self, step: int, epoch: int, result: dict[str, float]) -> None:
        self.log.write(step, {"epoch": epoch, **result})
        if self.env.rank == 0:
            self.bar.write(f"step {step}: " + " ".join(
                f"{k}={v:.4f}" for k, v in result.items()
                if k.rsplit("/", 1)[-1] in ("auc", "logloss", "ne", "calibration", "rmse")))

    def close(self) -> None:
        self.bar.close()
        self.log.close()
