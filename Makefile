# make train [GPUS=N] [CONFIG=configs/x.toml] [ARGS="--train.epochs 1"] | make test | make data
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
# A machine with an NVIDIA driver gets the CUDA fbgemm-gpu; others the CPU build.
FBGEMM := $(if $(shell command -v nvidia-smi),fbgemm-gpu,fbgemm-gpu-cpu)

.PHONY: venv data train test test-slow plan clean

venv: $(VENV)/.installed
$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(FBGEMM)==$(FBGEMM_VERSION)
	$(PY) -m pip install -q --no-deps torchrec==$(TORCHREC_VERSION)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -c "import torchrec, fbgemm_gpu"
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
