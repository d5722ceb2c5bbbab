#!/usr/bin/env bash
# Ablation (one H200, about 7 minutes): the cost of learning from a share of the targets alone, at each keep ratio
# ("lossonly<k>": only the last layer sparse at keep k, processed loss), next to the nested mode's random run at
# 0.6. Deterministic pretraining: the reference is the headline run's, so these rows compare with its table
# (dense 45.32); the dense run is left out (--only).
#   bash benchmarks/accuracy/experiments/floor.sh BOOKS WORK OUT
set -euo pipefail
books=${1:?books folder} work=${2:?work folder} out=${3:?results folder}
. "$(dirname "$0")/_lib.sh"
modes="{\"\": {}, \"nested\": {$nested_first_half}, \"lossonly2\": $(lossonly 0.2), \"lossonly6\": $(lossonly 0.6), \"lossonly8\": $(lossonly 0.8)}"
runs='[["random", 0.2, "lossonly2"], ["random", 0.6, "lossonly6"], ["random", 0.8, "lossonly8"],
 ["random", 0.6, "nested"]]'
accuracy_run "$modes" "$runs" \
  --only "random@0.2+lossonly2,random@0.6+lossonly6,random@0.8+lossonly8,random@0.6+nested"
