#!/usr/bin/env bash
# The Ulysses sequence-parallel measurement set on one host of 4 H200 GPUs (nvidia-h200-x4), about 8 minutes.
# Llama-3-8B shape, random init, bf16, LoRA r=8, activation checkpointing; "dense-stack" (every keep ratio 1.0 +
# lemo_ds's memory stack) vs "lemo-stack" (LeMo, oracle scores, keep 0.4 in the deeper half, + the memory stack).
#
#   . benchmarks/device_env.sh && OUT=$OUT bash benchmarks/sp_gpu.sh [all|throughput|maxctx|maxctx-more]
#
# throughput (~3 min): the same tokens per GPU (TOKENS_PER_GPU, default 16384) at SP=1 (GPU 0), SP=2 (GPUs 2,3, at
#   the same time) and then SP=4 (all four): peak memory, step time, tokens/s per GPU, TFLOP/s per GPU.
# maxctx (~4-5 min): lemo-stack's longest context on one GPU (SP1_SEQS probed side by side, one per GPU), then at
#   SP=4 at 4x the longest one that fitted (the issue's target: SP=4 fits at least 4x one GPU).
# maxctx-more (a second command, ~8 min): SP=2 and SP=4 max context of both stacks (SP2_SEQS, SP4_SEQS, SP4_DENSE_SEQS).
# Probes are memory probes (benchmarks/sp.py --memory-probe: one step, attention kernels skipped but in the last
# layer), so a probe at a million tokens takes about a minute. Everything lands in $OUT/sp/*.json (+ logs), and a
# summary table in $OUT/sp/summary.json and on stdout.
set -u
: "${OUT:?set OUT to the folder for the results}"
DEST="$OUT/sp"
mkdir -p "$DEST"
TOKENS_PER_GPU=${TOKENS_PER_GPU:-16384}
SP1_SEQS=${SP1_SEQS:-196608,262144,327680,393216}
SP2_SEQS=${SP2_SEQS:-393216,524288,655360,786432}
SP4_SEQS=${SP4_SEQS:-786432,1048576,1310720,1572864}
SP4_DENSE_SEQS=${SP4_DENSE_SEQS:-524288,786432,1048576}
VARIANTS=dense-stack,lemo-stack
PY=${PYTHON:-python3}
export LEMO_BENCH_GIT_COMMIT=${LEMO_BENCH_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
log() { echo "[$(date +%H:%M:%S)] $*"; }

throughput() {
  log "throughput: ${TOKENS_PER_GPU} tokens per GPU at SP=1 (GPU 0) and SP=2 (GPUs 2,3)"
  CUDA_VISIBLE_DEVICES=0 $PY benchmarks/sp.py --sp 1 --seq "$TOKENS_PER_GPU" --variant $VARIANTS --out "$DEST" \
    >"$DEST/throughput-sp1.log" 2>&1 &
  deepspeed --include localhost:2,3 --master_port 29710 benchmarks/sp.py --sp 2 --seq $((2 * TOKENS_PER_GPU)) \
    --variant $VARIANTS --out "$DEST" >"$DEST/throughput-sp2.log" 2>&1 &
  wait
  grep -h "SP_BENCH " "$DEST/throughput-sp1.log" "$DEST/throughput-sp2.log"
  log "throughput: SP=4 (GPUs 0-3)"
  deepspeed --num_gpus 4 --master_port 29720 benchmarks/sp.py --sp 4 --seq $((4 * TOKENS_PER_GPU)) \
    --variant $VARIANTS --out "$DEST" >"$DEST/throughput-sp4.log" 2>&1
  grep -h "SP_BENCH \|Error" "$DEST/throughput-sp4.log" | tail -5
}

max_fit() {  # the longest fitting length of the newest max-context file of variant $1 at SP $2 ("" if none)
  $PY - "$DEST" "$1" "$2" <<'EOF'
import json, sys
from pathlib import Path
files = sorted(Path(sys.argv[1]).glob(f"sp-maxctx-{sys.argv[2]}-sp{sys.argv[3]}-*.json"))
print(json.loads(files[-1].read_text()).get("max_fit") or "" if files else "")
EOF
}

maxctx() {
  log "max context: lemo-stack on one GPU, probes $SP1_SEQS side by side"
  $PY benchmarks/sp.py --maxctx --sp 1 --variant lemo-stack --seqs "$SP1_SEQS" --gpus 0,1,2,3 --out "$DEST" \
    --probe-timeout 240 2>&1 | tee "$DEST/maxctx-sp1.log" | grep "probe .*:\|SP_MAXCTX"
  local one
  one=$(max_fit lemo-stack 1)
  if [ -z "$one" ]; then
    log "no one-GPU probe fitted: probing SP=4 at ${SP4_SEQS%%,*}"
    one=$(( ${SP4_SEQS%%,*} / 4 ))
  fi
  log "max context: lemo-stack at SP=4, 4 x $one = $((4 * one)) tokens (and 5x if the budget allows)"
  $PY benchmarks/sp.py --maxctx --sp 4 --variant lemo-stack --seqs "$((4 * one)),$((5 * one))" --gpus 0,1,2,3 \
    --out "$DEST" --probe-timeout 300 --budget-s 150 2>&1 | tee "$DEST/maxctx-sp4.log" | grep "probe .*:\|SP_MAXCTX"
}

maxctx_more() {
  log "max context: lemo-stack at SP=2 (two probes side by side), probes $SP2_SEQS"
  $PY benchmarks/sp.py --maxctx --sp 2 --variant lemo-stack --seqs "$SP2_SEQS" --gpus 0,1,2,3 --out "$DEST" \
    --probe-timeout 240 --budget-s 200 2>&1 | tee "$DEST/maxctx-sp2-lemo.log" | grep "probe .*:\|SP_MAXCTX"
  log "max context: dense-stack at SP=2, probes $SP2_SEQS"
  $PY benchmarks/sp.py --maxctx --sp 2 --variant dense-stack --seqs "$SP2_SEQS" --gpus 0,1,2,3 --out "$DEST" \
    --probe-timeout 240 --budget-s 150 2>&1 | tee "$DEST/maxctx-sp2-dense.log" | grep "probe .*:\|SP_MAXCTX"
  log "max context: dense-stack at SP=4, probes $SP4_DENSE_SEQS"
  $PY benchmarks/sp.py --maxctx --sp 4 --variant dense-stack --seqs "$SP4_DENSE_SEQS" --gpus 0,1,2,3 --out "$DEST" \
    --probe-timeout 240 --budget-s 100 2>&1 | tee "$DEST/maxctx-sp4-dense.log" | grep "probe .*:\|SP_MAXCTX"
}

summary() {
  $PY - "$DEST" <<'EOF'
import json, sys
from pathlib import Path
dest = Path(sys.argv[1])
rows, fits = {}, {}
for path in sorted(dest.glob("sp-*.json")):
    data = json.loads(path.read_text())
    if path.name.startswith("sp-maxctx-"):
        s = data["settings"]
        fits[(s["variant"], s["sp"])] = {"max_fit": data.get("max_fit"), "min_fail": data.get("min_fail"),
                                         "file": path.name}
    elif not data["settings"].get("memory_probe"):
        for r in data["results"]:
            rows[(r["variant"], data["settings"]["sp"])] = {
                "seq": data["settings"]["seq"], "tokens_per_gpu": data["settings"]["tokens_per_gpu"],
                "peak_alloc_gib": r.get("peak_alloc_gib"), "step_s": r.get("step_s_median"),
                "tokens_per_s_per_gpu": r.get("tokens_per_s_per_gpu"),
                "tflops_per_gpu": r.get("model_tflops_per_gpu"), "oom": r.get("oom"), "file": path.name}
out = {"throughput": {f"{v} sp{sp}": r for (v, sp), r in sorted(rows.items())},
       "max_context": {f"{v} sp{sp}": r for (v, sp), r in sorted(fits.items())}, "targets": {}}
print("variant      sp  seq       GiB/GPU  step s   tok/s/GPU  TFLOP/s/GPU  vs SP=1")
for (v, sp), r in sorted(rows.items()):
    base = rows.get((v, 1), {}).get("tokens_per_s_per_gpu")
    ratio = r["tokens_per_s_per_gpu"] / base if base and r["tokens_per_s_per_gpu"] else None
    out["throughput"][f"{v} sp{sp}"]["per_gpu_throughput_vs_sp1"] = ratio
    print(f"{v:12s} {sp:2d}  {r['seq']:8d}  {r['peak_alloc_gib'] or 0:7.2f}  {r['step_s'] or 0:6.2f}  "
          f"{r['tokens_per_s_per_gpu'] or 0:9.0f}  {r['tflops_per_gpu'] or 0:11.1f}  "
          f"{'' if ratio is None else f'{ratio:.3f}'}")
for key, r in sorted(out["max_context"].items()):
    print(f"max context {key}: fits {r['max_fit']}, fails {r['min_fail']}")
one, four = fits.get(("lemo-stack", 1), {}).get("max_fit"), fits.get(("lemo-stack", 4), {}).get("max_fit")
if one and four:
    out["targets"]["lemo_sp4_context_vs_one_gpu"] = four / one
    print(f"target: lemo SP=4 max context / one GPU = {four / one:.2f} (>= 4 wanted)")
lemo4, lemo1 = rows.get(("lemo-stack", 4)), rows.get(("lemo-stack", 1))
if lemo4 and lemo1 and lemo1["tokens_per_s_per_gpu"]:
    ratio = lemo4["tokens_per_s_per_gpu"] / lemo1["tokens_per_s_per_gpu"]
    out["targets"]["lemo_sp4_tokens_per_s_per_gpu_vs_sp1"] = ratio
    print(f"target: lemo SP=4 tokens/s per GPU / SP=1 at {lemo1['tokens_per_gpu']} tokens per GPU = {ratio:.3f} "
          "(>= 0.85 wanted)")
(dest / "summary.json").write_text(json.dumps(out, indent=1) + "\n")
EOF
}

case "${1:-all}" in
  all) throughput; maxctx ;;
  throughput) throughput ;;
  maxctx) maxctx ;;
  maxctx-more) maxctx_more ;;
  summary) ;;
  *) echo "usage: bash benchmarks/sp_gpu.sh [all|throughput|maxctx|maxctx-more|summary]"; exit 2 ;;
esac
summary
log "done: $DEST"
