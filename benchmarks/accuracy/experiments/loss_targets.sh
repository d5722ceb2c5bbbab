#!/usr/bin/env bash
# Ablation (one H200, about 9 minutes): how much of the gap to dense comes from the loss counting only the processed
# 40% of targets, and does a small weight on the skipped targets help? Then the selection-bias measurement on the
# extended model (benchmarks/accuracy/selection_bias.py).
#   bash benchmarks/accuracy/experiments/loss_targets.sh BOOKS WORK OUT
# "lossonly": only the last layer is sparse (keep 0.4), with the processed loss: the full network runs for the
# targets that count, so the run isolates learning from 40% of the targets (plus one layer of sparse attention).
set -euo pipefail
books=${1:?books folder} work=${2:?work folder} out=${3:?results folder}
. "$(dirname "$0")/_lib.sh"
modes="{\"\": {}, \"nested\": {$nested}, \"nw10\": {$nested, \"skipped_loss_weight\": 0.1},
 \"nw30\": {$nested, \"skipped_loss_weight\": 0.3}, \"seed1\": {$nested, \"seed\": 1},
 \"lossonly\": $(lossonly 0.4)}"
runs='[["random", 0.4, "nested"], ["oracle", 0.4, "nested"], ["norm", 0.4, "nested"], ["oracle", 0.4, "nw10"],
 ["random", 0.4, "nw10"], ["oracle", 0.4, "nw30"], ["random", 0.4, "lossonly"], ["oracle", 0.4, "lossonly"],
 ["random", 0.4, "seed1"]]'
accuracy_run "$modes" "$runs"
python3 "$here/../selection_bias.py" --model "$work/extended" --heldout "$work/books/heldout" --seq-len 8192 \
  --rows 16 --out "$out/selection-bias.json"
