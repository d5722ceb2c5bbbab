"""What the kernel tests share: the device, the check that the kernels run interpreted on CPU, poisoned allocations,
random inputs; for the row ops (test_kernels_gather_rows.py, _write_back_rows.py) the kept rows' index; for the
fused ops (test_kernels_rms_norm.py, _rope.py, _swiglu.py) the comparison against a float64 reference.

On a machine with CUDA the tensors live on the GPU and the kernels are compiled; elsewhere they run in Triton's CPU
interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before anything imports Triton).
"""

from __future__ import annotations

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (dtype, atol, rtol) against the float64 reference: float32 to rounding; bfloat16 loosely, because the real check
# there is relative (``assert_matches``: no worse than the plain-torch op in the same dtype).
FP32 = pytest.param(torch.float32, 1e-5, 1e-5, id="fp32")
BF16 = pytest.param(torch.bfloat16, 6e-2, 2e-2, id="bf16")
DTYPES = [FP32, BF16]


def fail_unless_interpreted(kernel) -> None:
    """On CPU, fail unless ``kernel`` (one of lemo_ds.kernels' Triton kernels) runs in Triton's interpreter: a module
    that imported lemo_ds.kernels before TRITON_INTERPRET=1 was set has kernels compiled for a GPU."""
    if DEVICE != "cpu":
        return
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):
        pytest.fail(
            "lemo_ds.kernels was imported before TRITON_INTERPRET=1 was set, so its kernels were compiled for a GPU; "
            "set TRITON_INTERPRET=1 before any test imports lemo_ds (e.g. at the top of tests/conftest.py)"
        )


@pytest.fixture
def poison_empty(monkeypatch):
    """torch.empty and torch.empty_like hand out NaN-filled memory, so an output element a kernel forgets to write
    cannot pass by being zero already."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))


def rand(shape, dtype, generator, scale: float = 1.0) -> torch.Tensor:
    """Standard normal values (never zeros: a missed write shows), on the test device."""
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(DEVICE, dtype)


def make_index(b: int, s: int, k: int, generator, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """[b, k] sorted unique row indices per sample, on the test device."""
    rows = [torch.randperm(s, generator=generator)[:k].sort().values for _ in range(b)]  # b x [k]
    return torch.stack(rows).to(DEVICE, dtype)


def assert_matches(fused: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor, atol: float, rtol: float,
                   what: str) -> None:
    """``fused`` (the kernel, low precision) is close to ``exact`` (the reference in float64) within (atol, rtol),
    and its error is at most twice the plain-torch op's in the same dtype (the kernel computes in float32 and rounds
    once, the reference rounds after every op), plus a rounding of the output's scale for outputs whose reference
    error is near 0.

    Triton's CPU interpreter (3.9) casts float32 to bfloat16 by truncation where a GPU rounds to nearest (checked
    here: every one of 1000 random values matched truncation), so on the CPU a bfloat16 kernel may be off by up to one
    more unit in the last place per rounding: four times the plain op's error and two bf16 units of slack there."""
    assert not torch.isnan(fused).any(), f"{what}: NaN (an unwritten element?)"
    fused64, plain64 = fused.double(), plain.double()
    torch.testing.assert_close(fused64, exact, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
    truncating = DEVICE == "cpu" and fused.dtype == torch.bfloat16
    factor = 4 if truncating else 2
    unit = torch.finfo(fused.dtype).eps if truncating else torch.finfo(torch.float32).eps * 100
    slack = 2 * unit * exact.norm().item() + 1e-5 * exact.numel() ** 0.5
    fused_error = (fused64 - exact).norm().item()
    plain_error = (plain64 - exact).norm().item()
    assert fused_error <= factor * plain_error + slack, (
        f"{what}: |fused - exact| = {fused_error:.3g} but |plain torch - exact| = {plain_error:.3g}"
    )
