#!/usr/bin/env bash
# Retrieval with a reference that retrieves (one H200, about 7.5 minutes on a fresh machine): reference D, the
# 12-layer recipe pretrained 2400 steps with half of its rows one repeated window of the books (the copying
# curriculum, recipe.pretrain_induction_source "books") and a fifth passkey documents, extended with YaRN and
# fine-tuned 500 steps with PASSKEY_RATE of the fine-tuning rows passkey documents (0.05 or 0.25 in the README);
# dense and the nested mode at keep 0.4 with the predictor, oracle and random scorers, 60 held-out passkey rows per
# depth. The predictors calibrate in each run (no offline training).
#   bash benchmarks/accuracy/experiments/retrieval.sh BOOKS WORK OUT [PASSKEY_RATE]
set -euo pipefail
books=${1:?books folder} work=${2:?work folder} out=${3:?results folder} rate=${4:-0.05}
# shellcheck source=_lib.sh
. "$(dirname "$0")/_lib.sh"
bash "$here/passkey.sh" "$books" "$work" "$out" yarn "${reference_d[@]}" --set "passkey_rate=$rate"
