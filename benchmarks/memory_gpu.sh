#!/usr/bin/env bash
# The memory measurement set on one H200, about 8-9 minutes; JSON (and the Markdown reports) land in $OUT.
#   . benchmarks/device_env.sh && bash benchmarks/memory_gpu.sh
# 1. the offload and compaction tests on CUDA (streams, pinned buffers, prefetch; ~1 min)
# 2. memory-paper: Llama-2-7B, 8K, no checkpointing: dense, dense/LeMo +exact (no matmul recompute), +stack (~2 min)
# 3. memory-long: Llama-3-8B, 128K, checkpointing, one measured step: strongest dense stack (Liger), LeMo +stack,
#    LeMo +offload (~5 min; the dense +offload variant is left out for time: run it with --variant dense+ckpt+offload)
# The longest-context search is separate (probes of several minutes each), e.g.:
#   python3 benchmarks/run.py --suite maxctx-stack --variant lemo-oracle+ckpt+offload --budget-s 540 --out $OUT
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
status=0
timeout 120 python3 -m pytest -q -x tests/test_memory.py -k "cuda" -p no:cacheprovider \
  > "$OUT/memory-gpu-tests.log" 2>&1 || status=1
tail -3 "$OUT/memory-gpu-tests.log"
timeout 170 python3 benchmarks/run.py --suite memory-paper --out "$OUT" || status=1
timeout 330 python3 benchmarks/run.py --suite memory-long --warmup 1 --steps 1 \
  --variant dense+ckpt+chunked-loss,lemo-oracle+ckpt+stack,lemo-oracle+ckpt+offload --out "$OUT" || status=1
exit $status
