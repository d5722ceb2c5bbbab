"""lemo_ds.kernels.gather_rows: the Triton kernel against the torch reference.

On a machine with CUDA the tensors live on the GPU and the kernels are compiled; elsewhere they run in Triton's
CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before lemo_ds.kernels is imported).
"""

import importlib

import pytest
import torch
from kernel_checks import DEVICE, fail_unless_interpreted, make_index, poison_empty, rand  # noqa: F401 (fixture)

kernels = importlib.import_module("lemo_ds.kernels")
gather_mod = importlib.import_module("lemo_ds.kernels.gather_rows")  # the module, not the function of its name
gather_rows, gather_rows_ref = kernels.gather_rows, kernels.gather_rows_ref
resolve_backend, triton_usable = kernels.resolve_backend, kernels.triton_usable

# (b, s, h, k): degenerate, odd sizes, several column tiles, every row kept (k == s), one row kept.
SMALL_SHAPES = [(1, 1, 1, 1), (2, 37, 33, 5), (2, 16, 24, 16), (2, 40, 8, 1)]
LARGE_SHAPES = [(3, 130, 257, 64), (1, 300, 1000, 300), (2, 64, 96, 64)]
FP32, BF16, FP16 = (torch.float32, 1e-6, 1e-6), (torch.bfloat16, 1e-2, 1e-2), (torch.float16, 1e-3, 1e-3)
# Every shape in fp32 and bf16; fp16 (the same 2-byte copies as bf16) on the small shapes only: the interpreter
# runs ~3 ms per program, and the large shapes are hundreds of programs per launch.
CASES = [
    pytest.param(*shape, *dt, id="x".join(map(str, shape)) + "-" + str(dt[0]).removeprefix("torch."))
    for shapes, dtypes in ((SMALL_SHAPES, (FP32, BF16, FP16)), (LARGE_SHAPES, (FP32, BF16)))
    for shape in shapes
    for dt in dtypes
]
# The comparisons of copies are exact (torch.equal); atol/rtol serve only where a test sums (broadcast cos/sin).


@pytest.fixture(autouse=True, scope="module")
def _kernels_interpreted():
    fail_unless_interpreted(gather_mod._gather_rows_kernel)


def expected_gather(t, index):  # t [bc, s, n] -> [b, k, n], by explicit loop
    b = index.shape[0]
    return torch.stack([t[bi if t.shape[0] > 1 else 0][index[bi].long()] for bi in range(b)])


def expected_scatter(g, index, s):  # g [b, k, n] -> [b, s, n], zero on eliminated rows
    out = torch.zeros(g.shape[0], s, g.shape[2], dtype=g.dtype, device=g.device)
    for bi in range(g.shape[0]):
        out[bi, index[bi].long()] = g[bi]
    return out


@pytest.mark.parametrize("b, s, h, k, dtype, atol, rtol", CASES)
def test_forward_backward(b, s, h, k, dtype, atol, rtol, poison_empty):  # noqa: F811
    """The layer's case: x requires grad, cos/sin are shared by the batch and do not."""
    check_gather(b, s, h, k, dtype, atol, rtol, rope="shared", rope_grad=False)


@pytest.mark.parametrize("dtype, atol, rtol", [FP32, BF16, FP16], ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("b, s, h, k", [(2, 37, 33, 5), (3, 16, 24, 16)], ids=["2x37x33x5", "3x16x24x16"])
@pytest.mark.parametrize("rope", ["none", "shared", "per_sample"])
def test_rope_gradients(b, s, h, k, dtype, atol, rtol, rope, poison_empty):  # noqa: F811
    """No cos/sin, or cos/sin that require grad, shared by the batch (bc == 1: gradients sum over it) or not."""
    check_gather(b, s, h, k, dtype, atol, rtol, rope=rope, rope_grad=True)


def check_gather(b, s, h, k, dtype, atol, rtol, rope, rope_grad):
    """Outputs against the reference (bit for bit) and an explicit loop; every gradient likewise."""
    gen = torch.Generator().manual_seed(b * 1000 + s + h + k)
    d = 6  # not a power of two
    index = make_index(b, s, k, gen)
    x = rand((b, s, h), dtype, gen).requires_grad_()
    cos = sin = None
    if rope != "none":
        bc = 1 if rope == "shared" else b
        cos = rand((bc, s, d), dtype, gen).requires_grad_(rope_grad)
        sin = rand((bc, s, d), dtype, gen).requires_grad_(rope_grad)
    inputs = [t for t in (x, cos, sin) if t is not None and t.requires_grad]

    out_t = gather_rows(x, index, cos, sin, backend="triton")
    out_r = gather_rows(x, index, cos, sin, backend="torch")
    for a, r, src in zip(out_t, out_r, (x, cos, sin), strict=True):
        if src is None:
            assert a is None and r is None
            continue
        assert torch.equal(a, r)  # both backends are pure copies: bit for bit
        assert torch.equal(a, expected_gather(src.detach(), index))
        assert a.shape == (b, k, src.shape[2]) and a.is_contiguous()

    grads_out = [rand(o.shape, dtype, gen) for o in out_r if o is not None and o.requires_grad]
    grads_t = torch.autograd.grad([o for o in out_t if o is not None and o.requires_grad], inputs, grads_out)
    grads_r = torch.autograd.grad([o for o in out_r if o is not None and o.requires_grad], inputs, grads_out)
    for src, g_out, g_t, g_r in zip(inputs, grads_out, grads_t, grads_r, strict=True):
        assert g_t.shape == src.shape and g_t.dtype == src.dtype
        assert torch.equal(g_t, g_r)
        expected = expected_scatter(g_out, index, s)
        if src.shape[0] == 1 and b > 1:  # cos/sin shared by the batch: gradients sum over it
            expected = expected.float().sum(0, keepdim=True).to(dtype)
        torch.testing.assert_close(g_t, expected, atol=atol, rtol=rtol)
    # Eliminated rows get exactly zero gradient.
    kept = torch.zeros(b, s, dtype=torch.bool, device=DEVICE)
    kept.scatter_(1, index, True)
    assert (grads_t[0][~kept] == 0).all()


def test_cos_sin_without_grad_are_not_differentiable():
    gen = torch.Generator().manual_seed(1)
    b, s, h, k, d = 2, 20, 12, 7, 4
    x = rand((b, s, h), torch.float32, gen).requires_grad_()
    cos, sin = rand((1, s, d), torch.float32, gen), rand((1, s, d), torch.float32, gen)
    x_kept, cos_kept, sin_kept = gather_rows(x, make_index(b, s, k, gen), cos, sin, backend="triton")
    assert x_kept.requires_grad and not cos_kept.requires_grad and not sin_kept.requires_grad
    (x_kept * 2).sum().backward()
    assert x.grad is not None

    x_kept, _, _ = gather_rows(x.detach(), make_index(b, s, k, gen), cos, sin, backend="triton")
    assert not x_kept.requires_grad


def test_unused_output_gradient():
    """Only cos_kept is used: x still gets a (zero) gradient from autograd, cos gets its own."""
    gen = torch.Generator().manual_seed(2)
    b, s, h, k, d = 2, 20, 12, 7, 4
    index = make_index(b, s, k, gen)
    x = rand((b, s, h), torch.float32, gen).requires_grad_()
    cos = rand((b, s, d), torch.float32, gen).requires_grad_()
    sin = rand((b, s, d), torch.float32, gen)
    _, cos_kept, _ = gather_rows(x, index, cos, sin, backend="triton")
    g = rand(cos_kept.shape, torch.float32, gen)
    cos_kept.backward(g)
    assert x.grad is None
    assert torch.equal(cos.grad, expected_scatter(g, index, s))


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_strided_inputs_and_int32_index(index_dtype):
    """Sliced hidden states, an expanded (stride-0) cos, a transposed sin, and a stride-0 incoming gradient."""
    gen = torch.Generator().manual_seed(3)
    b, s, h, k, d = 3, 29, 18, 11, 8
    index = make_index(b, s, k, gen, index_dtype)
    big = rand((b, 2 * s, h + 5), torch.bfloat16, gen).requires_grad_()
    x = big[:, ::2, 2 : 2 + h]  # [b, s, h], non-contiguous
    cos = rand((1, s, d), torch.bfloat16, gen).expand(b, s, d)  # [b, s, d], batch stride 0
    sin = rand((b, d, s), torch.bfloat16, gen).transpose(1, 2)  # [b, s, d], column stride s
    out_t = gather_rows(x, index, cos, sin, backend="triton")
    out_r = gather_rows_ref(x, index, cos, sin)
    assert all(torch.equal(a, r) for a, r in zip(out_t, out_r, strict=True))
    (g_t,) = torch.autograd.grad(out_t[0].sum(), big)  # sum's backward hands over an expanded, stride-0 gradient
    (g_r,) = torch.autograd.grad(out_r[0].sum(), big)
    assert torch.equal(g_t, g_r)


def test_column_tiles(monkeypatch):
    """Rows wider than one program's block (several tiles along grid axis 1), with cos/sin narrower than x."""
    monkeypatch.setattr(gather_mod, "_MAX_BLOCK_BYTES", 16)  # 4 fp32 / 8 bf16 columns per program
    gen = torch.Generator().manual_seed(4)
    for dtype, (b, s, h, k, d) in [(torch.float32, (2, 9, 13, 4, 6)), (torch.bfloat16, (1, 7, 5, 3, 19))]:
        index = make_index(b, s, k, gen)
        x = rand((b, s, h), dtype, gen).requires_grad_()
        cos, sin = rand((1, s, d), dtype, gen).requires_grad_(), rand((1, s, d), dtype, gen).requires_grad_()
        out_t = gather_rows(x, index, cos, sin, backend="triton")
        out_r = gather_rows_ref(x, index, cos, sin)
        assert all(torch.equal(a, r) for a, r in zip(out_t, out_r, strict=True))
        gs = [rand(o.shape, dtype, gen) for o in out_r]
        grads_t = torch.autograd.grad(out_t, (x, cos, sin), gs)
        grads_r = torch.autograd.grad(out_r, (x, cos, sin), gs)
        assert all(torch.equal(a, r) for a, r in zip(grads_t, grads_r, strict=True))


def test_nothing_kept():
    x = torch.randn(2, 5, 3, device=DEVICE, requires_grad=True)
    index = torch.empty(2, 0, dtype=torch.int64, device=DEVICE)
    x_kept, _, _ = gather_rows(x, index, backend="triton")
    assert x_kept.shape == (2, 0, 3)
    x_kept.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_input_errors():
    x = torch.randn(2, 10, 4, device=DEVICE)
    index = torch.tensor([[1, 3], [0, 9]], device=DEVICE)
    cos = torch.randn(1, 10, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"x must be a \[b, s, h\]"):
        gather_rows(x[0], index)
    with pytest.raises(ValueError, match=r"index must be a \[b, k\]"):
        gather_rows(x, index[0])
    with pytest.raises(TypeError, match="int64 or int32"):
        gather_rows(x, index.float())
    with pytest.raises(ValueError, match="batch size"):
        gather_rows(x, index[:1])
    with pytest.raises(ValueError, match="only s=10"):
        gather_rows(x, torch.arange(11, device=DEVICE).expand(2, 11))
    with pytest.raises(ValueError, match="both cos and sin"):
        gather_rows(x, index, cos, None)
    with pytest.raises(ValueError, match="cos has shape"):
        gather_rows(x, index, torch.randn(3, 10, 4, device=DEVICE), torch.randn(3, 10, 4, device=DEVICE))
    with pytest.raises(ValueError, match="same shape"):
        gather_rows(x, index, cos, torch.randn(1, 10, 5, device=DEVICE))
    with pytest.raises(ValueError, match="is on"):
        gather_rows(x, index.to("meta"))


def test_resolve_backend(monkeypatch):
    dev = torch.zeros(1, device=DEVICE)  # where the kernels run here: CUDA, or CPU under the interpreter
    assert triton_usable(dev)
    # "auto" takes Triton on CUDA only: never the CPU interpreter, which is for checking the kernels.
    assert resolve_backend("auto", dev, None) == ("triton" if dev.is_cuda else "torch")
    assert resolve_backend("triton", dev) == "triton"
    assert resolve_backend("torch", dev) == "torch"
    with pytest.raises(ValueError, match="'auto', 'triton', 'torch'"):
        resolve_backend("cuda", dev)
    meta = torch.empty(1, device="meta")
    assert not triton_usable(dev, meta)  # neither all CUDA nor all CPU
    with pytest.raises(RuntimeError, match="all of them on CUDA"):
        resolve_backend("triton", dev, meta)

    # CPU tensors without the interpreter (the env var is read per call) are not Triton's.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.zeros(1)
    assert not triton_usable(cpu)
    assert resolve_backend("auto", cpu) == "torch"
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1 is not set.*'auto'.*'torch'"):
        resolve_backend("triton", cpu)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 is not set"):
        gather_rows(torch.randn(1, 4, 2), torch.tensor([[1]]), backend="triton")
    # "auto" falls back to the reference, which gives the same values.
    x, index = torch.randn(2, 4, 3), torch.tensor([[0, 2], [1, 3]])
    assert torch.equal(gather_rows(x, index)[0], expected_gather(x, index))
