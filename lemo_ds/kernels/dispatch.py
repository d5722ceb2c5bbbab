"""Choice between the Triton kernels and their plain-torch references.

The Triton kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``,
which must be set before ``triton`` is first imported: Triton reads it when a kernel is decorated). Everything
else (CPU without the interpreter, a machine without Triton) takes the torch reference path, which computes the
same values bit for bit: these ops only copy rows.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton.language  # noqa: F401  (imports triton too)
    except ImportError:  # CPU-only torch wheels ship without Triton
        return False
    return True


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(*tensors: torch.Tensor | None) -> bool:
    """True when the Triton kernels can run on ``tensors`` (``None`` entries are skipped).

    That is: Triton imports, and either every tensor is on CUDA, or ``TRITON_INTERPRET=1`` is set and every tensor
    is on the CPU. With no tensors at all: whether Triton could run here at all (a GPU, or the interpreter).
    """
    if not _triton_importable():
        return False
    present = [t for t in tensors if t is not None]
    if not present:
        return torch.cuda.is_available() or _interpret_mode()
    if all(t.is_cuda for t in present):
        return True
    return _interpret_mode() and all(t.device.type == "cpu" for t in present)


def _why_not_usable(present: list[torch.Tensor]) -> str:
    if not _triton_importable():
        return "Triton cannot be imported"
    devices = sorted({str(t.device) for t in present})
    if not present:
        return "no CUDA device is available and TRITON_INTERPRET=1 is not set"
    if any(t.device.type == "cpu" for t in present) and not _interpret_mode():
        return f"the tensors are on {devices} and TRITON_INTERPRET=1 is not set (Triton runs CPU tensors only there)"
    return f"the tensors are on {devices}: Triton needs all of them on CUDA (or all on CPU with TRITON_INTERPRET=1)"


def resolve_backend(backend: str, *tensors: torch.Tensor | None) -> str:
    """Map a requested backend to the one that runs: ``"triton"`` or ``"torch"``.

    ``"auto"`` takes Triton on CUDA tensors, else torch (never Triton's CPU interpreter, which is for checking the
    kernels: it runs a model's step hundreds of times slower than the references, which compute the same values);
    ``"torch"`` is always honoured; ``"triton"`` runs Triton on CUDA tensors or, under TRITON_INTERPRET=1, on CPU
    ones, and raises ``RuntimeError`` when Triton cannot run on these tensors rather than silently falling back, so
    that a config asking for the kernels never measures the reference by mistake.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}: allowed values are {', '.join(map(repr, BACKENDS))}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        present = [t for t in tensors if t is not None]
        on_cuda = all(t.is_cuda for t in present) if present else torch.cuda.is_available()
        return "triton" if on_cuda and triton_usable(*tensors) else "torch"
    if triton_usable(*tensors):
        return "triton"
    present = [t for t in tensors if t is not None]
    raise RuntimeError(
        f"kernel backend 'triton' was requested but cannot run: {_why_not_usable(present)}. "
        "Set the kernels backend to 'auto' (Triton where it can run, torch elsewhere) or 'torch', "
        "or on CPU set TRITON_INTERPRET=1 before Triton is first imported."
    )
