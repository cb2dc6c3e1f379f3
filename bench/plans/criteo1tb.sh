#!/usr/bin/env bash
# Writes the Criteo 1TB sharding plans summarized in bench/plans/README.md: `mmoe plan` for
# configs/criteo1tb_mmoe.toml on 1 GPU of 141 and 80 GiB and 8, 16 and 64 GPUs (8 a host) of 80 and
# 141 GiB, each as plan JSON (for plan.file) and the report beside it (.txt).
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python}
export PYTHONHASHSEED=0  # the planner's pick among options of equal cost depends on string hashing
cardinality=$("$python" -c 'from app.sources.synthetic import SHAPES; print(*SHAPES["criteo1tb"][0], sep=",")')

plan() {  # world size, HBM per GPU
  local out=bench/plans/criteo1tb_${1}gpu_${2,,}
  "$python" -m app plan --config configs/criteo1tb_mmoe.toml --world-size "$1" --hbm "$2" \
    --cardinality "$cardinality" --out "$out.json" >"$out.txt"
}

plan 1 141GiB
plan 1 80GiB  # c20 and c21 in host memory behind an HBM cache
for n in 8 16 64; do
  for hbm in 80GiB 141GiB; do
    plan "$n" "$hbm"
  done
done
