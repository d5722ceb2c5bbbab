#!/usr/bin/env bash
# The device calls that the open issues still need, one named call per run of the `device` tool (at most 10 minutes
# each). Prepare the carried folders here first (git-ignored; carry [".whl", ".bench_data"]):
#   bash benchmarks/gpu_calls.sh prepare
# then, on the device machine:
#   . benchmarks/device_env.sh && bash benchmarks/gpu_calls.sh NAME
# Every call writes its JSON (and the derived configs it ran) under $OUT/NAME. product_path rewrites its JSON after
# every case or probe, so a call cut by its limit keeps what finished. GPU_CALLS_DRY_RUN=1 prints the commands instead.
#
#   onedoc128k     issue 29: 128K one-document rows, hf-liger then the main job (~520 s: a hf-liger step is ~45 s)
#   maxctx-lemo    issue 31: the main job with memory.tiled_mlp at 512K on packed rows, then one-document rows
#   maxctx-dense [START [BUDGET_S]] issue 31: hf-liger-offload (ALST's single-GPU stack) from START (256K) on packed
#                  rows, bisected, for at most BUDGET_S (560) seconds
#   h100-384k-dense issue 31, after maxctx-lemo (512K out of device memory on an H100, 256K fits): the main job with
#                  the tiled MLP at 384K on packed rows, then a shorter maxctx-dense
#   attention64k   issue 30: "eliminate": "attention" against "layer" and hf-liger, 64K one-document rows
#   attention128k  issue 30: "eliminate": "attention" and hf-liger, 128K packed rows (the layer granularity's cell is
#                  in benchmarks/results/faster-than-hf-liger-20261207/h100-128k-packed.json)
#   granularity-a  issue 30: accuracy of both granularities on reference A (benchmarks/accuracy/experiments/
#                  granularity.sh: dense and eight lemo runs at once, about 9 minutes; no passkey rows)
#   granularity-d  issue 30: the same on reference D (retrieval), for the run names given after the call's name
#                  (granularity.sh's --only; dense always runs)
#   keep-a KEEPS   issue 30: the default rule at the given keep ratios (e.g. 0.5,0.6) against dense on reference A
#                  (benchmarks/accuracy/experiments/keep_ratio.sh; no passkey rows)
#   keep-d KEEPS   issue 30: the same on reference D (retrieval)
#   keep128k KEEP  issue 30: the main job at keep ratio KEEP against hf-liger on 128K packed rows, then the main job
#                  alone on 128K one-document rows (hf-liger runs out of device memory there:
#                  benchmarks/results/faster-than-hf-liger-20261207/h100-128k-one-doc.json)
#   registered640k issue 31, on an H200 (141 GB): the offload tests on CUDA (registered pinned buffers included),
#                  then the main job with the tiled MLP and memory.pinned_buffers "registered" at 640K on packed rows
#                  (the planner: 89.3 GiB device, 118 GiB host; with power-of-two buffers the host runs out)
#   h100-512k-offload-param issue 31, H100: the main job with the tiled MLP at 512K on packed rows with ZeRO-3's
#                  parameter offload (the frozen base's 15 GiB on the host, fetched layer by layer): 512K ran out of
#                  device memory with 73.6 GiB allocated and 4 GiB asked (the planner, whose parameter-offload term
#                  is not calibrated: 74.6 GiB device of 75.2 usable, 118.5 GiB host)
#   h100-512k-onedoc issue 31, H100, after h100-512k-offload-param: the same job on one-document rows, one step,
#                  with the random scorer: the predictors' calibration runs every layer dense, 512K of full causal
#                  attention more than a call has time for; the memory depends on how many blocks are kept, not which
#   h100-512k-two-layers-per-input issue 31, H100: 512K + one block (524,352 tokens: past 2**31 elements in q, where
#                  h200-800k failed) on packed rows with the tiled MLP, parameter offload and layers_per_stored_input 2
#                  (power-of-two buffers of 8 GiB per dense input need it on a 128 GiB host); fit on 2026-12-07
#   h100-512k-dense-same-memory issue 31, H100: the like-with-like dense stack for h100-512k-two-layers-per-input:
#                  the same job and memory settings (tiled MLP, parameter offload, layers_per_stored_input 2, attention
#                  in pieces) at keep_ratio 1.0, every layer dense, at 512K + 64 on packed rows. The planner predicts
#                  the same device peak as lemo's (62.3 GiB: a dense layer's recomputed backward is the peak of both
#                  jobs) and 86.5 GiB host; lemo's 2x target against the best dense stack depends on it
#   h200-800k      issue 31, on an H200 (141 GB; run it with needs_h200): the main job at 800K on packed rows
#                  with the tiled MLP, registered pinned buffers and memory.layers_per_stored_input 2 (the dense
#                  layers' inputs on the host halved: the planner says 106.5 GiB device, 98 GiB host)
#   h200-1m        issue 31's moonshot, on an H200 (needs_h200), after h200-800k fits: the same config at 1M tokens
#                  (the planner: 130.7 GiB device of 132.8 usable, 122 GiB host of 125)
#   large-tensors  issue 31, H100 or H200 (~3 min): tests/test_large_tensors.py, each op of the main job's step past
#                  2**31 elements (800K tokens), lemo_ds's kernels, document_attention (packed, and one document
#                  of 528K), Liger's fused loss and a registered buffer's round trip, each against its last rows
#                  alone; and the attention tests on CUDA (since 2026-12-08 the one document of 528K also runs the
#                  split document's backward over key chunks, not yet run on a GPU: run this call first)
#   flash-limit    issue 31 (~1 min): benchmarks/flash_limit.py, where torch's varlen flash attention in one call goes
#                  wrong (packed rows of 448K to 800K tokens), and lemo_ds's pieces past it
#   onedoc384k     issue 31, H100: the main job with the tiled MLP at 384K on one-document rows (384K fits on packed)
#   dense-memory128k issue 31 (~2 min): what is alive at the peak of hf-liger-offload's step at 128K on packed rows
#                  (benchmarks/hf_liger_job.py --memory-peak): with float32 adapters it kept about 50 [s, h] bf16
#                  tensors' worth per token (65.7 GiB at 128K, 15 GiB of it weights), where the main job's dense layer
#                  keeps about 18; now with bf16 adapters, as the case runs since 2026-12-08
#   memory256k     issue 31: what is alive at the peak of the main job's step at 256K with the tiled MLP (the
#                  planner's fitted TILED_FULL_LENGTH_H_FUSED: about 10 x h x b per token of a dense layer where the
#                  harness's tiled path keeps 3), benchmarks/profile_job.py --memory-peak
#
# The main job's configs here are ds_configs/zero3_lemo.json with predictor.calibration_batches 1 (and the change
# the call names): calibration runs before step 1 and fixes the keep ratios, so the timed steps are the shipped
# config's; one calibration batch instead of 8 saves 25-60 s of device time per case. Every call but keep128k pins
# keep_ratio 0.4, zero3_lemo.json's until 2026-12-07 (0.6 since): the calls already run measured it, and the
# max-context calls' planner figures assume it.
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?"usage: gpu_calls.sh prepare|onedoc128k|maxctx-lemo|maxctx-dense [START [BUDGET_S]]|h100-384k-dense|attention64k|attention128k|registered640k|h100-512k-offload-param|h100-512k-onedoc|h100-512k-two-layers-per-input|h100-512k-dense-same-memory|h200-800k|h200-1m|h200-800k-launch-blocking|large-tensors|flash-limit|onedoc384k|dense-memory128k|memory256k|granularity-a|granularity-d RUNS|keep-a KEEPS|keep-d KEEPS|keep128k KEEP"}

if [ "$name" = prepare ]; then
    mkdir -p .whl .bench_data
    for wheel in deepspeed hjson pydantic pydantic_core annotated_types typing_inspection liger_kernel; do
        cp -n ../shared/device-wheels/"$wheel"-[0-9]*.whl .whl/
    done
    # The books go compressed (54 MB of text, 20 MB as .tar.gz): the device tool carries at most 64 MiB in all.
    rm -rf .bench_data/gutenberg
    [ -f .bench_data/gutenberg.tar.gz ] || tar -czf .bench_data/gutenberg.tar.gz -C ../shared/data gutenberg
    du -sh .whl .bench_data
    exit 0
fi

OUT=${OUT:?"set OUT (the device tool's output folder)"}/$name
mkdir -p "$OUT"
BOOKS=.bench_data/gutenberg
if [ -z "${GPU_CALLS_DRY_RUN:-}" ] && [ ! -d "$BOOKS" ] && [ -f .bench_data/gutenberg.tar.gz ]; then
    tar -xzf .bench_data/gutenberg.tar.gz -C .bench_data
fi

# derive NAME KEY=JSON...: ds_configs/zero3_lemo.json with one calibration batch and the given "lemo" keys
# (dotted: memory.tiled_mlp=true; a key starting "ds." is one of the DeepSpeed config itself:
# ds.zero_optimization.offload_param='{"device": "cpu"}'), written to $OUT/NAME.json, which is printed.
derive() {
    python3 - "$OUT/$1.json" "${@:2}" <<'EOF'
import json, sys
config = json.load(open("ds_configs/zero3_lemo.json"))
lemo = config["lemo"]
lemo.setdefault("predictor", {})["calibration_batches"] = 1
for item in sys.argv[2:]:
    key, value = item.split("=", 1)
    *parents, leaf = key.split(".")
    section = lemo
    if parents and parents[0] == "ds":
        parents, section = parents[1:], config
    for parent in parents:
        section = section.setdefault(parent, {})
    section[leaf] = json.loads(value)
json.dump(config, open(sys.argv[1], "w"), indent=1)
print(sys.argv[1])
EOF
}

product_path() {
    local command=(python3 benchmarks/product_path.py --model llama-3-8b --books "$BOOKS" --out "$OUT" "$@")
    if [ -n "${GPU_CALLS_DRY_RUN:-}" ]; then  # tests: the configs are written, the commands only printed
        printf '%q ' "${command[@]}"
        echo
    else  # exit 3 = a search cut by its budget: its JSON is written, and the call's next searches still run
        "${command[@]}" || echo "gpu_calls.sh: product_path exited $?"
    fi
}

# product_path's packed rows (4 KB Gutenberg documents) as a file a job's --data reads; a dry run only names it.
packed_rows() {
    if [ -n "${GPU_CALLS_DRY_RUN:-}" ]; then
        echo "$OUT/packed-rows.jsonl"
    else
        python3 -c "import sys; from pathlib import Path; from benchmarks.product_path import prepare_rows
print(prepare_rows('packed', sys.argv[1], 4096, Path(sys.argv[2])))" "$BOOKS" "$(mktemp -d)" | tail -1
    fi
}

# A command of a call that is not a product_path search: printed in a dry run, else run under a time limit with its
# output in $OUT/$1 and the end of it shown (less the caret lines of Python's tracebacks). $2: the limit in seconds.
logged() {
    local log=$1 limit=$2
    shift 2
    if [ -n "${GPU_CALLS_DRY_RUN:-}" ]; then
        printf '%q ' "$@"
        echo
    else
        timeout "$limit" "$@" > "$OUT/$log" 2>&1 || echo "gpu_calls.sh: $1 exited $?"
        grep -v "^\[rank0\]:  \+\^" "$OUT/$log" | tail -60
    fi
}

# The offload tests on CUDA (registered pinned buffers included: they have no CPU path), before a call relies on them.
offload_tests() {
    if [ -z "${GPU_CALLS_DRY_RUN:-}" ]; then
        timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_memory.py -k "offload or registered or fewer_stored" \
            > "$OUT/offload-tests.log" 2>&1 || true
        tail -3 "$OUT/offload-tests.log"
    fi
}

case "$name" in
    onedoc128k)
        lemo=$(derive zero3_lemo-calibration1 keep_ratio=0.4)
        product_path --seq 131072 --rows one-doc --config "hf-liger,$lemo" --steps 6 --case-timeout 330
        ;;
    maxctx-lemo)
        lemo=$(derive zero3_lemo-tiled-calibration1 memory.tiled_mlp=true keep_ratio=0.4)
        for rows in packed one-doc; do
            product_path --maxctx --config "$lemo" --rows $rows --start 524288 --max-seq 524288 --granularity 16384 \
                --case-timeout 280 --budget-s 270
        done
        ;;
    maxctx-dense)
        product_path --maxctx --config hf-liger-offload --rows packed --start "${2:-262144}" --max-seq 1048576 \
            --granularity 16384 --case-timeout 200 --budget-s "${3:-560}"
        ;;
    h100-384k-dense)
        lemo=$(derive zero3_lemo-tiled-calibration1 memory.tiled_mlp=true keep_ratio=0.4)
        product_path --maxctx --config "$lemo" --rows packed --start 393216 --max-seq 393216 --granularity 16384 \
            --case-timeout 200 --budget-s 200
        product_path --maxctx --config hf-liger-offload --rows packed --start 262144 --max-seq 1048576 \
            --granularity 16384 --case-timeout 200 --budget-s 300
        ;;
    attention64k)
        attention=$(derive zero3_lemo-attention-calibration1 'eliminate="attention"' keep_ratio=0.4)
        layer=$(derive zero3_lemo-calibration1 keep_ratio=0.4)
        product_path --seq 65536 --rows one-doc --config "hf-liger,$layer,$attention" --steps 6 --case-timeout 170
        ;;
    attention128k)
        attention=$(derive zero3_lemo-attention-calibration1 'eliminate="attention"' keep_ratio=0.4)
        product_path --seq 131072 --rows packed --config "$attention,hf-liger" --steps 6 --case-timeout 150
        ;;
    registered640k)
        offload_tests
        lemo=$(derive zero3_lemo-registered-calibration1 memory.tiled_mlp=true 'memory.pinned_buffers="registered"' \
            keep_ratio=0.4)
        product_path --maxctx --config "$lemo" --rows packed --start 655360 --max-seq 655360 --granularity 16384 \
            --case-timeout 420 --budget-s 430
        ;;
    h100-512k-offload-param)
        lemo=$(derive zero3_lemo-tiled-offload-param-calibration1 memory.tiled_mlp=true keep_ratio=0.4 \
            ds.zero_optimization.offload_param='{"device": "cpu", "pin_memory": true}')
        product_path --maxctx --config "$lemo" --rows packed --start 524288 --max-seq 524288 --granularity 16384 \
            --case-timeout 540 --budget-s 545
        ;;
    h100-512k-onedoc)
        lemo=$(derive zero3_lemo-tiled-offload-param-random-scorer memory.tiled_mlp=true keep_ratio=0.4 \
            'scorer="random"' ds.zero_optimization.offload_param='{"device": "cpu", "pin_memory": true}')
        product_path --maxctx --config "$lemo" --rows one-doc --start 524288 --max-seq 524288 --granularity 16384 \
            --steps 1 --case-timeout 570 --budget-s 575
        ;;
    h100-512k-two-layers-per-input)  # one block past 512K: q [s, 32 x 128] has more than 2**31 elements
        lemo=$(derive zero3_lemo-tiled-offload-param-two-layers-per-input memory.tiled_mlp=true keep_ratio=0.4 \
            memory.layers_per_stored_input=2 ds.zero_optimization.offload_param='{"device": "cpu", "pin_memory": true}')
        product_path --maxctx --config "$lemo" --rows packed --start 524352 --max-seq 524352 --granularity 64 \
            --case-timeout 370 --budget-s 375
        ;;
    h100-512k-dense-same-memory)
        dense=$(derive zero3_dense-tiled-offload-param-two-layers-per-input memory.tiled_mlp=true keep_ratio=1.0 \
            memory.layers_per_stored_input=2 ds.zero_optimization.offload_param='{"device": "cpu", "pin_memory": true}')
        product_path --maxctx --config "$dense" --rows packed --start 524352 --max-seq 524352 --granularity 64 \
            --case-timeout 500 --budget-s 505
        ;;
    h200-800k)
        lemo=$(derive zero3_lemo-registered-two-layers-per-input-calibration1 memory.tiled_mlp=true \
            'memory.pinned_buffers="registered"' memory.layers_per_stored_input=2 keep_ratio=0.4)
        # One step: loading, one calibration batch (every layer dense) and a step at 800K take about 7 of a call's
        # 10 minutes (the 2026-12-07 run reached step 1's backward after 300 s), two steps do not fit.
        product_path --maxctx --config "$lemo" --rows packed --start 819200 --max-seq 819200 --granularity 16384 \
            --steps 1 --case-timeout 440 --budget-s 445
        ;;
    h200-1m)
        lemo=$(derive zero3_lemo-registered-two-layers-per-input-calibration1 memory.tiled_mlp=true \
            'memory.pinned_buffers="registered"' memory.layers_per_stored_input=2 keep_ratio=0.4)
        product_path --maxctx --config "$lemo" --rows packed --start 1048576 --max-seq 1048576 --granularity 16384 \
            --steps 1 --case-timeout 570 --budget-s 575
        ;;
    h200-800k-launch-blocking)  # where h200-800k's illegal memory access happens: every launch synchronous
        lemo=$(derive zero3_lemo-registered-two-layers-per-input-random memory.tiled_mlp=true \
            'memory.pinned_buffers="registered"' memory.layers_per_stored_input=2 keep_ratio=0.4 'scorer="random"')
        rows=$(packed_rows)
        CUDA_LAUNCH_BLOCKING=1 logged job.log 540 deepspeed --num_gpus 1 launch/train.py --deepspeed "$lemo" \
            --model llama-3-8b --seq-len 819200 --max-steps 1 --data "$rows" --no-save --memory-check off \
            --output-dir "$OUT/job"
        ;;
    large-tensors)
        logged large-tensors.log 300 python3 -m pytest -q -p no:cacheprovider tests/test_large_tensors.py \
            tests/test_attention_pieces.py tests/test_documents.py --durations=10
        ;;
    flash-limit)
        logged flash-limit.log 150 python3 benchmarks/flash_limit.py --out "$OUT"
        ;;
    onedoc384k)
        lemo=$(derive zero3_lemo-tiled-calibration1 memory.tiled_mlp=true keep_ratio=0.4)
        product_path --maxctx --config "$lemo" --rows one-doc --start 393216 --max-seq 393216 --granularity 16384 \
            --case-timeout 420 --budget-s 430
        ;;
    dense-memory128k)
        rows=$(packed_rows)
        logged profile.log 300 python3 benchmarks/hf_liger_job.py --kernels liger --offload-checkpoints --tiled-mlp \
            --lora-dtype bfloat16 --memory-peak --profile-out "$OUT" --model llama-3-8b --seq-len 131072 \
            --max-steps 2 --data "$rows" --output-dir "$OUT/job"
        ;;
    memory256k)
        lemo=$(derive zero3_lemo-tiled-calibration1 memory.tiled_mlp=true keep_ratio=0.4)
        rows=$(packed_rows)
        logged profile.log 540 deepspeed --num_gpus 1 benchmarks/profile_job.py --memory-peak --skip 1 \
            --profile-out "$OUT" --profile-tag zero3_lemo-tiled-256k --deepspeed "$lemo" --model llama-3-8b \
            --seq-len 262144 --max-steps 2 --data "$rows" --no-save --memory-check off --output-dir "$OUT/job"
        ;;
    keep128k)
        keep=${2:?"keep128k needs the keep ratio, e.g. 0.6"}
        lemo=$(derive "zero3_lemo-keep$keep-calibration1" "keep_ratio=$keep")
        product_path --seq 131072 --rows packed --config "$lemo,hf-liger" --steps 6 --case-timeout 150
        product_path --seq 131072 --rows one-doc --config "$lemo" --steps 6 --case-timeout 330
        ;;
    granularity-a | granularity-d | keep-a | keep-d)
        reference=${name#*-}
        if [ "${name%-*}" = granularity ]; then
            command=(bash benchmarks/accuracy/experiments/granularity.sh "$BOOKS" outputs/accuracy "$OUT")
            if [ "$reference" = d ]; then
                only=${2:?"granularity-d needs the run names, e.g. predictor@0.4+nested,predictor@0.4+attention"}
                command+=(--only "dense,$only")
            fi
        else
            keeps=${2:?"$name needs the keep ratios, e.g. 0.5,0.6"}
            command=(bash benchmarks/accuracy/experiments/keep_ratio.sh "$BOOKS" outputs/accuracy "$OUT" "$keeps")
        fi
        if [ "$reference" = a ]; then  # reference A retrieves no passkey (0 in every run so far): its rows save a minute
            command+=(--set passkey_rows=0)
        fi
        if [ -n "${GPU_CALLS_DRY_RUN:-}" ]; then
            echo "REFERENCE=${reference^^} $(printf '%q ' "${command[@]}")"
        else
            REFERENCE=${reference^^} "${command[@]}" > "$OUT/$name.log" 2>&1 \
                || echo "gpu_calls.sh: ${command[1]} exited $?"
            grep -v "Loading weights\|Writing model" "$OUT/$name.log" | tail -40
        fi
        ;;
    *)
        echo "gpu_calls.sh: unknown call '$name'" >&2
        exit 2
        ;;
esac
