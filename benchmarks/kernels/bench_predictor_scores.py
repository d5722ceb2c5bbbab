"""Benchmark lemo_ds.kernels.predictor_scores: predictor inference against the oracle it replaces and a lemo step.

    python benchmarks/kernels/bench_predictor_scores.py [--out DIR_OR_FILE.json] [--seqlens 8192 32768 65536]
        [--hidden 4096] [--heads 32] [--kv-heads 8] [--head-dim 128] [--hidden-rank 64] [--out-rank 32]
        [--block 64] [--batch 1] [--dtype bf16] [--sparse-layers 15] [--step-s 32768=3.90]

Defaults are Llama-3-8B's shape (h = 4096; H = 32, KV = 8, d = 128 for the oracle), one sample, bf16, a predictor
with 64 ReLU units per side and 32-wide embeddings (lemo_ds's defaults). For each sequence length it times, with
``triton.testing.do_bench`` (median and 20th/80th percentiles, in ms):

- ``triton``: ``predictor_scores(..., backend="triton")``: the two launches (block embeddings, block scores);
- ``triton+topk``: the same plus the selection (``lemo_ds.core.selection.select_blocks`` at keep 0.4), what a sparse
  layer's scoring costs in all;
- ``torch``: the plain-torch path of the same op;
- ``oracle``: ``oracle_scores(..., backend="triton")`` on the layer's queries and keys, what the predictor replaces.

Before timing, the kernel is checked against the torch path (relative error; overlap of the top-40% blocks).
``--step-s SEQ=SECONDS`` gives a measured lemo step time at SEQ (default: 3.90 s at 32K, lemo-norm+ckpt+chunked-loss
on Llama-3-8B from benchmarks/results/long-20261121-233304.md); the overhead column is ``sparse_layers`` x the
``triton+topk`` time over that step time (the target: at most 3% at 32K). JSON goes to ``--out``; a table is
printed last.
"""

import importlib
import math

import torch

# _kernel_bench: this folder is first on sys.path when a bench runs as a script
from _kernel_bench import (
    DTYPES,
    add_attention_args,
    bench_parser,
    environment,
    import_kernels,
    measure,
    parse_bench_args,
    require_cuda,
    time_seqlens,
    write_json,
)

OP = "predictor_scores"
KEEP = 0.4
TARGET_OVERHEAD = 0.03
# The environment record this bench has always written (shorter than the other benches'): its JSON files compare.
ENVIRONMENT_FIELDS = ("gpu", "torch", "triton", "python", "git_commit", "command", "timestamp_utc")


def parse_args(argv=None):
    p = bench_parser(OP, __doc__, seqlens=[8192, 32768, 65536])
    p.add_argument("--hidden", type=int, default=4096)
    add_attention_args(p)
    p.add_argument("--hidden-rank", type=int, default=64)
    p.add_argument("--out-rank", type=int, default=32)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--sparse-layers", type=int, default=15, help="sparse layers per step (Llama-3-8B: 16..30)")
    p.add_argument("--step-s", nargs="*", default=["32768=3.90"], help="measured lemo step times, SEQ=SECONDS")
    return parse_bench_args(p, argv)


def select_blocks(scores, keep):
    """lemo_ds.core.selection.select_blocks (sink block forced), inlined so the benchmark runs without lemo_ds."""
    work = scores.float().clone()
    work[:, 0] = math.inf
    return work.topk(keep, dim=1, sorted=False).indices.sort(dim=1).values


def bench_seqlen(kernels, args, s, step_s):
    mod = importlib.import_module(kernels.__name__ + ".predictor_scores")
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device="cuda").manual_seed(args.seed + s)
    b, h, block = args.batch, args.hidden, args.block
    n = math.ceil(s / block)
    x = torch.randn(b, s, h, device="cuda", dtype=dtype, generator=gen)  # [b, s, h]
    r1, r2 = args.hidden_rank, args.out_rank

    def w(*shape):
        return torch.randn(*shape, device="cuda", generator=gen) / math.sqrt(shape[-1])

    packed = mod.pack_predictor(w(r1, h), w(r1), w(r1, h), w(r1), w(r2, 2 * r1), w(r2, 2 * r1), dtype)
    dist = torch.randn(n, device="cuda", generator=gen)
    got = kernels.predictor_scores(x, packed, dist, block, backend="triton")
    ref = kernels.predictor_scores(x, packed, dist, block, backend="torch")
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    keep = max(1, round(KEEP * n))
    top_got, top_ref = select_blocks(got, keep), select_blocks(ref, keep)
    shared = sum(len(set(a.tolist()) & set(r.tolist())) for a, r in zip(top_got, top_ref, strict=True))
    overlap = shared / top_ref.numel()
    print(f"  s={s:>7} check: rel err {rel:.2e}, top-40% overlap {overlap:.4f}", flush=True)
    if rel > 5e-2:
        raise SystemExit(f"{OP}: Triton and torch scores differ at s={s} (rel err {rel:.3e}): not timing")

    q = torch.randn(b, s, args.heads, args.head_dim, device="cuda", dtype=dtype, generator=gen).transpose(1, 2)
    k = torch.randn(b, s, args.kv_heads, args.head_dim, device="cuda", dtype=dtype, generator=gen).transpose(1, 2)
    variants = [
        ("triton", lambda: kernels.predictor_scores(x, packed, dist, block, backend="triton")),
        ("triton+topk", lambda: select_blocks(kernels.predictor_scores(x, packed, dist, block, backend="triton"),
                                              keep)),  # fmt: skip
        ("torch", lambda: kernels.predictor_scores(x, packed, dist, block, backend="torch")),
        ("oracle", lambda: kernels.oracle_scores(q, k, block, backend="triton")),
    ]
    results = []
    for name, fn in variants:
        record = {"op": OP, "variant": name, "b": b, "s": s, "hidden": h, "hidden_rank": r1, "out_rank": r2,
                  "block": block, "n_blocks": n, "dtype": args.dtype, "rel_err_vs_torch": rel,
                  "top40_overlap_vs_torch": overlap}  # fmt: skip
        record.update(measure(fn, args.warmup, args.rep, brief=True))
        if step_s is not None:
            record["step_s"] = step_s
            record["overhead_share"] = args.sparse_layers * record["ms_median"] * 1e-3 / step_s
        results.append(record)
        print(f"  s={s:>7} {name:<12} {record['ms_median']:9.3f} ms", flush=True)
    # x streamed once: the bandwidth the first launch reaches.
    results[0]["gbps_x_read"] = x.numel() * x.element_size() / (results[0]["ms_median"] * 1e-3) / 1e9
    return results


def print_table(results, sparse_layers):
    print(f"\n| s | variant | ms median [p20-p80] | x{sparse_layers} layers ms | share of a lemo step "
          f"(target <= {TARGET_OVERHEAD:.0%}) |")
    print("|---|---|---|---|---|")
    for r in results:
        share = f"{r['overhead_share']:.3%}" if "overhead_share" in r else "n/a (no --step-s)"
        print(f"| {r['s']} | {r['variant']} | {r['ms_median']:.3f} [{r['ms_p20']:.3f}-{r['ms_p80']:.3f}] | "
              f"{sparse_layers * r['ms_median']:.2f} | {share} |")  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    require_cuda(f"{OP}: needs a CUDA GPU")
    steps = {int(k): float(v) for k, v in (item.split("=") for item in args.step_s)}
    kernels = import_kernels()
    results = time_seqlens(args.seqlens, lambda s: bench_seqlen(kernels, args, s, steps.get(s)))
    env = environment(kernels, fields=ENVIRONMENT_FIELDS)
    path = write_json(args.out, {"environment": env, "args": vars(args), "results": results}, OP)
    print(f"wrote {path}")
    print_table(results, args.sparse_layers)


if __name__ == "__main__":
    main()
