#!/usr/bin/env bash
# One Slurm task = one training rank: map the task's SLURM_* variables to the torch.distributed ones that
# deepspeed.init_distributed reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), then run the
# command. train.sbatch starts it under srun, one task per GPU (or per CPU rank); MASTER_ADDR and MASTER_PORT
# come from the batch script through srun's environment.
set -euo pipefail

: "${MASTER_ADDR:?set by train.sbatch: the first host of the allocation}"
: "${MASTER_PORT:?set by train.sbatch}"
export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID

# Tasks on this node: SLURM_STEP_TASKS_PER_NODE lists them per node, compressed ("4(x2),3": 4, 4, 3).
# launch_env.set_cpu_threads shares the node's cores among them (LOCAL_SIZE, as the deepspeed launcher sets).
local_size() {
    local node=$SLURM_NODEID entries entry count repeat
    IFS=, read -ra entries <<<"${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}"
    for entry in "${entries[@]}"; do
        count=${entry%%(*}
        repeat=1
        if [[ $entry == *"(x"* ]]; then repeat=${entry#*(x}; repeat=${repeat%)}; fi
        if ((node < repeat)); then echo "$count"; return; fi
        node=$((node - repeat))
    done
    echo 1
}
LOCAL_SIZE=$(local_size)
export LOCAL_SIZE LOCAL_WORLD_SIZE=$LOCAL_SIZE
# A site that binds one GPU per task (--gpus-per-task=1, --gpu-bind) leaves the task a single visible
# device, which is device 0 whatever its local rank (DeepSpeed selects the device by LOCAL_RANK).
if [[ -n ${CUDA_VISIBLE_DEVICES:-} && $CUDA_VISIBLE_DEVICES != *,* ]]; then export LOCAL_RANK=0; fi
# A task given --cpus-per-task cores uses those, not an equal share of the whole node.
if [[ -n ${SLURM_CPUS_PER_TASK:-} && -z ${OMP_NUM_THREADS:-} ]]; then export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK; fi

exec "$@"
