# make train [GPUS=N] [CONFIG=configs/x.toml] [ARGS="--train.epochs 1"] | make test | make data
# make venv [VARIANT=cpu|cu126|cu128|cu130]: what make train and make test install first (README)
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
# PY=python3 runs in an environment you manage yourself: nothing is installed then.
PY ?= $(VENV)/bin/python
SETUP := $(if $(filter $(VENV)/bin/python,$(PY)),venv,)
CONFIG ?= configs/census_mmoe.toml
GPUS ?= 0
ARGS ?=
TORCH_VERSION := 2.13.0
TORCHREC_VERSION := 1.8.0
FBGEMM_VERSION := 1.8.0
# make venv VARIANT=cpu|cu126|cu128|cu130: the build of torch and fbgemm-gpu, from PyTorch's index
# for that variant (https://download.pytorch.org/whl/VARIANT), as PyTorch's install guide does.
# Without VARIANT: the variant .venv was built for, else cpu. Another VARIANT rebuilds .venv.
VARIANTS := cpu cu126 cu128 cu130
BUILT_VARIANT := $(shell cat $(VENV)/variant 2>/dev/null)
VARIANT ?= $(or $(BUILT_VARIANT),cpu)
ifeq ($(filter $(VARIANT),$(VARIANTS)),)
$(error VARIANT=$(VARIANT): expected one of $(VARIANTS))
endif
TORCH_INDEX := https://download.pytorch.org/whl/$(VARIANT)
ifeq ($(VARIANT),cpu)
# PyPI ships fbgemm-gpu's CPU build as fbgemm-gpu-cpu, while torchrec's wheel requires the name
# fbgemm-gpu: a package of that name holding no code, only requiring fbgemm-gpu-cpu (as PyTorch's
# CPU index names its build fbgemm-gpu), lets `pip check` pass and keeps pip from ever pulling
# PyPI's CUDA fbgemm-gpu into this venv.
FROM_INDEX := torch==$(TORCH_VERSION)+cpu
FROM_DEFAULT := fbgemm-gpu-cpu==$(FBGEMM_VERSION) $(VENV)/fbgemm-gpu-name
else
FROM_INDEX := torch==$(TORCH_VERSION)+$(VARIANT) fbgemm-gpu==$(FBGEMM_VERSION)
FROM_DEFAULT :=
endif
define FBGEMM_NAME
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"
[project]
name = "fbgemm-gpu"
version = "$(FBGEMM_VERSION)+cpu"
description = "The name torchrec requires, for PyPI's fbgemm-gpu-cpu; holds no code"
dependencies = ["fbgemm-gpu-cpu==$(FBGEMM_VERSION)"]
[tool.setuptools]
py-modules = []
endef
export FBGEMM_NAME

# After installing: torch is the variant's build, and a CUDA build can use the GPU when there
# is one (nvidia-smi lists it and CUDA_VISIBLE_DEVICES does not hide it).
define CHECK_VARIANT
import os, shutil, subprocess, sys
import torch, fbgemm_gpu, torchrec
variant, cuda = sys.argv[1], torch.version.cuda
fbgemm = getattr(fbgemm_gpu, "__variant__", "?")
print(f"torch {torch.__version__} (CUDA {cuda}), fbgemm_gpu {fbgemm_gpu.__version__} ({fbgemm}), "
      f"torchrec {torchrec.__version__}")
want = None if variant == "cpu" else f"{variant[2:-1]}.{variant[-1]}"
if cuda != want or fbgemm != ("cpu" if want is None else "cuda"):
    sys.exit(f"error: VARIANT={variant} wants CUDA {want}; torch has CUDA {cuda}, fbgemm_gpu is a {fbgemm} build")
smi = shutil.which("nvidia-smi")
gpus = subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.count("GPU ") if smi else 0
hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1")
if gpus and not hidden and variant == "cpu":
    print(f"warning: this machine has {gpus} NVIDIA GPU(s), and VARIANT=cpu installed torch without CUDA; "
          "for the GPU: make venv VARIANT=cu130 (or cu128, cu126)")
elif gpus and not hidden and not torch.cuda.is_available():
    driver = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.split()
    sys.exit(f"error: torch {torch.__version__} cannot use this machine's {gpus} GPU(s) "
             f"(NVIDIA driver {driver[0] if driver else '?'}): the driver may be too old for CUDA {cuda}; "
             "update it, or make venv with a VARIANT of an older CUDA")
endef
export CHECK_VARIANT

.PHONY: venv data train test test-slow plan clean

# torch (and CUDA's fbgemm-gpu) come from the variant's index without dependencies, then the
# default index resolves their dependencies and this package's. torchrec goes in with --no-deps:
# its wheel requires the name fbgemm-gpu (which would pull PyPI's CUDA fbgemm-gpu into a CPU
# install); its other requirements are pinned in setup.cfg (torchmetrics at its 1.0.3).
venv: $(VENV)/.installed-$(VARIANT)
$(VENV)/.installed-$(VARIANT): setup.cfg pyproject.toml Makefile
	@if [[ -d $(VENV) && "$$(cat $(VENV)/variant 2>/dev/null)" != $(VARIANT) ]]; then \
	  echo "$(VENV) is not a VARIANT=$(VARIANT) build: making it again"; rm -rf $(VENV); fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	echo $(VARIANT) > $(VENV)/variant
	$(PY) -m pip install -q --upgrade pip
	mkdir -p $(VENV)/fbgemm-gpu-name && echo "$$FBGEMM_NAME" > $(VENV)/fbgemm-gpu-name/pyproject.toml
	$(PY) -m pip install -q --no-deps --index-url $(TORCH_INDEX) $(FROM_INDEX)
	$(PY) -m pip install -q $(FROM_INDEX) $(FROM_DEFAULT) -e '.[test]'
	$(PY) -m pip install -q --no-deps torchrec==$(TORCHREC_VERSION)
	$(PY) -m pip check
	$(PY) -c "$$CHECK_VARIANT" $(VARIANT)
	touch $@

data: $(SETUP)
	$(PY) -m app data census

# GPUS=0: one process (CPU, or the GPU when there is one); GPUS=N: N ranks under torchrun
# (gloo CPU ranks on a machine without GPUs).
train: $(SETUP)
	@if grep -q '"data/census"' $(CONFIG); then $(PY) -m app data census; fi
ifeq ($(GPUS),0)
	$(PY) -m app train --config $(CONFIG) $(ARGS)
else
	$(PY) -m torch.distributed.run --standalone --nproc-per-node $(GPUS) -m app train --config $(CONFIG) $(ARGS)
endif

test: $(SETUP)
	$(PY) -m pytest -q $(ARGS)

test-slow: $(SETUP)
	$(PY) -m pytest -q -m slow $(ARGS)

# make plan GPUS=N [CONFIG=...] [ARGS="--cardinality 1000000 --hbm 80GiB --out plan.json"]:
# the sharding planner's dry run for N ranks (GPUS=0: one), on any machine; see `mmoe plan --help`
plan: $(SETUP)
	$(PY) -m app plan --config $(CONFIG) --world-size $(if $(filter 0,$(GPUS)),1,$(GPUS)) $(ARGS)

clean:
	rm -rf runs

# make report [RUN=runs/x]: RUN/report.md with loss, AUC, throughput and gate plots
RUN ?= runs/census_mmoe
.PHONY: report
report: $(SETUP)
	$(PY) -m app report $(RUN)

# make bench-data [ARGS="--rows 4000000 --convert-mb 1000"]: reader samples/s against pyarrow's
# raw read, and the TSV converter's speed and peak memory; writes bench/DATA.md
.PHONY: bench-data
bench-data: $(SETUP)
	$(PY) bench/data.py $(ARGS)

# make bench [GPUS=N] [ARGS="--skip naive --precision bf16"]: training throughput (end to end, and
# reader, embeddings, dense head and a naive loop alone), appended to bench/RESULTS.md; GPUS=0: one
# process (small sizes on a machine without GPUs), GPUS=N: N ranks under torchrun
.PHONY: bench
bench: $(SETUP)
ifeq ($(GPUS),0)
	$(PY) bench/train.py $(ARGS)
else
	$(PY) -m torch.distributed.run --standalone --nproc-per-node $(GPUS) bench/train.py $(ARGS)
endif
