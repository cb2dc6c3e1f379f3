"""What a run shows and records while it trains: the progress bar, per-task train metrics and
throughput read on log steps, evaluations, in RUN_DIR/metrics.jsonl and TensorBoard (rank 0)."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from app.data.errors import DataError
from app.distributed import Env
from app.metrics import TrainMetrics
from app.model import Outputs

log = logging.getLogger("app")
SKIPPED_WARNING = 0.01  # share of skipped train rows that gets a warning


def _to_host(values: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A copy of `values` in host memory, made without waiting for the GPU, and the event that
    marks it done (None: already done)."""
    if not values.is_cuda:
        return values, None
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


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
    `log_every`): samples/s and step time since the last log step, and the metrics averaged over
    the ranks on the device and copied to the host without waiting; they are written and shown
    at the next log step (or the segment's end), when the copy is long done, so that the host
    never waits for the GPU and can stay steps ahead of it. Segments (`start`, `end`) time the
    training alone.

    With `skip_limit` (data.on_bad_rows = "skip"), rows skipped as bad input (weight 0) are
    counted too: a warning past 1% of the train rows read since the run started or resumed,
    and past `skip_limit` a `failure` the trainer stops on (every rank sees the same sums)."""

    def __init__(self, run_dir: Path, env: Env, tasks: list[str], batch_size: int, log_every: int,
                 tensorboard: bool, step: int, total: int, skip_limit: float | None = None):
        self.env, self.tasks, self.log_every = env, tasks, log_every
        self.global_batch = batch_size * env.world_size
        self.metrics = TrainMetrics(tasks, env.device)
        self.log = RunLog(run_dir, env.rank == 0, tensorboard)
        self.bar = tqdm(total=total, initial=step, disable=env.rank != 0, unit="step", dynamic_ncols=True,
                        mininterval=1.0 if sys.stderr.isatty() else 30.0)
        self.train_time, self.samples, self.last_log = 0.0, 0, {}
        self.skip_limit, self.failure = skip_limit, None
        self._skipped = torch.zeros((), dtype=torch.int64, device=env.device) if skip_limit is not None else None
        self._rows = 0  # this rank's, since the last log step
        self._pending = None  # the last log step's record, its numbers on their way to the host
        self.skipped_rows = self.read_rows = 0  # over all ranks, as of the last log step

    def start(self, step: int) -> None:
        self.start_time = self.log_time = time.perf_counter()
        self.start_step = self.log_step = step

    def update(self, step: int, out: Outputs, epoch: int) -> bool:
        """After training step `step`; True on log steps."""
        self.metrics.update(out.losses, out.gates)  # gates: None unless train.gate_stats
        if self._skipped is not None:
            self._skipped += (out.weights == 0).sum()
            self._rows += len(out.weights)
        self.bar.update()
        if step % self.log_every:
            return False
        self._write_pending()
        now = time.perf_counter()
        rate = (step - self.log_step) * self.global_batch / (now - self.log_time)
        record = {"epoch": epoch, "samples_per_sec": rate,
                  "step_time_ms": 1000 * (now - self.log_time) / (step - self.log_step)}
        if self.env.device.type == "cuda":
            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
        values, names = self.metrics.take()
        values = values.double()
        if self._skipped is not None:
            values = torch.cat([values, self._skipped.double().view(1), values.new_tensor([self._rows])])
            self._skipped.zero_()
            self._rows = 0
        self._pending = (step, record, names, _to_host(self._group_sum(values)))
        self.log_time, self.log_step = now, step
        return True

    def _write_pending(self) -> None:
        """Writes the last log step's record, once its numbers are on the host."""
        if self._pending is None:
            return
        step, record, names, (host, copied) = self._pending
        self._pending = None
        if copied is not None:
            copied.synchronize()  # made a log interval ago: done, unless the GPU fell that far behind
        values = host.tolist()
        record.update({k: v / self.env.world_size for k, v in zip(names, values)})  # means over the ranks
        if self._skipped is not None:
            record.update(self._count_skipped(*values[len(names):]))
        self.log.write(step, record)
        self.last_log = record
        self.bar.set_postfix(loss=f"{sum(record[f'train/{t}/loss'] for t in self.tasks):.4f}",
                             samples_s=f"{record['samples_per_sec']:,.0f}")

    def _count_skipped(self, skipped: float, rows: float) -> dict[str, float]:
        before = self.skipped_rows / max(self.read_rows, 1)
        self.skipped_rows, self.read_rows = self.skipped_rows + int(skipped), self.read_rows + int(rows)
        share = self.skipped_rows / self.read_rows
        if share > self.skip_limit:
            self.failure = DataError(
                f"{share:.1%} of the {self.read_rows:,} train rows read so far were skipped as bad input, more "
                f"than data.max_skipped_fraction {self.skip_limit:g}: fix the data (`mmoe data check` lists "
                f"it) or check the schema's cardinalities; raise the limit to accept it")
        elif share > SKIPPED_WARNING >= before and self.env.rank == 0:
            log.warning("%.1f%% of the train rows read so far were skipped as bad input (data.on_bad_rows "
                        "= \"skip\"); the run stops past data.max_skipped_fraction %g", 100 * share, self.skip_limit)
        return {"train/skipped_rows": self.skipped_rows, "train/skipped_fraction": share}

    def _group_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.env.world_size > 1:
            dist.all_reduce(t)
        return t

    def end(self, step: int) -> None:
        self._write_pending()
        self.train_time += time.perf_counter() - self.start_time
        self.samples += (step - self.start_step) * self.global_batch

    def evaluated(self, step: int, epoch: int, result: dict[str, float]) -> None:
        self.log.write(step, {"epoch": epoch, **result})
        if self.env.rank == 0:
            self.bar.write(f"step {step}: " + " ".join(
                f"{k}={v:.4f}" for k, v in result.items()
                if k.rsplit("/", 1)[-1] in ("auc", "logloss", "ne", "calibration", "rmse")))

    def close(self) -> None:
        self._write_pending()
        self.bar.close()
        self.log.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # before an error is printed, so that it stands on a line of its own
