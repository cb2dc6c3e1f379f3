#!/usr/bin/env bash
# The Criteo-shape training step, bf16, one process, under several trainer variants
# (bench/profile_step.py: ms/step from Parquet and from memory, GPU busy time, top ops).
# VARIANTS is "name=profile_step options;name=options;..."; logs and traces go to $OUT
# (default /tmp/profile-variants); a short table is printed last.
#   bash bench/profile_variants.sh
#   VARIANTS="plain=;ddp=--ddp" bash bench/profile_variants.sh      # DDP's cost on one rank
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}; OUT=${OUT:-/tmp/profile-variants}; mkdir -p "$OUT"
IFS=';' read -ra variants <<< "${VARIANTS:-reduce-overhead=--compile reduce-overhead;default=--compile default;off=--compile off}"
for variant in "${variants[@]}"; do
  name=${variant%%=*}; read -ra opts <<< "${variant#*=}"
  t0=$SECONDS
  timeout "${LIMIT:-240}" $PY bench/profile_step.py --precision bf16 --rows "${ROWS:-4000000}" "${opts[@]}" \
    --trace "$OUT/trace_$name.json.gz" > "$OUT/$name.log" 2>&1
  echo "$name (${opts[*]}): rc=$? $((SECONDS - t0)) s" >> "$OUT/summary.txt"
  grep -E "warm-up|GPU busy|^\| (parquet|memory|bare) " "$OUT/$name.log" >> "$OUT/summary.txt"
done
cat "$OUT/summary.txt"
