#!/usr/bin/env bash
# Ablation (one H200, about 6 minutes): the same comparison with YaRN instead of position interpolation as the
# context extension. YaRN's extended model starts much closer to the reference, so the fine-tuning has less to
# learn: does the cost of learning from 40% of the targets (the floor) shrink with it, and do the informed scorers
# then beat random? Deterministic pretraining: the reference is the headline run's (position interpolation there).
#   bash benchmarks/accuracy/experiments/rope_scaling.sh BOOKS WORK OUT
set -euo pipefail
books=${1:?books folder} work=${2:?work folder} out=${3:?results folder}
. "$(dirname "$0")/_lib.sh"
modes="{\"\": {}, \"nested\": {$nested_first_half},
 \"nested-seed1\": {$nested_first_half, \"seed\": 1},
 \"lossonly\": $(lossonly 0.4)}"
runs='[["random", 0.4, "nested"], ["oracle", 0.4, "nested"], ["norm", 0.4, "nested"], ["random", 0.4, "nested-seed1"],
 ["random", 0.4, "lossonly"], ["random", 0.4, ""], ["oracle", 0.4, ""]]'
accuracy_run "$modes" "$runs" --set 'rope_scaling="yarn"'
