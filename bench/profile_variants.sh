#!/usr/bin/env bash
# The Criteo-shape training step, bf16, under several trainer variants and rank counts
# (bench/profile_step.py: ms/step from Parquet and from memory, GPU busy time, each rank's host
# time by pipeline phase, top ops). VARIANTS is "name[:ranks]=profile_step options;..." (ranks
# default 1; options after "--" go to the trainer's config, one word each). Logs go to $OUT
# (default /tmp/profile-variants); a short table is printed last.
#   bash bench/profile_variants.sh
#   VARIANTS="one=;two:2=" bash bench/profile_variants.sh          # one rank against two
#   VARIANTS="one=;two:2=;tw=-- --plan.sharding_types [\"table_wise\"]" bash bench/profile_variants.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}; OUT=${OUT:-/tmp/profile-variants}; mkdir -p "$OUT"
IFS=';' read -ra variants <<< "${VARIANTS:-reduce-overhead=--compile reduce-overhead;default=--compile default;off=--compile off}"
for variant in "${variants[@]}"; do
  name=${variant%%=*}; read -ra opts <<< "${variant#*=}"
  ranks=1; [[ $name == *:* ]] && ranks=${name#*:} && name=${name%%:*}
  t0=$SECONDS
  timeout "${LIMIT:-240}" $PY -m torch.distributed.run --standalone --nproc-per-node "$ranks" \
    bench/profile_step.py --precision bf16 --rows "${ROWS:-4000000}" "${opts[@]}" > "$OUT/$name.log" 2>&1
  echo "$name ($ranks rank(s): ${opts[*]}): rc=$? $((SECONDS - t0)) s" >> "$OUT/summary.txt"
  grep -E "warm-up|GPU busy|^rank . host|^\| (parquet|memory|bare) " "$OUT/$name.log" >> "$OUT/summary.txt"
  grep -ci "skipping cudagraphs" "$OUT/$name.log" | sed 's/^/  lines saying "skipping cudagraphs": /' >> "$OUT/summary.txt"
done
cat "$OUT/summary.txt"
