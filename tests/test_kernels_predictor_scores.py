"""lemo_ds.kernels.predictor_scores: the two Triton launches against the plain-torch path, and both against the
differentiable predictor module (lemo_ds.predictors.module) that training uses.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below before lemo_ds.kernels is imported);
shapes are small.
"""

import importlib
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

kernel_mod = importlib.import_module("lemo_ds.kernels.predictor_scores")
predictor_scores, predictor_scores_ref = kernel_mod.predictor_scores, kernel_mod.predictor_scores_ref

from lemo_ds.predictors.module import LayerPredictor, PredictorDesign  # noqa: E402

# (b, s, h, B, r1, r2): a partial tail block, a sequence shorter than one block, odd hidden sizes and ranks that
# are not powers of two (zero-padded), blocks of 16/32/64, more query-block tiles than one (n = 80 > 64).
SHAPES = [
    (2, 200, 48, 32, 8, 16),
    (1, 256, 64, 64, 24, 20),
    (3, 37, 40, 16, 5, 7),
    (1, 10, 33, 16, 3, 16),
    (1, 1280, 16, 16, 4, 8),
]
IDS = ["x".join(map(str, shape)) for shape in SHAPES]


def make(b, s, h, B, r1, r2, dtype, seed=0):
    predictor = LayerPredictor(h, PredictorDesign(hidden_rank=r1, out_rank=r2), seed=seed).to(DEVICE)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # biases away from zero, so every branch (masking, softplus sign) is exercised
        for param in (predictor.b1q, predictor.b1k, predictor.dist_bias):
            param.copy_(torch.randn(param.shape, generator=gen))
    x = (torch.randn(b, s, h, generator=gen) * 3).to(DEVICE, dtype)
    n = -(-s // B)
    return predictor, x, n


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_matches_torch_and_the_module(shape, dtype):
    b, s, h, B, r1, r2 = shape
    predictor, x, n = make(*shape, dtype)
    packed, dist = predictor.packed(dtype), predictor.dist_table(n, x.device).detach()
    reference = predictor_scores_ref(x, packed, dist, B)
    fused = predictor_scores(x, packed, dist, B, backend="triton")
    assert fused.shape == (b, n) and fused.dtype == torch.float32
    # fp32: summation order only. bf16: the kernel keeps x W1^T in fp32, torch rounds it to bf16 first.
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 2e-2}
    torch.testing.assert_close(fused, reference, **tol)
    with torch.no_grad():
        _, module_scores = predictor(x, B)
    torch.testing.assert_close(module_scores, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shared", [False, True], ids=["per-sample", "shared"])
def test_lo_block_limits_each_column(shared):
    b, s, h, B, r1, r2 = 3, 160, 32, 16, 8, 16
    predictor, x, n = make(b, s, h, B, r1, r2, torch.float32, seed=3)
    lo = torch.randint(0, n, (1 if shared else b, n), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    lo = torch.minimum(lo, torch.arange(n, device=DEVICE))  # a query block reaches at least itself
    packed, dist = predictor.packed(torch.float32), predictor.dist_table(n, x.device).detach()
    reference = predictor_scores_ref(x, packed, dist, B, lo)
    torch.testing.assert_close(predictor_scores(x, packed, dist, B, lo, backend="triton"), reference,
                               atol=1e-4, rtol=1e-4)  # fmt: skip
    with torch.no_grad():
        _, module_scores = predictor(x, B, lo.expand(b, -1))
    torch.testing.assert_close(module_scores, reference, atol=1e-4, rtol=1e-4)
    # Column J only sums query blocks that reach it: with every query block reaching only itself, S(J) is the
    # diagonal tile alone.
    diagonal = predictor_scores_ref(x, packed, dist, B, torch.arange(n, device=DEVICE)[None])
    full = predictor_scores_ref(x, packed, dist, B)
    assert torch.all(diagonal <= full + 1e-6) and torch.all(diagonal > 0)


def test_non_contiguous_input_and_auto_backend():
    predictor, x, n = make(2, 96, 40, 16, 6, 16, torch.float32, seed=5)
    strided = x.transpose(1, 2).contiguous().transpose(1, 2)  # [b, s, h] with strides (h s, 1, s)
    assert not strided.is_contiguous()
    packed, dist = predictor.packed(torch.float32), predictor.dist_table(n, x.device).detach()
    torch.testing.assert_close(predictor_scores(strided, packed, dist, 16), predictor_scores_ref(x, packed, dist, 16),
                               atol=1e-4, rtol=1e-4)  # fmt: skip


def test_bad_inputs_are_named():
    predictor, x, n = make(1, 64, 32, 16, 4, 16, torch.float32)
    packed, dist = predictor.packed(torch.float32), predictor.dist_table(n, x.device).detach()
    with pytest.raises(ValueError, match="hidden size 32"):
        predictor_scores(x[..., :16], packed, dist, 16)
    with pytest.raises(ValueError, match="dist_table must be"):
        predictor_scores(x, packed, dist[:-1], 16)
    with pytest.raises(ValueError, match="lo_block must be"):
        predictor_scores(x, packed, dist, 16, torch.zeros(1, n + 1, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="block size 256 is above"):
        predictor_scores(x, packed, predictor.dist_table(1, x.device).detach(), 256, backend="triton")
