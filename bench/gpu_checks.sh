#!/usr/bin/env bash
# GPU acceptance runs in one go, on a machine with >= 2 GPUs and the TorchRec stack importable
# (PY=python3 by default): census on 1 and 2 GPUs (fp32, bf16, with a plan made on a CPU
# machine), the Criteo-shape config under `make train GPUS=2`, then the throughput benchmark.
# Summaries go to $OUT (default /tmp/gpu-checks); a short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}; OUT=${OUT:-/tmp/gpu-checks}; mkdir -p "$OUT"
run() {  # name, then the command; keeps the last lines of its output
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" >> "$OUT/times.txt"
  grep -v -i warn "$OUT/$name.log" | tail -3
}
census="CONFIG=configs/census_mmoe.toml PY=$PY"
run census_1gpu make train GPUS=0 $census ARGS="--train.run_dir $OUT/census_1gpu --train.resume false"
run census_2gpu make train GPUS=2 $census ARGS="--train.run_dir $OUT/census_2gpu --train.resume false"
run census_bf16 make train GPUS=0 $census ARGS="--train.run_dir $OUT/census_bf16 --train.resume false --model.precision bf16"
run census_plan make train GPUS=2 $census ARGS="--train.run_dir $OUT/census_plan --train.resume false --plan.file bench/plans/census_2gpu.json"
# Criteo shape (26 x 1M x 128): data from the benchmark's generator, then the plain launcher
run criteo_data $PY bench/train.py --skip e2e,reader,embedding,dense,naive --rows 4000000 --out "$OUT/unused.md"
data=$(ls -d /tmp/mmoe-bench/criteo_r4* | head -1)
run criteo_2gpu make train GPUS=2 CONFIG=configs/criteo_mmoe.toml PY=$PY \
  ARGS="--data.path $data --data.num_workers 6 --train.run_dir $OUT/criteo_2gpu --train.max_steps 150 --train.resume false --model.precision bf16"
if [[ "${BENCH:-1}" == 1 ]]; then
  cp bench/RESULTS.md "$OUT/RESULTS.md"
  run bench_1gpu env CUDA_VISIBLE_DEVICES=0 $PY bench/train.py --skip reader,naive --out "$OUT/RESULTS.md"
fi
echo; cat "$OUT/times.txt"
for d in "$OUT"/*/; do
  [[ -f $d/summary.json ]] && $PY -c "import json,sys; s=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-2], s['world_size'], s['steps'], round(s['samples_per_sec']), {t: round(m.get('auc', 0), 4) for t, m in s['tasks'].items()})" "$d/summary.json"
done
