#!/usr/bin/env bash
# Sampled selection with inverse-probability loss weights (one H200): the "sampled" mode is the nested mode with half
# of each sparse layer's scored picks drawn uniformly at random (lemo.sampled_share 0.5) and every processed target's
# loss weighted by the inverse of its probability of being processed. Does removing the target bias let the
# informed scorers beat random? Next to it, the nested runs of passkey.sh on the same reference, and dense.
#   bash benchmarks/accuracy/experiments/sampled.sh BOOKS WORK OUT [run.py options...]
# e.g. "--set predictor_batches=0" (each predictor run calibrates its own predictors: no offline training first).
set -euo pipefail
books=${1:?books folder} work=${2:?work folder} out=${3:?results folder}
runs='[["predictor", 0.4, "nested"], ["oracle", 0.4, "nested"], ["random", 0.4, "nested"],
 ["predictor", 0.4, "sampled"], ["oracle", 0.4, "sampled"]]'
python3 "$(dirname "$0")/../run.py" --books "$books" --work "$work" --out "$out" --set "runs=$(echo "$runs" | tr -d '\n')" \
  "${@:4}"
