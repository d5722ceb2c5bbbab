#!/usr/bin/env bash
# Predictor training variants on the accuracy benchmark's model, trained at once on one GPU.
#
#   bash benchmarks/accuracy/predictor_sweep.sh OUT_DIR NAME:BATCHES:UPDATES:PREDICTOR_JSON [...]
#   e.g. bash benchmarks/accuracy/predictor_sweep.sh $OUT 'b128:128:20:{}' 'o64:128:20:{"out_rank": 64}'
#
# Builds the reference model and its 8x extension as benchmarks/accuracy/run.py does (books from $BOOKS, default
# ../shared/data/gutenberg; work dir $WORK, default /tmp/acc), then runs launch/train_predictor.py once per
# variant (keep 0.4, block 64, 8192-token rows, 16 held-out batches, seed 0; PREDICTOR_JSON is the config's
# "lemo.predictor" section) and writes every variant's held-out recall table to OUT_DIR/summary.md.
set -eu
out=$1; shift
books=${BOOKS:-../shared/data/gutenberg}
work=${WORK:-/tmp/acc}
mkdir -p "$out"
python3 benchmarks/accuracy/run.py --books "$books" --work "$work" --out "$work/out" --only dense \
  --set finetune_steps=5 > "$out/pipeline.log" 2>&1
for spec in "$@"; do
  IFS=: read -r name batches updates section <<< "$spec"
  echo "{\"lemo\": {\"keep_ratio\": 0.4, \"scorer\": \"predictor\", \"block_size\": 64, \"predictor\": $section}}" \
    > "$work/sweep_$name.json"
  python3 launch/train_predictor.py --model "$work/extended" --data "$work/finetune" --deepspeed "$work/sweep_$name.json" \
    --seq-len 8192 --batches "$batches" --updates "$updates" --eval-batches 16 --seed 0 \
    --out "$work/sweep_$name.safetensors" > "$work/sweep_$name.log" 2>&1 &
done
wait
for spec in "$@"; do
  name=${spec%%:*}
  echo "== $name: $spec"; grep -A9 "held-out top-k" "$work/sweep_$name.log" || tail -5 "$work/sweep_$name.log"
done | tee "$out/summary.md"
