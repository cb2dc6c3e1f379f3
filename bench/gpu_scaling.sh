#!/usr/bin/env bash
# On one machine with 4 GPUs: the e2e benchmark (bf16, trainer defaults) on 1, 2 and 4 GPUs of the
# same machine: weak scaling at 8192 samples per GPU; the 1-GPU run also times the naive loop (its
# baseline). Then census AUCs (fp32 and bf16, compiled and not, at once, spread over the GPUs).
# Needs data/census (`python -m app data census`) unless CENSUS=0; COUNTS="1 2" on 2 GPUs.
# Logs and a RESULTS.md with a section per run go to $OUT; a short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}; OUT=${OUT:-/tmp/gpu-scaling}; ROWS=${ROWS:-16000000}; WORKERS=${WORKERS:-8}
mkdir -p "$OUT"
cp bench/RESULTS.md "$OUT/RESULTS.md"
for n in ${COUNTS-1 2 4}; do  # COUNTS="": census only
  t0=$SECONDS
  skip=reader,embedding,dense; [[ $n != 1 ]] && skip=$skip,naive
  CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) timeout "${LIMIT:-170}" $PY -m torch.distributed.run --standalone \
    --nproc-per-node $n bench/train.py --precision bf16 --skip $skip --rows "$ROWS" \
    --num-workers "$WORKERS" --e2e-seconds "${SECONDS_E2E:-30}" --out "$OUT/RESULTS.md" > "$OUT/e2e_$n.log" 2>&1
  echo "e2e on $n GPU(s): rc=$? $((SECONDS - t0)) s" >> "$OUT/summary.txt"
done
gpu=0; gpus=$(nvidia-smi -L | wc -l)
[[ ${CENSUS:-1} == 1 ]] && for precision in fp32 bf16; do
  for compile in off auto; do
    CUDA_VISIBLE_DEVICES=$((gpu % gpus)) timeout 240 $PY -m app train --config configs/census_mmoe.toml \
      --model.precision $precision --model.compile $compile --train.resume false \
      --train.run_dir "$OUT/census_${precision}_$compile" > "$OUT/census_${precision}_$compile.log" 2>&1 &
    gpu=$((gpu + 1))
  done
done
wait
for f in "$OUT"/census_*/summary.json; do
  [[ -f $f ]] || continue
  $PY -c "import json,sys; s=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-2], round(s['samples_per_sec']), {t: round(m['auc'], 4) for t, m in s['tasks'].items()})" "$f" >> "$OUT/summary.txt"
done
grep -E "^## |^\| (e2e|naive)|^Scaling" "$OUT/RESULTS.md" | tail -10 >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
