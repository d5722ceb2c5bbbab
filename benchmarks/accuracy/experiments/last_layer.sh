#!/usr/bin/env bash
# Ablation (one H200, about 8 minutes): with the processed loss, should the last layer stay dense (LeMo's choice)?
# Dense, it reads the skipped rows' shallow states as keys next to the processed rows' deep ones, a mix that
# evaluation never shows it. "nested6": dense_layers 0-5 only, so layers 6-11 are sparse. Then the selection-bias
# measurement (benchmarks/accuracy/selection_bias.py, with the attention-mass alternative) for both layer sets.
#   bash benchmarks/accuracy/experiments/last_layer.sh BOOKS WORK OUT
set -euo pipefail
books=${1:?books folder} work=${2:?work folder} out=${3:?results folder}
. "$(dirname "$0")/_lib.sh"
modes="{\"\": {}, \"nested\": {$nested}, \"nested6\": {$nested, \"dense_layers\": [0, 1, 2, 3, 4, 5]},
 \"nested6-seed1\": {$nested, \"dense_layers\": [0, 1, 2, 3, 4, 5], \"seed\": 1}}"
runs='[["random", 0.4, "nested"], ["oracle", 0.4, "nested"], ["random", 0.4, "nested6"], ["oracle", 0.4, "nested6"],
 ["norm", 0.4, "nested6"], ["random", 0.4, "nested6-seed1"]]'
accuracy_run "$modes" "$runs"
selection_bias_both
