#!/usr/bin/env bash
# The default rule (whole layers, nested choices in windows of 8 blocks, the first half dense, the processed loss,
# the predictor) at other keep ratios than 0.4, against dense on one reference: which keep ratio meets the quality
# target (issue 30: within +1.5% of dense held-out perplexity) at the least cost in speed.
#   bash benchmarks/accuracy/experiments/keep_ratio.sh BOOKS WORK OUT KEEPS [run.py options...]
# KEEPS: comma-separated ratios, e.g. 0.5,0.6. Reference A: REFERENCE=A (or unset); reference D (retrieval.sh's
# recipe, YaRN, 5% passkey fine-tuning rows): REFERENCE=D.
set -euo pipefail
books=${1:?books folder} work=${2:?work folder} out=${3:?results folder} keeps=${4:?keep ratios, e.g. 0.5,0.6}
# shellcheck source=_lib.sh
. "$(dirname "$0")/_lib.sh"
runs=$(python3 -c 'import json, sys; print(json.dumps([["predictor", float(k), "nested"] for k in sys.argv[1].split(",")]))' "$keeps")
reference=(--set predictor_batches=0)
if [ "${REFERENCE:-A}" = D ]; then
  reference=(--set 'rope_scaling="yarn"' "${reference_d[@]}" --set passkey_rate=0.05)
fi
accuracy_run "{\"\": {}, \"nested\": {$nested_first_half}}" "$runs" "${reference[@]}" "${@:5}"
