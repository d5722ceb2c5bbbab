"""Benchmark lemo_ds.kernels.gather_rows: the Triton kernel against the torch reference, on CUDA.

    python benchmarks/kernels/bench_gather_rows.py [--out DIR_OR_FILE.json] [--seqlens 8192 32768 131072]
        [--hidden 4096] [--head-dim 128] [--keep 0.4] [--block 64] [--batch 1] [--dtype bf16]

For each sequence length it times, with ``triton.testing.do_bench`` (median and 20th/80th percentiles, in ms):
``fwd`` (gather x and cos/sin, nothing requires grad) and ``fwd_bwd`` (x requires grad, cos/sin do not, as in the
layer; the backward scatters the gradient into a zero [b, s, h]). It records the peak CUDA memory each step
allocates above what was allocated before it, the bytes the step must move at least (reads + writes, the
``model_bytes``) and the bandwidth that implies. Kept rows are whole blocks of ``--block`` tokens chosen at random,
as LeMo keeps them. Everything goes to a JSON file (GPU, versions, git commit, exact command); a table is printed
last.
"""

import torch

# _kernel_bench: this folder is first on sys.path when a bench runs as a script
from _kernel_bench import DTYPES, bench_parser, kept_index, parse_kept_rows_args, run_mode_benchmark, time_backends

OP = "gather_rows"
NOTES = "fwd: nothing requires grad; fwd_bwd: x requires grad, cos/sin do not."


def parse_args(argv=None):
    p = bench_parser(OP, __doc__, seqlens=[8192, 32768, 131072])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--head-dim", type=int, default=128, help="width of cos/sin (0: no cos/sin)")
    return parse_kept_rows_args(p, argv)  # --keep, --block, --batch, --dtype, then the timing options


def bench_seqlen(kernels, args, s, gen):
    dtype = DTYPES[args.dtype]
    b, h, d = args.batch, args.hidden, args.head_dim
    index = kept_index(b, s, args.keep, args.block, gen)  # [b, k]
    k = index.shape[1]
    x = torch.randn(b, s, h, generator=gen).to("cuda", dtype)  # [b, s, h]
    cos = sin = None
    if d:
        cos = torch.randn(1, s, d, generator=gen).to("cuda", dtype)  # [1, s, d], shared by the batch as in HF
        sin = torch.randn(1, s, d, generator=gen).to("cuda", dtype)
    grad = torch.randn(b, k, h, generator=gen).to("cuda", dtype)  # [b, k, h]

    # Sanity before timing: both backends are pure copies, so they must agree bit for bit.
    out_t = kernels.gather_rows(x, index, cos, sin, backend="triton")
    out_r = kernels.gather_rows_ref(x, index, cos, sin)
    match = all((a is None and r is None) or torch.equal(a, r) for a, r in zip(out_t, out_r, strict=True))
    xg = x.detach().requires_grad_()
    g_t = torch.autograd.grad(kernels.gather_rows(xg, index, cos, sin, backend="triton")[0], xg, grad)[0]
    g_r = torch.autograd.grad(kernels.gather_rows_ref(xg, index, cos, sin)[0], xg, grad)[0]
    match = match and torch.equal(g_t, g_r)
    del out_t, out_r, g_t, g_r
    if not match:
        raise SystemExit(f"{OP}: Triton and torch results differ at s={s}: not timing a wrong kernel")

    es = x.element_size()
    rope_bytes = 2 * 2 * b * k * d * es if d else 0  # cos and sin rows: read + write
    fwd_bytes = 2 * b * k * h * es + rope_bytes + index.numel() * index.element_size()
    bwd_bytes = b * k * h * es + b * s * h * es  # read the kept gradient rows, write the whole zero-filled grad_x

    def modes(gather):  # gather_rows with one backend
        return (
            ("fwd", lambda: gather(x, index, cos, sin), None, fwd_bytes),
            ("fwd_bwd", lambda: gather(xg, index, cos, sin)[0].backward(grad), [xg], fwd_bytes + bwd_bytes),
        )

    shape = {"b": b, "s": s, "h": h, "k": k, "head_dim": d}
    return time_backends(OP, kernels.gather_rows, kernels.gather_rows_ref, modes, shape, args)


def main(argv=None):
    run_mode_benchmark(OP, parse_args(argv), bench_seqlen, NOTES)


if __name__ == "__main__":
    main()
