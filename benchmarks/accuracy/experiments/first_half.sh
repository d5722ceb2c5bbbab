#!/usr/bin/env bash
# Ablation (one H200, about 8 minutes), on one reference model: the "nested" mode (now with dense_layers
# "first_half") against the same mode with LeMo's dense last layer ("nested-auto"), against learning from the same
# 40% of targets with only the last layer sparse ("lossonly"), and a second selection seed; then the selection-bias
# measurement for both layer sets.
#   bash benchmarks/accuracy/experiments/first_half.sh BOOKS WORK OUT
set -euo pipefail
books=${1:?books folder} work=${2:?work folder} out=${3:?results folder}
. "$(dirname "$0")/_lib.sh"
modes="{\"\": {}, \"nested\": {$nested_first_half}, \"nested-auto\": {$nested},
 \"nested-seed1\": {$nested_first_half, \"seed\": 1},
 \"lossonly\": $(lossonly 0.4)}"
runs='[["random", 0.4, "nested"], ["oracle", 0.4, "nested"], ["norm", 0.4, "nested"], ["random", 0.4, "nested-auto"],
 ["oracle", 0.4, "nested-auto"], ["random", 0.4, "lossonly"], ["random", 0.4, "nested-seed1"]]'
accuracy_run "$modes" "$runs"
selection_bias_both
