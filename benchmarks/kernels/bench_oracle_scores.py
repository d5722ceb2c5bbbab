"""Benchmark lemo_ds.kernels.oracle_scores: the fused Triton kernel against attention itself and the torch oracles.

    python benchmarks/kernels/bench_oracle_scores.py [--out DIR_OR_FILE.json] [--seqlens 8192 32768 65536]
        [--heads 32] [--kv-heads 8] [--head-dim 128] [--block 64] [--batch 1] [--dtype bf16] [--doc-len 0]
        [--sweep] [--torch-max-seq 65536]

Defaults are Llama-3-8B's attention (H = 32, KV = 8, d = 128), one sample, bf16, queries and keys laid out as
Hugging Face hands them over ([b, s, H, d] transposed to [b, H, s, d]). For each sequence length it times, with
``triton.testing.do_bench`` (median and 20th/80th percentiles, in ms):

- ``triton``: ``oracle_scores(..., backend="triton")``, the block scores [b, n];
- ``triton_tiles``: the same with ``return_tiles=True`` (the [b, n, n] labels of predictor training);
- ``sdpa_flash``: the forward of causal attention at the same shape (torch SDPA, flash backend, GQA), the
  yardstick: the target is ``triton`` at most 1.2x ``sdpa_flash``;
- ``torch_chunked``: the chunked torch path of the same module (``backend="torch"``);
- ``torch_mask``: the same chunked path given the equivalent bool mask [1, 1, s, s] instead of doc ids (how a
  model's own mask is scored: sliding windows, custom masks; the kernel takes no mask), one document only;
- with ``--sweep``, the kernel under other tilings (``triton[m..n..h..s..w..c..]``; see OracleKernelConfig).

The torch oracles are skipped above ``--torch-max-seq``. Before timing, the kernel is checked against the torch
path (relative error and the overlap of the top-40% blocks each selects); a mismatch stops the run. It records the
peak CUDA memory of one call above what was allocated before it, the flops (the oracle's q.k over the causal pairs;
attention's two matmuls over them) and the TFLOP/s they imply. Everything goes to a JSON file (GPU, versions, git
commit, exact command); a table is printed last.
"""

import importlib
import math

import torch

# _kernel_bench: this folder is first on sys.path when a bench runs as a script
from _kernel_bench import (
    DTYPES,
    add_attention_args,
    bench_parser,
    measure,
    parse_bench_args,
    print_rows,
    run_benchmark,
)

OP = "oracle_scores"
TARGET_VS_SDPA = 1.2
TARGET = f"triton median <= {TARGET_VS_SDPA} x sdpa_flash median at the same shape; memory O(s)"
KEEP = 0.4  # share of blocks the selection check keeps (LeMo's artifact keeps 40%)
NOTES = (
    "flops: oracle 2*H*d per causal (query, key) pair, attention 4*H*d (documents ignored); sdpa_flash is causal "
    "attention over the whole sequence whatever --doc-len; rel_err_vs_torch: max |kernel - torch path| / max |torch "
    "path| (bf16: the torch path rounds q.k to bf16); top40_overlap_vs_torch: share of the top-40% blocks both select."
)


def parse_args(argv=None):
    p = bench_parser(OP, __doc__, seqlens=[8192, 32768, 65536])
    add_attention_args(p)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--doc-len", type=int, default=0, help="pack documents of this many tokens (0: one document)")
    p.add_argument("--sweep", action="store_true", help="also time the kernel under other tilings")
    p.add_argument("--torch-max-seq", type=int, default=65536, help="skip the torch oracles above this length")
    return parse_bench_args(p, argv)


def doc_ids_for(b, s, doc_len):
    """[b, s] int32 document index per token (None for one document): documents of doc_len tokens, shifted by a
    different offset per sample so that boundaries fall mid-block."""
    if not doc_len:
        return None
    pos = torch.arange(s, device="cuda")
    rows = [((pos + (bi * 37) % doc_len) // doc_len).to(torch.int32) for bi in range(b)]
    return torch.stack(rows)


def sdpa_callable(q, k, v):
    """Causal flash-attention forward at this shape; (fn, how GQA is fed). Flash with enable_gqa where this torch
    supports it, else with K/V repeated to H heads beforehand (outside the timing)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional

    def run(k_, v_, **kw):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k_, v_, is_causal=True, **kw)

    if k.shape[1] == q.shape[1]:
        return (lambda: run(k, v)), "none"
    try:
        run(k, v, enable_gqa=True)
        return (lambda: run(k, v, enable_gqa=True)), "enable_gqa"
    except (RuntimeError, TypeError):
        group = q.shape[1] // k.shape[1]
        k_rep, v_rep = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return (lambda: run(k_rep, v_rep)), "repeat_interleave"


def sweep_configs(mod, default, auto_chunk):
    """Tilings to try besides the default (see OracleKernelConfig); those that do not fit the GPU are recorded as
    errors. Shared memory per stage is (heads_per_step * 64 * m + 64 * n) * d * 2 bytes at B = 64."""
    C = mod.OracleKernelConfig
    configs = [
        C(m_sub=1, n_sub=2, heads_per_step=1, num_warps=8, num_stages=3),
        C(m_sub=1, n_sub=2, heads_per_step=1, num_warps=8, num_stages=4),
        C(m_sub=1, n_sub=2, heads_per_step=2, num_warps=8, num_stages=2),
        C(m_sub=1, n_sub=2, heads_per_step=2, num_warps=4, num_stages=3),
        C(m_sub=1, n_sub=1, heads_per_step=1, num_warps=4, num_stages=3),  # 64 x 64: two programs per SM fit
        C(m_sub=1, n_sub=1, heads_per_step=1, num_warps=8, num_stages=3),  # the same at 8 warps (127 registers)
        C(m_sub=1, n_sub=1, heads_per_step=2, num_warps=8, num_stages=3),
        C(m_sub=2, n_sub=1, heads_per_step=1, num_warps=8, num_stages=3),
        C(m_sub=2, n_sub=2, heads_per_step=1, num_warps=8, num_stages=3),
        C(m_sub=1, n_sub=4, heads_per_step=1, num_warps=8, num_stages=2),
        # The default tiling with chunks 4x smaller / larger than the automatic choice.
        C(**{**default.__dict__, "chunk": max(1, auto_chunk // 4)}),
        C(**{**default.__dict__, "chunk": auto_chunk * 4}),
    ]
    return [c for c in configs if c != default]


def config_name(c, chunk):
    return f"triton[m{c.m_sub}n{c.n_sub}h{c.heads_per_step}s{c.num_stages}w{c.num_warps}c{chunk}]"


def check_against_torch(kernels, q, k, block, doc_ids):
    """Relative max error of the kernel's scores against the torch path, and the overlap of the top-40% blocks."""
    got = kernels.oracle_scores(q, k, block, doc_ids, backend="triton")
    ref = kernels.oracle_scores(q, k, block, doc_ids, backend="torch")
    rel = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    keep = max(1, round(KEEP * ref.shape[1]))
    top_got, top_ref = got.topk(keep, dim=1).indices, ref.topk(keep, dim=1).indices
    overlap = (
        sum(len(set(a.tolist()) & set(r.tolist())) for a, r in zip(top_got, top_ref, strict=True)) / top_ref.numel()
    )
    return rel, overlap


def bench_seqlen(kernels, args, s):
    mod = importlib.import_module(kernels.__name__ + ".oracle_scores")
    dtype = DTYPES[args.dtype]
    b, heads, kv, d, block = args.batch, args.heads, args.kv_heads, args.head_dim, args.block
    gen = torch.Generator(device="cuda").manual_seed(args.seed + s)
    # [b, s, H, d] transposed to [b, H, s, d], as Hugging Face attention hands them over.
    q = torch.randn(b, s, heads, d, device="cuda", dtype=dtype, generator=gen).transpose(1, 2)
    k = torch.randn(b, s, kv, d, device="cuda", dtype=dtype, generator=gen).transpose(1, 2)
    v = torch.randn(b, s, kv, d, device="cuda", dtype=dtype, generator=gen).transpose(1, 2)
    doc_ids = doc_ids_for(b, s, args.doc_len)
    n = math.ceil(s / block)
    pairs = b * s * (s + 1) / 2  # causal (query, key) pairs, documents ignored
    flops = {"oracle": 2 * heads * d * pairs, "attention": 4 * heads * d * pairs}

    run_torch = s <= args.torch_max_seq
    check = {}
    if run_torch:
        rel, overlap = check_against_torch(kernels, q, k, block, doc_ids)
        check = {"rel_err_vs_torch": rel, "top40_overlap_vs_torch": overlap}
        print(f"  s={s:>7} check: rel err {rel:.2e}, top-40% overlap {overlap:.4f}", flush=True)
        # bf16: the torch path rounds every q.k to bf16 (~0.4%); the kernel keeps fp32.
        if rel > (2e-2 if dtype != torch.float32 else 1e-4):
            raise SystemExit(f"{OP}: Triton and torch scores differ at s={s} (rel err {rel:.3e}): not timing")

    def chunk_of(cfg):  # the query tiles per program the launcher uses for this tiling
        n_key_tiles, n_query_tiles = math.ceil(s / (cfg.n_sub * block)), math.ceil(s / (cfg.m_sub * block))
        return cfg.chunk or mod._pick_chunk(n_key_tiles, n_query_tiles, b, q.device)

    default = mod.default_config(block, heads // kv, d, q.element_size(), q.device)
    auto_chunk = chunk_of(default)
    variants = [
        ("triton", lambda: kernels.oracle_scores(q, k, block, doc_ids, backend="triton"), "oracle", default),
        (
            "triton_tiles",
            lambda: kernels.oracle_scores(q, k, block, doc_ids, return_tiles=True, backend="triton"),
            "oracle",
            default,
        ),
    ]
    sdpa, gqa_mode = sdpa_callable(q, k, v)
    variants.append(("sdpa_flash", sdpa, "attention", None))
    if run_torch:
        variants.append(
            ("torch_chunked", lambda: kernels.oracle_scores(q, k, block, doc_ids, backend="torch"), "oracle", None)
        )
        if doc_ids is None:
            causal = torch.ones(1, 1, s, s, dtype=torch.bool, device="cuda").tril_()  # [1, 1, s, s]
            variants.append(
                ("torch_mask", lambda: kernels.oracle_scores(q, k, block, causal, backend="torch"), "oracle", None)
            )
    if args.sweep:
        for cfg in sweep_configs(mod, default, auto_chunk):

            def fn(cfg=cfg):
                with torch.no_grad():
                    mod._oracle_scores_launch(q, k, block, doc_ids, False, cfg)

            variants.append((config_name(cfg, chunk_of(cfg)), fn, "oracle", cfg))

    results = []
    for name, fn, kind, cfg in variants:
        record = {
            "op": OP,
            "variant": name,
            "b": b,
            "s": s,
            "heads": heads,
            "kv_heads": kv,
            "head_dim": d,
            "block": block,
            "n_blocks": n,
            "dtype": args.dtype,
            "doc_len": args.doc_len,
            "flops": flops[kind],
            **check,
        }
        if cfg is not None:
            record["config"] = {**cfg.__dict__, "chunk": chunk_of(cfg)}
        if name == "sdpa_flash":
            record["gqa"] = gqa_mode
        try:
            r = measure(fn, args.warmup, args.rep, host_calls=10)
        except Exception as e:  # a sweep tiling that does not fit this GPU (shared memory, registers)
            record["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"  s={s:>7} {name:<40} error: {record['error'][:100]}", flush=True)
            results.append(record)
            torch.cuda.empty_cache()
            continue
        r["tflops_at_median"] = flops[kind] / (r["ms_median"] * 1e-3) / 1e12
        record.update(r)
        results.append(record)
        print(f"  s={s:>7} {name:<40} {r['ms_median']:9.3f} ms", flush=True)
        torch.cuda.empty_cache()
    return results


def print_table(results):
    sdpa = {r["s"]: r for r in results if r["variant"] == "sdpa_flash" and "ms_median" in r}
    header = (
        f"{'s':>7} {'variant':<40} {'median ms':>10} {'p20':>9} {'p80':>9} {'TFLOP/s':>8} {'peak+MiB':>9} "
        f"{'vs SDPA':>8}"
    )
    print_rows(header, [variant_row(r, sdpa.get(r["s"])) for r in results])
    print(f"(target: triton at most {TARGET_VS_SDPA}x sdpa_flash; peak+MiB: memory above the inputs)")


def variant_row(r, sdpa):
    """One record as a table row: its error, or its times and their ratio to ``sdpa`` (sdpa_flash's record at the
    same s; None where it failed)."""
    if "ms_median" not in r:
        return f"{r['s']:>7} {r['variant']:<40} {'error':>10}"
    ratio = f"{r['ms_median'] / sdpa['ms_median']:7.2f}x" if sdpa else f"{'-':>8}"
    return (
        f"{r['s']:>7} {r['variant']:<40} {r['ms_median']:>10.3f} {r['ms_p20']:>9.3f} {r['ms_p80']:>9.3f} "
        f"{r['tflops_at_median']:>8.1f} {r['peak_above_inputs_mib']:>9.1f} {ratio}"
    )


def main(argv=None):
    args = parse_args(argv)
    run_benchmark(
        OP,
        args,
        lambda kernels, s: bench_seqlen(kernels, args, s),
        NOTES,
        print_table,
        timed="the Triton kernel",
        capability=True,
        target=TARGET,
    )


if __name__ == "__main__":
    main()
