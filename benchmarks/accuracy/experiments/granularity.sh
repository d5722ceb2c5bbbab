#!/usr/bin/env bash
# Both granularities on one reference (one GPU; nine runs at once, about 9 minutes on reference A: an 11-run call of
# 2026-11-22 took 504 s on an H200): dense; whole layers eliminated in the nested mode (eliminate "layer", the
# README's rule: "nested"); the attention sublayer only (eliminate "attention", LeMo's) with independent choices and
# the loss on every token ("attention", LeMo's rule: predictor, oracle, random) and in the nested mode
# ("attention-nested": predictor, random), at keep 0.4, and the attention granularity at keep 0.2 in both rules.
# Independent whole-layer choices are left out (+10-11% on A, the README). Every run against the same dense run,
# same data and steps; --only picks a subset (run names: SCORER@KEEP+MODE).
#   bash benchmarks/accuracy/experiments/granularity.sh BOOKS WORK OUT [run.py options...]
# Reference A: no options (position interpolation) or "--set rope_scaling=\"yarn\"". Reference D (retrieval.sh's
# recipe, YaRN, 5% passkey fine-tuning rows): REFERENCE=D in the environment.
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
[["predictor", 0.4, "nested"],
 ["predictor", 0.4, "attention"], ["oracle", 0.4, "attention"], ["random", 0.4, "attention"],
 ["predictor", 0.4, "attention-nested"], ["random", 0.4, "attention-nested"],
 ["predictor", 0.2, "attention"], ["predictor", 0.2, "attention-nested"]]
JSON
)
reference=(--set predictor_batches=0)
if [ "${REFERENCE:-A}" = D ]; then
  reference=(--set 'rope_scaling="yarn"' "${reference_d[@]}" --set passkey_rate=0.05)
fi
accuracy_run "$modes" "$runs" "${reference[@]}" "${@:4}"
