"""Gather the kept token rows of the hidden states, and of RoPE's cos/sin, in one kernel launch.

A sparse decoder layer keeps ``k`` of the ``s`` token rows of each sample (``index`` [b, k], ascending, unique),
runs on the gathered ``[b, k, h]`` and writes its outputs back (``write_back_rows``). The rotary embedding of a
kept token must stay the one of its original position, so cos/sin are gathered by the same index.

Public API::

    gather_rows(x, index, cos=None, sin=None, backend="auto") -> (x_kept, cos_kept | None, sin_kept | None)
    gather_rows_ref(x, index, cos=None, sin=None)             # plain torch; the semantic spec

Shapes: ``x`` [b, s, h]; ``index`` [b, k] int64 or int32; ``cos``/``sin`` [bc, s, d] with bc in {1, b} (bc == 1
is shared by the batch, as Hugging Face's rotary embedding returns it). Outputs are fresh contiguous tensors
``x_kept`` [b, k, h] and ``cos_kept``/``sin_kept`` [b, k, d].

Preconditions not checked on the device (that would cost a host sync per call): every index is in ``[0, s)`` and
the indices of one sample are unique. An out-of-range index reads or writes outside the tensor in the Triton path
(the torch path raises on CPU, device-asserts on CUDA); duplicates make the backward pass keep one of the gradients
instead of summing them.

The launchers ``gather_rows_launch`` and ``merge_rows_launch``, the kept-row map and the checks are public within
the package: ``write_back_rows`` (the inverse op) shares them, and its backward is a gather.

Inputs may have any strides (expanded cos/sin, sliced hidden states, stride-0 gradients): the kernels take every
stride, and Triton specialises a stride of 1, so contiguous rows still get vectorised accesses.
"""

import torch

from .dispatch import resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # torch-only installs keep the reference path (dispatch.triton_usable says False)
    triton = None

# Columns one program moves per tensor, in bytes: 8K bf16 or 4K fp32 columns, so a 4096-wide bf16 row is one program
# and wider rows get several column tiles (grid axis 1). Module-level so that tests can shrink it to exercise tiling.
_MAX_BLOCK_BYTES = 16384


def block_config(n_cols: int, elem_size: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for copying rows of ``n_cols`` elements of ``elem_size`` bytes."""
    block = min(triton.next_power_of_2(max(n_cols, 1)), max(1, _MAX_BLOCK_BYTES // elem_size))
    # About 32 bytes per thread (two 16-byte vector accesses): enough bytes in flight for a pure copy.
    num_warps = min(8, max(1, block * elem_size // 1024))
    return block, num_warps


if triton is not None:

    @triton.jit
    def _gather_rows_kernel(
        x_ptr,  # [b, s, h]
        index_ptr,  # [b, k], contiguous, int32 or int64
        out_ptr,  # [b, k, h], contiguous (allocated by the launcher: no stride arguments, each costs launch time)
        cos_ptr,  # [bc, s, d]; batch stride 0 when bc == 1
        sin_ptr,  # [bc, s, d]
        cos_out_ptr,  # [b, k, d], contiguous
        sin_out_ptr,  # [b, k, d], contiguous
        K,
        H,
        D,
        x_sb,
        x_ss,
        x_sh,
        cos_sb,
        cos_ss,
        cos_sd,
        sin_sb,
        sin_ss,
        sin_sd,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
        HAS_ROPE: tl.constexpr,
    ):
        # One program per kept row (axis 0: batch * K + j) and column tile (axis 1). Tile t copies columns
        # [t * BLOCK_H, (t + 1) * BLOCK_H) of x and [t * BLOCK_D, (t + 1) * BLOCK_D) of cos/sin; tiles past a
        # tensor's width are fully masked (no memory traffic). Masks rather than loops: the interpreter used by the
        # CPU tests cannot run loops with runtime bounds.
        pid = tl.program_id(0)
        tile = tl.program_id(1)
        bi = (pid // K).to(tl.int64)
        out_row = pid.to(tl.int64)  # row of the contiguous [b * k, ·] outputs
        row = tl.load(index_ptr + pid).to(tl.int64)  # 64-bit offsets: b * s * h can exceed 2**31

        cols = (tile * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
        cmask = cols < H
        v = tl.load(x_ptr + bi * x_sb + row * x_ss + cols * x_sh, mask=cmask)
        tl.store(out_ptr + out_row * H + cols, v, mask=cmask)

        if HAS_ROPE:
            dcols = (tile * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
            dmask = dcols < D
            c = tl.load(cos_ptr + bi * cos_sb + row * cos_ss + dcols * cos_sd, mask=dmask)
            tl.store(cos_out_ptr + out_row * D + dcols, c, mask=dmask)
            sn = tl.load(sin_ptr + bi * sin_sb + row * sin_ss + dcols * sin_sd, mask=dmask)
            tl.store(sin_out_ptr + out_row * D + dcols, sn, mask=dmask)

    @triton.jit
    def _merge_rows_kernel(
        base_ptr,  # [b, s, h]: the eliminated rows' source (unused unless OTHERS_FROM_BASE)
        rows_ptr,  # [b, k, h]: the kept rows' source (unused unless KEPT_FROM_ROWS)
        pos_ptr,  # [b, s] int32, contiguous: j where index[b, j] == r, else -1
        out_ptr,  # [b, s, h], contiguous (allocated by the launcher)
        S,
        H,
        base_sb,
        base_ss,
        base_sh,
        rows_sb,
        rows_sk,
        rows_sh,
        BLOCK_H: tl.constexpr,
        KEPT_FROM_ROWS: tl.constexpr,
        OTHERS_FROM_BASE: tl.constexpr,
    ):
        # out[b, r] = (rows[b, pos] or 0) if r is kept else (base[b, r] or 0), one pass over every output row: each
        # output byte is written once and each source byte read at most once, with no memset beforehand. Branch-free:
        # the load a program does not need is fully masked (no memory traffic); this is also much faster than a
        # scalar `if` under the CPU interpreter.
        pid = tl.program_id(0)  # batch * S + r
        tile = tl.program_id(1)
        bi = (pid // S).to(tl.int64)
        r = (pid % S).to(tl.int64)
        p = tl.load(pos_ptr + pid)
        cols = (tile * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
        cmask = cols < H
        # The row's "kept" flag as a [BLOCK_H] block of bools, compared per column rather than a scalar bool
        # broadcast into the masks: Triton 3.9's interpreter turns a broadcast scalar int1 into an int32 array and
        # then rejects it as a load mask ("mask has unsupported dtype").
        kept = (p + tl.zeros([BLOCK_H], dtype=tl.int32)) >= 0
        if KEPT_FROM_ROWS:
            j = tl.maximum(p, 0).to(tl.int64)  # an in-bounds address even where the load is masked off
            from_rows = tl.load(rows_ptr + bi * rows_sb + j * rows_sk + cols * rows_sh, mask=cmask & kept, other=0)
        if OTHERS_FROM_BASE:
            from_base = tl.load(base_ptr + bi * base_sb + r * base_ss + cols * base_sh, mask=cmask & ~kept, other=0)
        if KEPT_FROM_ROWS and OTHERS_FROM_BASE:
            v = tl.where(kept, from_rows, from_base)
        elif KEPT_FROM_ROWS:
            v = from_rows
        else:
            v = from_base
        tl.store(out_ptr + pid.to(tl.int64) * H + cols, v, mask=cmask)


# ----------------------------------------------------------------------------------------------------------------
# Input checks (shared with write_back_rows)
# ----------------------------------------------------------------------------------------------------------------


def check_rows_index(x: torch.Tensor, index: torch.Tensor) -> None:
    """x [b, s, h] and index [b, k] (int64/int32, same device, k <= s). Index values are not checked (no sync)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a [b, s, h] tensor, got {_shape_of(x)}")
    if not isinstance(index, torch.Tensor) or index.dim() != 2:
        raise ValueError(f"index must be a [b, k] tensor, got {_shape_of(index)}")
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"index must be int64 or int32, got {index.dtype}")
    b, s, _ = x.shape
    if index.shape[0] != b:
        raise ValueError(f"index has batch size {index.shape[0]} but x has {b} (x {tuple(x.shape)})")
    if index.shape[1] > s:
        raise ValueError(f"index keeps {index.shape[1]} rows per sample but x has only s={s} (indices are unique)")
    if index.device != x.device:
        raise ValueError(f"index is on {index.device} but x is on {x.device}")


def _check_rope(x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> None:
    if (cos is None) != (sin is None):
        raise ValueError("pass both cos and sin, or neither")
    if cos is None:
        return
    b, s, _ = x.shape
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a [bc, s, d] tensor, got {_shape_of(t)}")
        if t.shape[0] not in (1, b) or t.shape[1] != s:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; expected [1, {s}, d] or [{b}, {s}, d] for x {tuple(x.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")


def _shape_of(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def kept_row_map(index: torch.Tensor, s: int) -> torch.Tensor:
    """pos [b, s] int32: j where index[b, j] == r, else -1 (the inverse of index; b * s * 4 bytes).

    It lets the merge kernel run over output rows (each written exactly once, no memset) instead of needing a
    zero-fill followed by a scatter; and, unlike a binary search in index, it does not rely on index being sorted.
    """
    b, k = index.shape
    pos = torch.full((b, s), -1, dtype=torch.int32, device=index.device)
    pos.scatter_(1, index.long(), torch.arange(k, dtype=torch.int32, device=index.device).expand(b, k))
    return pos


def gather_rows_launch(
    x: torch.Tensor,  # [b, s, h]
    index: torch.Tensor,  # [b, k]
    cos: torch.Tensor | None = None,  # [bc, s, d]
    sin: torch.Tensor | None = None,  # [bc, s, d]
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    b, _, h = x.shape
    k = index.shape[1]
    index = index.contiguous()  # [b, k]: read as a flat array, one element per program
    x_kept = torch.empty((b, k, h), dtype=x.dtype, device=x.device)  # [b, k, h]
    has_rope = cos is not None
    cos_kept = sin_kept = None
    if has_rope:
        d = cos.shape[2]
        cos_kept = torch.empty((b, k, d), dtype=cos.dtype, device=x.device)  # [b, k, d]
        sin_kept = torch.empty((b, k, d), dtype=sin.dtype, device=x.device)  # [b, k, d]
    if b * k == 0:
        return x_kept, cos_kept, sin_kept

    block_h, num_warps = block_config(h, x.element_size())
    n_tiles = triton.cdiv(h, block_h)
    if has_rope:
        block_d, warps_d = block_config(d, max(cos.element_size(), sin.element_size()))
        n_tiles = max(n_tiles, triton.cdiv(d, block_d))
        num_warps = max(num_warps, warps_d)
        # A batch of one is broadcast by a batch stride of 0 (whatever stride the size-1 dim reports).
        cos_strides = (0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1), cos.stride(2))
        sin_strides = (0 if sin.shape[0] == 1 else sin.stride(0), sin.stride(1), sin.stride(2))
        rope_args = (cos, sin, cos_kept, sin_kept)
    else:
        # Never dereferenced (HAS_ROPE is a constexpr False): any tensor serves as a placeholder pointer.
        block_d, d = 1, 0
        cos_strides = sin_strides = (0, 0, 0)
        rope_args = (x, x, x_kept, x_kept)

    _gather_rows_kernel[(b * k, n_tiles)](
        x,
        index,
        x_kept,
        *rope_args,
        k,
        h,
        d,
        *x.stride(),
        *cos_strides,
        *sin_strides,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        HAS_ROPE=has_rope,
        num_warps=num_warps,
    )
    return x_kept, cos_kept, sin_kept


def merge_rows_launch(
    base: torch.Tensor | None,  # [b, s, h] or None: eliminated rows are zero
    rows: torch.Tensor | None,  # [b, k, h] or None: kept rows are zero
    pos: torch.Tensor,  # [b, s] int32 from kept_row_map
    h: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """A new contiguous [b, s, h]: kept rows from ``rows`` (or 0), eliminated rows from ``base`` (or 0)."""
    assert base is not None or rows is not None
    b, s = pos.shape
    out = torch.empty((b, s, h), dtype=dtype, device=pos.device)  # [b, s, h]
    if out.numel() == 0:
        return out
    pos = pos.contiguous()
    block_h, num_warps = block_config(h, out.element_size())
    placeholder = out  # never dereferenced when the matching constexpr flag is False
    _merge_rows_kernel[(b * s, triton.cdiv(h, block_h))](
        base if base is not None else placeholder,
        rows if rows is not None else placeholder,
        pos,
        out,
        s,
        h,
        *(base.stride() if base is not None else (0, 0, 0)),
        *(rows.stride() if rows is not None else (0, 0, 0)),
        BLOCK_H=block_h,
        KEPT_FROM_ROWS=rows is not None,
        OTHERS_FROM_BASE=base is not None,
        num_warps=num_warps,
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------------


class GatherRowsFunction(torch.autograd.Function):
    """Forward: one gather launch for x (and cos/sin). Backward: each requested gradient is the incoming gradient
    scattered back to its rows of a zero [b, s, ·] tensor, by one merge launch (indices are unique per sample, so
    plain stores suffice: no atomics)."""

    @staticmethod
    def forward(ctx, x, index, cos, sin):
        x_kept, cos_kept, sin_kept = gather_rows_launch(x, index, cos, sin)
        ctx.save_for_backward(index)
        ctx.s = x.shape[1]
        ctx.cos_batch = cos.shape[0] if cos is not None else None
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: skip its work
        # cos/sin rarely require grad; left differentiable, their gathered copies would make RoPE's backward compute
        # gradients for them that nobody needs.
        outputs = ((x_kept, 0), (cos_kept, 2), (sin_kept, 3))  # (output, position of its input)
        non_diff = [out for out, i in outputs if out is not None and not ctx.needs_input_grad[i]]
        if non_diff:
            ctx.mark_non_differentiable(*non_diff)
        return x_kept, cos_kept, sin_kept

    @staticmethod
    def backward(ctx, grad_x_kept, grad_cos_kept, grad_sin_kept):
        (index,) = ctx.saved_tensors
        pos = None

        def scatter(grad_kept):  # [b, k, n] -> [b, s, n], zero on eliminated rows
            nonlocal pos
            if pos is None:
                pos = kept_row_map(index, ctx.s)
            return merge_rows_launch(None, grad_kept, pos, grad_kept.shape[2], grad_kept.dtype)

        grad_x = grad_cos = grad_sin = None
        if ctx.needs_input_grad[0] and grad_x_kept is not None:
            grad_x = scatter(grad_x_kept)
        if ctx.needs_input_grad[2] and grad_cos_kept is not None:
            grad_cos = scatter(grad_cos_kept)
        if ctx.needs_input_grad[3] and grad_sin_kept is not None:
            grad_sin = scatter(grad_sin_kept)
        if ctx.cos_batch == 1 and index.shape[0] > 1:
            # cos/sin were broadcast over the batch: their gradient sums over it, as autograd's expand backward does.
            grad_cos = grad_cos.sum(0, keepdim=True) if grad_cos is not None else None
            grad_sin = grad_sin.sum(0, keepdim=True) if grad_sin is not None else None
        return grad_x, None, grad_cos, grad_sin


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def gather_rows_ref(
    x: torch.Tensor,  # [b, s, h]
    index: torch.Tensor,  # [b, k]
    cos: torch.Tensor | None = None,  # [bc, s, d]
    sin: torch.Tensor | None = None,  # [bc, s, d]
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Plain-torch gather of the kept rows: the semantic spec of :func:`gather_rows`, differentiable by autograd.

    Returns ``(x_kept [b, k, h], cos_kept [b, k, d] or None, sin_kept [b, k, d] or None)``.
    """
    check_rows_index(x, index)
    _check_rope(x, cos, sin)
    b, s, _ = x.shape
    idx = index.long()
    batch = torch.arange(b, device=x.device)[:, None]  # [b, 1]
    # Advanced indexing rather than torch.gather: its backward keeps only x's shape, while torch.gather saves x
    # itself, which would forbid the in-place write-back into x that follows in a sparse layer.
    x_kept = x[batch, idx]  # [b, k, h]
    if cos is None:
        return x_kept, None, None
    d = cos.shape[2]
    cos_kept = cos.expand(b, s, d)[batch, idx]  # [b, k, d]
    sin_kept = sin.expand(b, s, d)[batch, idx]  # [b, k, d]
    return x_kept, cos_kept, sin_kept


def gather_rows(
    x: torch.Tensor,  # [b, s, h]
    index: torch.Tensor,  # [b, k]
    cos: torch.Tensor | None = None,  # [bc, s, d]
    sin: torch.Tensor | None = None,  # [bc, s, d]
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gather the kept token rows of ``x`` (and of ``cos``/``sin``) by ``index``.

    Args:
        x: hidden states [b, s, h].
        index: kept positions [b, k], int64 or int32, each row unique and in [0, s) (ascending by convention;
            the output follows index's order). Values are not checked on the device.
        cos, sin: RoPE tables [bc, s, d] with bc in {1, b}, or both None.
        backend: "auto" (Triton where usable, else torch), "triton" or "torch"; see ``dispatch.resolve_backend``.

    Returns:
        ``(x_kept [b, k, h], cos_kept [b, k, d] or None, sin_kept [b, k, d] or None)``, new contiguous tensors.
        Gradients flow to x (and to cos/sin when they require grad); eliminated rows get a zero gradient.
    """
    check_rows_index(x, index)
    _check_rope(x, cos, sin)
    if resolve_backend(backend, x, index, cos, sin) == "torch":
        return gather_rows_ref(x, index, cos, sin)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, cos, sin)):
        return GatherRowsFunction.apply(x, index, cos, sin)
    return gather_rows_launch(x, index, cos, sin)  # nothing to differentiate: skip the Function's overhead
