#!/usr/bin/env bash
# Ablation (one H200, about 9 minutes): does the fine-tuning recipe (learning-rate decay, fresh data instead of
# repeated epochs) change the gap to dense, and which of lemo_ds's selection options matter under it?
#   bash benchmarks/accuracy/experiments/schedule_and_data.sh BOOKS WORK OUT
# "old" is the recipe before: constant rate after warm-up, the first 16 train books (about 2.6 epochs in 1000 steps).
set -euo pipefail
books=${1:?books folder} work=${2:?work folder} out=${3:?results folder}
. "$(dirname "$0")/_lib.sh"
old='"recipe.lr_schedule": "constant", "recipe.finetune_books": 16'
modes="{\"\": {}, \"nested\": {$nested}, \"nestall\": {\"nested_selection\": true, \"selection_window\": 8},
 \"old\": {$old}, \"nested-old\": {$nested, $old}, \"nested-16\": {$nested, \"recipe.finetune_books\": 16},
 \"nested-const\": {$nested, \"recipe.lr_schedule\": \"constant\"}}"
runs='[["random", 0.4, "nested"], ["oracle", 0.4, "nested"], ["norm", 0.4, "nested"], ["oracle", 0.4, "nestall"],
 ["oracle", 0.4, ""], ["dense", 1.0, "old"], ["oracle", 0.4, "nested-old"], ["random", 0.4, "nested-old"],
 ["oracle", 0.4, "nested-16"], ["oracle", 0.4, "nested-const"]]'
accuracy_run "$modes" "$runs"
