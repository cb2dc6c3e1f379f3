"""A machine with GPUs that torch cannot use stops with one line instead of training on the CPU."""
import pytest
import torch

from app import distributed
from app.config import ConfigError


def fake_nvidia_smi(monkeypatch, gpus: int):
    monkeypatch.setattr(distributed.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    listing = "".join(f"GPU {i}: NVIDIA H200 (UUID: GPU-{i})\n" for i in range(gpus))
    monkeypatch.setattr(distributed.subprocess, "run",
                        lambda *a, **k: type("Done", (), {"stdout": listing})())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_gpus_torch_cannot_use_are_an_error(monkeypatch):
    fake_nvidia_smi(monkeypatch, 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    for device in ("auto", "cuda"):
        with pytest.raises(ConfigError, match=rf"train.device is '{device}' and this machine has 2 NVIDIA GPU\(s\), "
                                              r"but torch .* is a CPU build: `make venv VARIANT=cu130`"):
            distributed._no_silent_cpu_run(device)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(ConfigError, match=r"cannot use them: the NVIDIA driver may be too old for CUDA 13.0"):
        distributed._no_silent_cpu_run("auto")


def test_no_gpu_or_hidden_gpus_train_on_the_cpu(monkeypatch):
    fake_nvidia_smi(monkeypatch, 0)
    distributed._no_silent_cpu_run("auto")  # a CPU machine
    fake_nvidia_smi(monkeypatch, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    distributed._no_silent_cpu_run("auto")  # GPUs hidden on purpose
