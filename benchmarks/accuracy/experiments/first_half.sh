#!/usr/bin/env bash
# Ablation (one H200, about 8 minutes), on one reference model: the "nested" mode (now with dense_layers
# "first_half") against the same mode with LeMo's dense last layer ("nested-auto"), against learning from the same
# 40% of targets with only the last layer sparse ("lossonly"), and a second selection seed; then the selection-bias
# measurement for both layer sets.
#   bash benchmarks/accuracy/experiments/first_half.sh BOOKS WORK OUT
set -euo pipefail
books=${1:?books folder} work=${2:?work folder} out=${3:?results folder}
nested='"loss_tokens": "processed", "nested_selection": true, "selection_window": 8'
modes="{\"\": {}, \"nested\": {$nested, \"dense_layers\": \"first_half\"}, \"nested-auto\": {$nested},
 \"nested-seed1\": {$nested, \"dense_layers\": \"first_half\", \"seed\": 1},
 \"lossonly\": {\"keep_ratio\": [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0.4], \"loss_tokens\": \"processed\",
 \"selection_window\": 8}}"
runs='[["random", 0.4, "nested"], ["oracle", 0.4, "nested"], ["norm", 0.4, "nested"], ["random", 0.4, "nested-auto"],
 ["oracle", 0.4, "nested-auto"], ["random", 0.4, "lossonly"], ["random", 0.4, "nested-seed1"]]'
python3 "$(dirname "$0")/../run.py" --books "$books" --work "$work" --out "$out" \
  --set "modes=$(echo "$modes" | tr -d '\n')" --set "runs=$(echo "$runs" | tr -d '\n')"
for layers in auto "[0, 1, 2, 3, 4, 5]"; do
  python3 "$(dirname "$0")/../selection_bias.py" --model "$work/extended" --heldout "$work/books/heldout" \
    --seq-len 8192 --rows 16 --dense-layers "$layers" --out "$out/selection-bias-$(echo "$layers" | tr -dc 'a-z0-9').json"
done
