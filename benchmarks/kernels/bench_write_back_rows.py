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

import torch

# _kernel_bench: this folder is first on sys.path when a bench runs as a script
from _kernel_bench import DTYPES, bench_parser, kept_index, parse_kept_rows_args, run_mode_benchmark, time_backends

OP = "write_back_rows"
NOTES = (
    "fwd*: nothing requires grad; fwd_bwd*: x and rows require grad; fwd_bwd_inplace includes x = x_leaf * 1 and its "
    "backward in both backends."
)


def parse_args(argv=None):
    p = bench_parser(OP, __doc__, seqlens=[8192, 32768, 131072])
    p.add_argument("--hidden", type=int, default=4096)
    return parse_kept_rows_args(p, argv)  # --keep, --block, --batch, --dtype, then the timing options


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

    def modes(write_back):  # write_back_rows with one backend
        return (
            ("fwd", lambda: write_back(x, rows, index), None, fwd_bytes),
            ("fwd_inplace", lambda: write_back(x, rows, index, inplace=True), None, inplace_bytes),
            ("fwd_bwd", lambda: write_back(xg, rows_g, index).backward(grad), [xg, rows_g], fwd_bytes + bwd_bytes),
            (
                "fwd_bwd_inplace",
                lambda: write_back(xg * 1, rows_g, index, inplace=True).backward(grad),
                [xg, rows_g],
                inplace_bytes + bwd_bytes,
            ),
        )

    shape = {"b": b, "s": s, "h": h, "k": k}
    return time_backends(OP, kernels.write_back_rows, kernels.write_back_rows_ref, modes, shape, args)


def main(argv=None):
    run_mode_benchmark(OP, parse_args(argv), bench_seqlen, NOTES)


if __name__ == "__main__":
    main()
