#!/usr/bin/env bash
# Same-machine A/B of trainer versions: the e2e benchmark (bf16, trainer defaults, 8 reader
# workers a rank) of each code tree in TREES (directories holding app/, bench/ and configs/, e.g.
# `mkdir prev && git archive HEAD app bench configs | tar -x -C prev`) on each GPU count in
# COUNTS. Rounds alternate the trees' order, so that drift of the machine hits them alike.
# Results go to $OUT/RESULTS.md; a table (median samples/s per GPU) is printed last. A run takes
# 1.5-2 minutes (compiling, the timed window, the checkpoint written when the window ends); the
# first also generates the data (about 30 s for 16M rows).
#   TREES="prev ." COUNTS="1 2" ROUNDS=2 bash bench/compare_trees.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}; OUT=${OUT:-/tmp/compare-trees}; mkdir -p "$OUT"
read -ra trees <<< "${TREES:-.}"
for round in $(seq "${ROUNDS:-1}"); do
  order=("${trees[@]}")
  (( round % 2 == 0 )) && order=($(printf '%s\n' "${trees[@]}" | tac))
  for n in ${COUNTS:-1 2}; do
    for tree in "${order[@]}"; do
      log="$OUT/$(echo "$tree" | tr -c 'a-zA-Z0-9\n' _)_${n}gpu_$round.log"
      CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) PYTHONPATH="$(realpath "$tree")${PYTHONPATH:+:$PYTHONPATH}" \
        timeout "${LIMIT:-240}" $PY -m torch.distributed.run --standalone --nproc-per-node "$n" "$tree/bench/train.py" \
        --precision bf16 --skip reader,embedding,dense,naive --rows "${ROWS:-16000000}" --num-workers 8 \
        --e2e-seconds "${SECONDS_E2E:-20}" --out "$OUT/RESULTS.md" > "$log" 2>&1
      rc=$?
      rate=$(grep -oE "e2e bf16: [0-9]+s, [0-9,]+/s" "$log" | grep -oE "[0-9,]+/s" | tr -d ,/s)
      printf "| %s | %d | %d | %s | %s |\n" "$tree" "$n" "$round" "${rate:+$((rate / n))}" "rc=$rc" >> "$OUT/summary.txt"
    done
  done
done
echo "| tree | GPUs | round | samples/s per GPU | |"
cat "$OUT/summary.txt"
