#!/usr/bin/env bash
# Both granularities on one reference (one H200; not yet run: estimated 10 minutes, like passkey.sh): dense; whole
# layers eliminated (eliminate "layer") and the attention sublayer only (eliminate "attention", LeMo's), each with
# independent choices and the loss on every token ("indep") and in the nested mode ("nested"), at keep 0.4 with the
# predictor, oracle and random scorers, and the attention granularity at keep 0.2 too. Every run against the same
# dense run, same data and steps.
#   bash benchmarks/accuracy/experiments/granularity.sh BOOKS WORK OUT [run.py options...]
# Reference A: no options (position interpolation) or "--set rope_scaling=\"yarn\""; reference D: retrieval.sh's
# options (--set pretrain_steps=2400 --set pretrain_induction_rate=0.5 ...).
set -euo pipefail
books=${1:?books folder} work=${2:?work folder} out=${3:?results folder}
# shellcheck source=_lib.sh
. "$(dirname "$0")/_lib.sh"
modes=$(cat <<JSON
{"": {}, "nested": {$nested_first_half},
 "attention": {"eliminate": "attention"},
 "attention-nested": {"eliminate": "attention", $nested_first_half}}
JSON
)
runs=$(cat <<JSON
[["predictor", 0.4, ""], ["predictor", 0.4, "nested"],
 ["predictor", 0.4, "attention"], ["oracle", 0.4, "attention"], ["random", 0.4, "attention"],
 ["predictor", 0.4, "attention-nested"], ["oracle", 0.4, "attention-nested"], ["random", 0.4, "attention-nested"],
 ["predictor", 0.2, "attention"], ["predictor", 0.2, "attention-nested"]]
JSON
)
accuracy_run "$modes" "$runs" --set predictor_batches=0 "${@:4}"
