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
bash "$(dirname "$0")/passkey.sh" "$books" "$work" "$out" yarn --set predictor_batches=0 --set pretrain_steps=2400 \
  --set pretrain_induction_rate=0.5 --set 'pretrain_induction_source="books"' --set pretrain_passkey_rate=0.2 \
  --set finetune_steps=500 --set passkey_rows=60 --set "passkey_rate=$rate"
