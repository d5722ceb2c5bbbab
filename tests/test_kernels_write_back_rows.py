"""lemo_ds.kernels.write_back_rows: the Triton kernels against the torch reference.

On a machine with CUDA the tensors live on the GPU and the kernels are compiled; elsewhere they run in Triton's
CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before lemo_ds.kernels is imported).
"""

import importlib

import pytest
import torch
from kernel_checks import DEVICE, fail_unless_interpreted, make_index, poison_empty, rand  # noqa: F401 (fixture)

kernels = importlib.import_module("lemo_ds.kernels")
# The modules, not the functions of the same names that lemo_ds.kernels exports.
gather_mod = importlib.import_module("lemo_ds.kernels.gather_rows")
write_back_mod = importlib.import_module("lemo_ds.kernels.write_back_rows")
write_back_rows, write_back_rows_ref = kernels.write_back_rows, kernels.write_back_rows_ref

# (b, s, h, k): degenerate, odd sizes, several column tiles, every row kept (k == s), one row kept.
SMALL_SHAPES = [(1, 1, 1, 1), (2, 37, 33, 5), (2, 16, 24, 16), (2, 40, 8, 1)]
LARGE_SHAPES = [(3, 130, 257, 64), (1, 300, 1000, 300), (2, 64, 96, 64)]
FP32, BF16, FP16 = (torch.float32, 0.0, 0.0), (torch.bfloat16, 0.0, 0.0), (torch.float16, 0.0, 0.0)
# Every shape in fp32 and bf16; fp16 (the same 2-byte copies as bf16) on the small shapes only: the interpreter
# runs ~3 ms per program, and the large shapes are hundreds of programs per launch. The op only copies, so every
# comparison is exact (atol = rtol = 0, and torch.equal between the backends).
CASES = [
    pytest.param(*shape, *dt, id="x".join(map(str, shape)) + "-" + str(dt[0]).removeprefix("torch."))
    for shapes, dtypes in ((SMALL_SHAPES, (FP32, BF16, FP16)), (LARGE_SHAPES, (FP32, BF16)))
    for shape in shapes
    for dt in dtypes
]
INPLACE_CASES = [
    pytest.param(*shape, *dt, id="x".join(map(str, shape)) + "-" + str(dt[0]).removeprefix("torch."))
    for shape, dt in [((1, 1, 1, 1), FP32), ((2, 37, 33, 5), BF16), ((2, 16, 24, 16), FP16), ((3, 130, 257, 64), BF16)]
]


@pytest.fixture(autouse=True, scope="module")
def _kernels_interpreted():
    fail_unless_interpreted(write_back_mod._scatter_rows_kernel)


def kept_mask(index, s):  # [b, s] bool
    mask = torch.zeros(index.shape[0], s, dtype=torch.bool, device=index.device)
    return mask.scatter_(1, index.long(), True)


def expected_out(x, rows, index):  # by explicit loop
    out = x.detach().clone()
    for bi in range(x.shape[0]):
        out[bi, index[bi].long()] = rows[bi].detach()
    return out


def expected_grads(g, index):  # (grad_x, grad_rows) for out's gradient g
    grad_x = g.clone()
    grad_x[kept_mask(index, g.shape[1])] = 0
    grad_rows = torch.stack([g[bi, index[bi].long()] for bi in range(g.shape[0])])
    return grad_x, grad_rows


@pytest.mark.parametrize("b, s, h, k, dtype, atol, rtol", CASES)
def test_forward_backward(b, s, h, k, dtype, atol, rtol, poison_empty):  # noqa: F811
    gen = torch.Generator().manual_seed(b * 1000 + s + h + k)
    index = make_index(b, s, k, gen)
    x = rand((b, s, h), dtype, gen).requires_grad_()
    rows = rand((b, k, h), dtype, gen).requires_grad_()
    x_before = x.detach().clone()

    out_t = write_back_rows(x, rows, index, backend="triton")
    out_r = write_back_rows(x, rows, index, backend="torch")
    assert out_t.shape == x.shape and out_t.dtype == dtype and out_t is not x
    assert torch.equal(out_t, out_r)  # both backends are pure copies: bit for bit
    torch.testing.assert_close(out_t, expected_out(x, rows, index), atol=atol, rtol=rtol)
    assert torch.equal(x.detach(), x_before)  # out of place: x untouched
    eliminated = ~kept_mask(index, s)
    assert torch.equal(out_t.detach()[eliminated], x_before[eliminated])  # identity on eliminated rows

    g = rand((b, s, h), dtype, gen)
    g_before = g.clone()
    grads_t = torch.autograd.grad(out_t, (x, rows), g)
    grads_r = torch.autograd.grad(out_r, (x, rows), g)
    assert torch.equal(g, g_before)  # the incoming gradient is never modified (autograd may share it)
    for g_t, g_r, g_e, src in zip(grads_t, grads_r, expected_grads(g, index), (x, rows), strict=True):
        assert g_t.shape == src.shape and g_t.dtype == dtype
        assert torch.equal(g_t, g_r)
        torch.testing.assert_close(g_t, g_e, atol=atol, rtol=rtol)
    assert torch.equal(grads_t[0][eliminated], g[eliminated])  # identity on eliminated rows, backward too


@pytest.mark.parametrize("b, s, h, k, dtype, atol, rtol", INPLACE_CASES)
def test_inplace(b, s, h, k, dtype, atol, rtol, poison_empty):  # noqa: F811
    """x (a non-leaf) is modified in place and returned; the gradients still reach its leaf and rows."""
    gen = torch.Generator().manual_seed(7 + b * 1000 + s + h + k)
    index = make_index(b, s, k, gen)
    leaf = rand((b, s, h), dtype, gen).requires_grad_()
    rows = rand((b, k, h), dtype, gen).requires_grad_()
    kept = kept_mask(index, s)
    expected = expected_out(leaf, rows, index)

    outs, grads = [], []
    for backend in ("triton", "torch"):
        x = leaf * 1  # a non-leaf, as the residual stream is
        with torch.no_grad():
            x[kept] = float("nan")  # poison the rows the write must cover (mul's backward saves nothing of x)
        version = x._version
        out = write_back_rows(x, rows, index, inplace=True, backend=backend)
        assert out is x and x._version > version
        assert out.requires_grad and out.grad_fn is not None
        torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
        g = rand((b, s, h), dtype, torch.Generator().manual_seed(11))
        outs.append(out.detach())
        grads.append(torch.autograd.grad(out, (leaf, rows), g))
    assert torch.equal(outs[0], outs[1])
    for g_t, g_r, g_e in zip(grads[0], grads[1], expected_grads(g, index), strict=True):
        assert torch.equal(g_t, g_r)
        torch.testing.assert_close(g_t, g_e, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_inplace_leaf_errors(backend):
    gen = torch.Generator().manual_seed(3)
    b, s, h, k = 2, 12, 5, 4
    index = make_index(b, s, k, gen)
    rows = rand((b, k, h), torch.float32, gen)
    leaf = rand((b, s, h), torch.float32, gen).requires_grad_()
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match=r"x is a leaf tensor that requires grad.*inplace=False"):
        write_back_rows(leaf, rows, index, inplace=True, backend=backend)
    with pytest.raises(RuntimeError, match="x is a view of a leaf tensor that requires grad"):
        write_back_rows(leaf[:, 1:], rows, index, inplace=True, backend=backend)
    assert torch.equal(leaf.detach(), before)  # refused before anything was written

    with torch.no_grad():  # as torch allows in-place updates of leaves there (optimizer steps)
        out = write_back_rows(leaf, rows, index, inplace=True, backend=backend)
    assert out is leaf and torch.equal(out.detach(), expected_out(before, rows, index))

    plain = rand((b, s, h), torch.float32, gen)  # a leaf without grad: in place is fine, and rows get gradients
    rows_g = rows.clone().requires_grad_()
    out = write_back_rows(plain, rows_g, index, inplace=True, backend=backend)
    assert out is plain and out.requires_grad
    out.sum().backward()
    assert torch.equal(rows_g.grad, torch.ones_like(rows))


def test_inplace_into_view_of_non_leaf():
    """In place into a slice of a non-leaf (autograd rebases the base's history): same gradients as the reference."""
    gen = torch.Generator().manual_seed(4)
    b, s, h, k = 2, 19, 10, 6
    index = make_index(b, s, k, gen)
    leaf = rand((b, s + 3, h + 2), torch.bfloat16, gen).requires_grad_()
    rows = rand((b, k, h), torch.bfloat16, gen).requires_grad_()
    g = rand((b, s + 3, h + 2), torch.bfloat16, gen)
    results = []
    for backend in ("triton", "torch"):
        base = leaf * 1
        x = base[:, 3:, 1 : 1 + h]  # [b, s, h], non-contiguous
        write_back_rows(x, rows, index, inplace=True, backend=backend)
        results.append((base.detach(), *torch.autograd.grad(base, (leaf, rows), g)))
    for a, r in zip(*results, strict=True):
        assert torch.equal(a, r)


def test_grad_shared_with_another_branch():
    """add's backward hands the same gradient tensor to both inputs: the other branch must see it unmodified."""
    gen = torch.Generator().manual_seed(5)
    b, s, h, k = 2, 21, 9, 8
    index = make_index(b, s, k, gen)
    x = rand((b, s, h), torch.float32, gen).requires_grad_()
    rows = rand((b, k, h), torch.float32, gen).requires_grad_()
    other = rand((b, s, h), torch.float32, gen).requires_grad_()
    g = rand((b, s, h), torch.float32, gen)
    (write_back_rows(x, rows, index, backend="triton") + other).backward(g)
    assert torch.equal(other.grad, g)
    grad_x, grad_rows = expected_grads(g, index)
    assert torch.equal(x.grad, grad_x) and torch.equal(rows.grad, grad_rows)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_strided_inputs_and_int32_index(index_dtype):
    """Sliced x, transposed rows, and a stride-0 incoming gradient (sum's backward expands a scalar)."""
    gen = torch.Generator().manual_seed(6)
    b, s, h, k = 3, 29, 18, 11
    index = make_index(b, s, k, gen, index_dtype)
    big = rand((b, 2 * s, h + 5), torch.float16, gen).requires_grad_()
    rows = rand((b, h, k), torch.float16, gen).transpose(1, 2).requires_grad_()  # [b, k, h], column stride k
    results = []
    for backend in ("triton", "torch"):
        x = big[:, ::2, 2 : 2 + h]  # [b, s, h], non-contiguous
        out = write_back_rows(x, rows, index, backend=backend)
        results.append((out.detach(), *torch.autograd.grad(out.sum(), (big, rows))))
    for a, r in zip(*results, strict=True):
        assert torch.equal(a, r)
    grad_big, grad_rows = results[0][1:]
    assert torch.equal(grad_rows, torch.ones_like(rows))
    assert torch.equal(grad_big[:, ::2, 2 : 2 + h], (~kept_mask(index, s)).unsqueeze(-1).expand(b, s, h).half())


def test_column_tiles(monkeypatch):
    """Rows wider than one program's block: several column tiles (grid axis 1) in every kernel."""
    monkeypatch.setattr(gather_mod, "_MAX_BLOCK_BYTES", 16)  # 4 fp32 / 8 bf16 columns per program
    gen = torch.Generator().manual_seed(8)
    for dtype, (b, s, h, k) in [(torch.float32, (2, 9, 13, 4)), (torch.bfloat16, (1, 7, 19, 3))]:
        index = make_index(b, s, k, gen)
        leaf = rand((b, s, h), dtype, gen).requires_grad_()
        rows = rand((b, k, h), dtype, gen).requires_grad_()
        g = rand((b, s, h), dtype, gen)
        for inplace in (False, True):
            results = []
            for backend in ("triton", "torch"):
                out = write_back_rows(leaf * 1, rows, index, inplace=inplace, backend=backend)
                results.append((out.detach(), *torch.autograd.grad(out, (leaf, rows), g)))
            for a, r in zip(*results, strict=True):
                assert torch.equal(a, r)


def test_without_autograd(poison_empty):  # noqa: F811
    """Nothing requires grad (or no_grad): the kernels run without the autograd Function, same results."""
    gen = torch.Generator().manual_seed(9)
    b, s, h, k = 2, 15, 7, 6
    index = make_index(b, s, k, gen)
    x, rows = rand((b, s, h), torch.bfloat16, gen), rand((b, k, h), torch.bfloat16, gen)
    expected = expected_out(x, rows, index)
    out = write_back_rows(x, rows, index, backend="triton")
    assert torch.equal(out, expected) and not out.requires_grad and out is not x
    with torch.no_grad():
        out = write_back_rows(x.requires_grad_(), rows, index, backend="triton")
    assert torch.equal(out, expected) and not out.requires_grad
    assert torch.equal(write_back_rows(x.detach(), rows, index, inplace=True, backend="triton"), expected)


def test_nothing_kept():
    x = torch.randn(2, 5, 3, device=DEVICE, requires_grad=True)
    rows = torch.randn(2, 0, 3, device=DEVICE, requires_grad=True)
    index = torch.empty(2, 0, dtype=torch.int64, device=DEVICE)
    out = write_back_rows(x, rows, index, backend="triton")
    assert torch.equal(out, x)
    g = torch.randn(2, 5, 3, device=DEVICE)
    out.backward(g)
    assert torch.equal(x.grad, g) and rows.grad.shape == (2, 0, 3)


def test_input_errors():
    x = torch.randn(2, 10, 4, device=DEVICE)
    index = torch.tensor([[1, 3], [0, 9]], device=DEVICE)
    rows = torch.randn(2, 2, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"rows must be \[b, k, h\] = \[2, 2, 4\]"):
        write_back_rows(x, rows[:, :1], index)
    with pytest.raises(ValueError, match="rows must be"):
        write_back_rows(x, rows[..., :3], index)
    with pytest.raises(TypeError, match=r"rows dtype torch\.bfloat16 differs from x dtype torch\.float32"):
        write_back_rows(x, rows.bfloat16(), index)
    with pytest.raises(TypeError, match="int64 or int32"):
        write_back_rows(x, rows, index.float())
    with pytest.raises(ValueError, match="batch size"):
        write_back_rows(x, rows, index[:1])
    with pytest.raises(ValueError, match=r"x must be a \[b, s, h\]"):
        write_back_rows(x[0], rows, index)
    with pytest.raises(ValueError, match="rows is on meta"):
        write_back_rows(x, rows.to("meta"), index)
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        write_back_rows(x, rows, index, backend="cuda")
    with pytest.raises(TypeError, match="int64 or int32"):
        write_back_rows_ref(x, rows, index.short())


def test_backend_torch_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # read per call: CPU tensors are no longer Triton's
    x, rows, index = torch.randn(2, 6, 3), torch.randn(2, 2, 3), torch.tensor([[0, 5], [2, 3]])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        write_back_rows(x, rows, index, backend="triton")
    assert torch.equal(write_back_rows(x, rows, index), expected_out(x, rows, index))  # "auto": the reference
