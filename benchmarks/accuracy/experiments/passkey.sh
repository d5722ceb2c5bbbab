#!/usr/bin/env bash
# Passkey retrieval beside perplexity (one H200; estimated 9 minutes on a fresh machine, 7 with the reference model
# cached in WORK, e.g. the second scaling on the same machine; the predictor training and then the predictor run are
# the longest path):
# dense, and lemo in the nested mode at keep 0.4 with the predictor, oracle and random scorers. Every run fine-tunes
# on the same books with recipe.passkey_rate of passkey rows and evaluates held-out perplexity and passkey accuracy
# by needle depth (dense evaluation). Does choosing which blocks to keep matter for retrieval: predictor and oracle
# near dense, random below? SCALING: "linear" (position interpolation, the headline) or "yarn".
#   bash benchmarks/accuracy/experiments/passkey.sh BOOKS WORK OUT [linear|yarn] [run.py options...]
# e.g. "--set predictor_batches=0" (each predictor run calibrates its own predictors: no offline training first).
set -euo pipefail
books=${1:?books folder} work=${2:?work folder} out=${3:?results folder} scaling=${4:-linear}
case "$scaling" in
  linear | yarn) ;;
  *) echo "passkey.sh: SCALING is linear or yarn, not '$scaling'" >&2; exit 2 ;;
esac
echo "passkey ($scaling): results go to $out/accuracy-full-<stamp>.{json,md,png}"
python3 "$(dirname "$0")/../run.py" --books "$books" --work "$work" --out "$out" --set "rope_scaling=\"$scaling\"" \
  --only "dense,predictor@0.4+nested,oracle@0.4+nested,random@0.4+nested" "${@:5}"
