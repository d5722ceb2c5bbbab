"""Benchmark lemo_ds.kernels.write_back_rows: the Triton kernels against the torch reference, on CUDA.

    python benchmarks/kernels/bench_write_back_rows.py [--out DIR_OR_FILE.json] [--seqlens 8192 32768 131072]
        [--hidden 4096] [--keep 0.4] [--block 64] [--batch 1] [--dtype bf16]

For each sequence length it times, with ``triton.testing.do_bench`` (median and 20th/80th percentiles, in ms):

- ``fwd``: out of place (a new [b, s, h]: x with the kept rows replaced), nothing requires grad;
- ``fwd_inplace``: the kept rows of x overwritten in place, nothing requires grad;
- ``fwd_bwd``: out of place, x and rows require grad (grad_x: grad_out with the kept rows zeroed; grad_rows:
  grad_out at the kept rows);
- ``fwd_bwd_inplace``: in place into ``x = x_leaf * 1`` (an in-place write needs a non-leaf, as the residual stream
  is); the multiply and its backward are inside the timed call for both backends alike.

It records the peak CUDA memory each step allocates above what was allocated before it, the bytes the step must
move at least (reads + writes, ``model_bytes``; the ``* 1`` of fwd_bwd_inplace not counted) and the bandwidth that
implies. Kept rows are whole blocks of ``--block`` tokens chosen at random, as LeMo keeps them. Everything goes to a
JSON file (GPU, versions, git commit, exact command); a table is printed last.
"""

import argparse
import sys

import torch

# _kernel_bench: this folder is first on sys.path when a bench runs as a script
from _kernel_bench import QUANTILES, REPO, environment, import_kernels, measure, write_json

OP = "write_back_rows"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = REPO / "benchmarks" / "results" / f"kernels_{OP}.json"
    p.add_argument(
        "--out", default=str(default_out), help="JSON file, or a directory to write kernels_write_back_rows.json into"
    )
    p.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--keep", type=float, default=0.4, help="share of blocks kept")
    p.add_argument("--block", type=int, default=64, help="tokens per kept block")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up time, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def kept_index(b, s, keep, block, gen):
    """[b, k] int64 on CUDA: whole blocks of `block` tokens, round(keep * blocks) of them per sample, ascending."""
    n_blocks = -(-s // block)
    n_keep = max(1, round(keep * n_blocks))
    rows = []
    for _ in range(b):
        blocks = torch.randperm(n_blocks, generator=gen)[:n_keep].sort().values  # [n_keep]
        tokens = (blocks[:, None] * block + torch.arange(block)).flatten()  # [n_keep * block]
        rows.append(tokens[tokens < s])
    k = min(len(r) for r in rows)  # a short last block can make samples differ by a few tokens
    return torch.stack([r[:k] for r in rows]).cuda()


def bench_seqlen(kernels, args, s, gen):
    dtype = DTYPES[args.dtype]
    b, h = args.batch, args.hidden
    index = kept_index(b, s, args.keep, args.block, gen)  # [b, k]
    k = index.shape[1]
    x = torch.randn(b, s, h, generator=gen).to("cuda", dtype)  # [b, s, h]
    rows = torch.randn(b, k, h, generator=gen).to("cuda", dtype)  # [b, k, h]
    grad = torch.randn(b, s, h, generator=gen).to("cuda", dtype)  # [b, s, h]
    xg = x.detach().requires_grad_()
    rows_g = rows.detach().requires_grad_()

    # Sanity before timing: both backends are pure copies, so they must agree bit for bit.
    match = torch.equal(
        kernels.write_back_rows(x, rows, index, backend="triton"), kernels.write_back_rows_ref(x, rows, index)
    )
    grads_t = torch.autograd.grad(kernels.write_back_rows(xg, rows_g, index, backend="triton"), (xg, rows_g), grad)
    grads_r = torch.autograd.grad(kernels.write_back_rows_ref(xg, rows_g, index), (xg, rows_g), grad)
    match = match and all(torch.equal(a, r) for a, r in zip(grads_t, grads_r, strict=True))
    del grads_t, grads_r
    if not match:
        raise SystemExit(f"{OP}: Triton and torch results differ at s={s}: not timing a wrong kernel")

    es = x.element_size()
    full, kept = b * s * h * es, b * k * h * es
    # fwd: read s - k rows of x and k rows of rows, write s rows. In place: read and write k rows.
    # backward: grad_x reads s - k rows of grad_out and writes s rows; grad_rows reads and writes k rows.
    fwd_bytes, inplace_bytes, bwd_bytes = 2 * full, 2 * kept, 2 * full + kept
    results = []
    for backend in ("triton", "torch"):
        write_back = kernels.write_back_rows if backend == "triton" else kernels.write_back_rows_ref
        kw = {"backend": "triton"} if backend == "triton" else {}

        def fwd(write_back=write_back, kw=kw):
            write_back(x, rows, index, **kw)

        def fwd_inplace(write_back=write_back, kw=kw):
            write_back(x, rows, index, inplace=True, **kw)

        def fwd_bwd(write_back=write_back, kw=kw):
            write_back(xg, rows_g, index, **kw).backward(grad)

        def fwd_bwd_inplace(write_back=write_back, kw=kw):
            write_back(xg * 1, rows_g, index, inplace=True, **kw).backward(grad)

        modes = (
            ("fwd", fwd, None, fwd_bytes),
            ("fwd_inplace", fwd_inplace, None, inplace_bytes),
            ("fwd_bwd", fwd_bwd, [xg, rows_g], fwd_bytes + bwd_bytes),
            ("fwd_bwd_inplace", fwd_bwd_inplace, [xg, rows_g], inplace_bytes + bwd_bytes),
        )
        for mode, fn, grads, nbytes in modes:
            r = measure(fn, args.warmup, args.rep, grad_to_none=grads)
            r.update(
                {
                    "op": OP,
                    "mode": mode,
                    "backend": backend,
                    "b": b,
                    "s": s,
                    "h": h,
                    "k": k,
                    "dtype": args.dtype,
                    "model_bytes": nbytes,
                    "gbps_at_median": nbytes / (r["ms_median"] * 1e-3) / 1e9,
                }
            )
            results.append(r)
            print(f"  s={s:>7} {mode:<15} {backend:<6} {r['ms_median']:.4f} ms", flush=True)
    return results


def print_table(results):
    by_key = {(r["s"], r["mode"], r["backend"]): r for r in results}
    header = (
        f"{'s':>7} {'k':>7} {'mode':<15} {'backend':<7} {'median ms':>10} {'p20':>8} {'p80':>8} {'GB/s':>7} "
        f"{'peak+MiB':>9} {'host us':>8} {'vs torch':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        ref = by_key[(r["s"], r["mode"], "torch")]
        speedup = ref["ms_median"] / r["ms_median"]
        print(
            f"{r['s']:>7} {r['k']:>7} {r['mode']:<15} {r['backend']:<7} {r['ms_median']:>10.4f} {r['ms_p20']:>8.4f} "
            f"{r['ms_p80']:>8.4f} {r['gbps_at_median']:>7.0f} {r['peak_above_inputs_mib']:>9.1f} "
            f"{r['host_us_per_call']:>8.1f} {speedup:>7.2f}x"
        )


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit(f"bench_{OP}: needs a CUDA GPU (it times the Triton kernels on the device); none is available here")
    kernels = import_kernels()
    env = environment(kernels)
    print(f"bench_{OP}: {env['gpu']}, torch {env['torch']}, triton {env['triton']}", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    results = []
    for s in args.seqlens:
        results.extend(bench_seqlen(kernels, args, s, gen))
        torch.cuda.empty_cache()
    payload = {
        "op": OP,
        "environment": env,
        "config": vars(args),
        "quantiles": QUANTILES,
        "notes": "ms from triton.testing.do_bench (L2 flushed between calls); peak_above_inputs_mib: "
        "max_memory_allocated during one call minus memory_allocated before it; host_us_per_call: CPU time to "
        "issue one call (no sync), the floor of ms_median when the GPU work is shorter; model_bytes: least bytes "
        "read + written; fwd*: nothing requires grad; fwd_bwd*: x and rows require grad; fwd_bwd_inplace includes x = "
        "x_leaf * 1 and its backward in both backends.",
        "results": results,
    }
    path = write_json(args.out, payload, OP)
    print(f"\nwrote {path}\n")
    print_table(results)


if __name__ == "__main__":
    main()
