#!/usr/bin/env bash
# Sampled selection with inverse-probability loss weights (one H200, about 7 minutes with the predictor runs
# calibrating their own predictors: --set predictor_batches=0): the "sampled" mode is the nested mode with half of
# each sparse layer's free choices drawn uniformly at random (lemo.sampled_share 0.5) and every processed target's
# loss weighted by the inverse of its probability of being processed. Does removing the target bias let the
# informed scorers beat random? Deterministic pretraining: the reference is passkey.sh's (same recipe), so these
# rows compare with its dense and nested runs; dense is left out.
#   bash benchmarks/accuracy/experiments/sampled.sh BOOKS WORK OUT [run.py options...]
set -euo pipefail
books=${1:?books folder} work=${2:?work folder} out=${3:?results folder}
python3 "$(dirname "$0")/../run.py" --books "$books" --work "$work" --out "$out" \
  --only "oracle@0.4+sampled,predictor@0.4+sampled" "${@:4}"
