#!/usr/bin/env bash
# Submit launch/slurm/train.sbatch with the job's shape and paths as variables; arguments go to
# launch/train.py. From the repository root, with the Python environment that has lemo_ds active:
#
#   NODES=2 GPUS_PER_NODE=8 DS_CONFIG=ds_configs/zero3_lemo.json MODEL=/models/Meta-Llama-3-8B \
#     DATA=corpus.jsonl OUTPUT_DIR=outputs/llama3 launch/slurm/submit.sh --seq-len 16384 --max-steps 200
#
# NODES (1), GPUS_PER_NODE (8; 0: CPU ranks over gloo), TASKS_PER_NODE (GPUS_PER_NODE, or 2 CPU ranks),
# CPUS_PER_TASK (the cluster's default), OUTPUT_DIR (outputs/run); DS_CONFIG, MODEL, DATA, RESUME, PYTHON and
# REQUEUE_LIMIT reach train.sbatch through the environment. SBATCH_FLAGS adds sbatch flags
# ("--time=04:00:00 --partition=gpu --account=..."); sbatch's own SBATCH_* variables work as well.
# The batch log goes to OUTPUT_DIR/logs/slurm-<job id>.out.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
shape=(--nodes="$NODES")
if ((GPUS_PER_NODE > 0)); then
    shape+=(--ntasks-per-node="${TASKS_PER_NODE:-$GPUS_PER_NODE}" --gpus-per-node="$GPUS_PER_NODE")
else
    shape+=(--ntasks-per-node="${TASKS_PER_NODE:-2}")
fi
if [[ -n ${CPUS_PER_TASK:-} ]]; then shape+=(--cpus-per-task="$CPUS_PER_TASK"); fi

# sbatch does not create the log's folder, and a job whose log cannot be opened dies without a word.
OUTPUT_DIR=${OUTPUT_DIR:-outputs/run}
mkdir -p "$OUTPUT_DIR/logs"
OUTPUT_DIR=$(cd "$OUTPUT_DIR" && pwd)
export LEMO_DS_REPO=$REPO GPUS_PER_NODE OUTPUT_DIR

read -ra extra <<<"${SBATCH_FLAGS:-}"
# --export=ALL: the job gets this environment (the variables above, the active Python) even where the site
# default is SBATCH_EXPORT=NONE.
exec sbatch "${shape[@]}" --export=ALL --output="$OUTPUT_DIR/logs/slurm-%j.out" "${extra[@]}" \
    "$REPO/launch/slurm/train.sbatch" "$@"
