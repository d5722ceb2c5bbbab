#!/usr/bin/env bash
# The memory measurement set on one H200, about 8-9 minutes; JSON (and the Markdown reports) land in $OUT.
#   . benchmarks/device_env.sh && bash benchmarks/memory_gpu.sh
# 1. the offload and compaction tests on CUDA (streams, pinned buffers, prefetch; ~1 min)
# 2. memory-paper: Llama-2-7B, 8K, no checkpointing: dense, dense/LeMo +exact (no matmul recompute), +stack (~2 min)
# 3. memory-long: Llama-3-8B, 128K, checkpointing, one warm-up + one measured step: LeMo +stack and LeMo +offload
#    (~4 min). Left out for time: the strongest dense stack, dense+ckpt+chunked-loss, whose code path this change does
#    not touch (measured 83.69 GiB / 50.55 s: benchmarks/results/memory-long-20261122-000352.json), and the dense
#    model with the offload stack (add them with --variant ...).
# The longest-context search is separate (probes of several minutes each), e.g.:
#   python3 benchmarks/run.py --suite maxctx-stack --variant lemo-oracle+ckpt+offload --probe-timeout 590 --out $OUT
#   python3 benchmarks/run.py --suite maxctx --variant dense+ckpt+chunked-loss --budget-s 540 --out $OUT  (the reference)
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
status=0
timeout 100 python3 -m pytest -q -x tests/test_memory.py -k "cuda" -p no:cacheprovider \
  > "$OUT/memory-gpu-tests.log" 2>&1 || status=1
tail -3 "$OUT/memory-gpu-tests.log"
timeout 150 python3 benchmarks/run.py --suite memory-paper --out "$OUT" || status=1
timeout 290 python3 benchmarks/run.py --suite memory-long --warmup 1 --steps 1 \
  --variant lemo-oracle+ckpt+stack,lemo-oracle+ckpt+offload --out "$OUT" || status=1
exit $status
