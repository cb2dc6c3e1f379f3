"""The process group: torchrun's, or a one-process group of its own when run alone; and the
stop signal every rank agrees on."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from app.config import ConfigError


@dataclass
class Env:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    # gloo ranks' own group, or a gloo group beside NCCL: what the hosts tell each other every
    # step (counts, agreement on bad input) goes there, not through the GPU; None on one rank
    host_group: dist.ProcessGroup | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str) -> Env:
    """Joins torchrun's process group, or makes a one-process group when run alone."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if device != "cpu" and not torch.cuda.is_available():
        _no_silent_cpu_run(device)
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None,
                                store=_attempt_store(world), rank=rank, world_size=world)
    host = None if world == 1 else dist.new_group(backend="gloo") if use_cuda else dist.group.WORLD
    return Env(rank, world, local_rank, local_world, dev, host)


def _visible_gpus() -> int:
    """NVIDIA GPUs this process may use, without asking torch."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1", "NoDevFiles"):
        return 0
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
            return sum(line.startswith("GPU ") for line in out.splitlines())
        except (OSError, subprocess.SubprocessError):
            pass
    return len(glob.glob("/dev/nvidia[0-9]*"))


def _no_silent_cpu_run(device: str) -> None:
    """A machine with GPUs that torch cannot use is an error, not a CPU run (`train.device`)."""
    gpus = _visible_gpus()
    if not gpus and device == "auto":
        return
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU build: `make venv VARIANT=cu130` (or cu128, cu126)"
    else:
        why = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use them: the NVIDIA driver "
               f"may be too old for CUDA {torch.version.cuda}; update it, or `make venv` with an older VARIANT")
    raise ConfigError(f"train.device is {device!r} and this machine has {gpus} NVIDIA GPU(s), but {why}, "
                      f"or --train.device cpu to train on the CPU")


def _attempt_store(world: int) -> dist.Store | None:
    """Under torchrun the agent's store outlives a restart of the workers, and the process
    group writes the same keys in every attempt: a restarted rank could read a dead rank's
    address and fail or hang connecting. Each attempt gets keys of its own."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # env:// makes a fresh store
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=False, timeout=default_pg_timeout)
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


class StopSignal:
    """SIGTERM/SIGUSR1 (preemption, Slurm's warning) ask for a checkpoint and a clean exit."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def agreed(self, env: Env) -> bool:
        """True on every rank once any rank got the signal: the ranks' hosts agree over
        `env.host_group`, without waiting for the GPU."""
        if env.world_size == 1:
            return self.raised
        flag = torch.tensor([int(self.raised)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=env.host_group)
        return bool(flag.item())