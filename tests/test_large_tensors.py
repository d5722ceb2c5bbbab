"""Past 2**31 elements: each op of the main job's step at the sizes of issue 31's longest contexts, checked on the
rows at the end of its tensors, where a 32-bit offset wraps.

At 800K tokens of the Llama-3-8B shape, [s, h] and the queries hold 3.4e9 elements, past 2**31; the main job's
first step there crashed in backward with an illegal memory access (benchmarks/results/max-context-20261207). A
kernel that computes an offset in 32 bits either crashes there or reads and writes the wrong rows; which rows is
what these tests look at. Each one runs an op on the whole tensor and compares the last rows with the same op (or a
plain reference) on those rows alone:

- lemo_ds's kernels (RMSNorm, SwiGLU, RoPE, gathering and writing back the kept rows), forward and backward: the
  rows do not depend on each other, so the comparison is exact;
- lemo_ds.document_attention over packed documents and over one document whose queries pass 2**31 elements: on
  CUDA, torch's flash kernels, whose query gradients are wrong past that size in one call, so document_attention
  runs them in pieces under it (lemo_ds.attention_pieces); the last document's, or the last queries', output and
  gradients against the same attention in one small call;
- Liger's fused linear cross entropy over every position (lemo_ds.memory.segment_loss): one chunk of its logits
  holds 4.2e9 elements at 800K tokens and a 128K vocabulary;
- an offloaded layer input's round trip through a registered pinned host buffer (memory.pinned_buffers).

On CUDA the sizes are the job's (``GPU``: about 50 GiB at the largest test, so an 80 GB H100 runs them). On the CPU
the same checks run at tiny sizes (``CPU``; lemo_ds's and Liger's kernels in Triton's interpreter), which tests the
checks themselves where CI runs. benchmarks/gpu_calls.sh large-tensors runs this file on a lent GPU.
"""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch
from torch import nn

from lemo_ds.attention_pieces import Piece, reference_piece
from lemo_ds.document_attention import document_attention, varlen_causal
from lemo_ds.documents import Documents
from lemo_ds.kernels.gather_rows import gather_rows
from lemo_ds.kernels.rms_norm import rms_norm
from lemo_ds.kernels.rope import apply_rope
from lemo_ds.kernels.swiglu import silu_mul
from lemo_ds.kernels.write_back_rows import write_back_rows
from lemo_ds.memory.segment_loss import IGNORE_INDEX, liger_usable, segment_lm_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INT32_LIMIT = 2**31


@dataclasses.dataclass(frozen=True)
class Sizes:
    tokens: int  # a packed row's tokens: [tokens, hidden] and [tokens, heads, head_dim] pass 2**31 elements on CUDA
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    document: int  # the packed documents' length
    one_document: int  # one document's length: (length x heads x head_dim) past 2**31 on CUDA
    mlp_rows: int  # rows of a [rows, intermediate] SwiGLU input: past 2**31 elements on CUDA
    intermediate: int
    vocab: int
    tail: int  # the rows compared at the end


# Llama-3-8B at 800K tokens (what h200-800k ran), 4 KB documents of about 1K tokens; one document of 528K tokens (the
# first 16K step past 512K, where rows x 32 heads x 128 passes 2**31).
GPU = Sizes(tokens=819_200, hidden=4096, heads=32, kv_heads=8, head_dim=128, document=1024, one_document=540_672,
            mlp_rows=150_001, intermediate=14_336, vocab=128_256, tail=256)  # fmt: skip
CPU = Sizes(tokens=300, hidden=64, heads=4, kv_heads=2, head_dim=16, document=64, one_document=200, mlp_rows=77,
            intermediate=96, vocab=300, tail=24)  # fmt: skip
SIZES = GPU if DEVICE == "cuda" else CPU


def test_gpu_sizes_pass_the_32_bit_limit():
    """The point of the CUDA sizes: every tensor the tests name passes 2**31 elements."""
    assert GPU.tokens * GPU.hidden > INT32_LIMIT and GPU.tokens * GPU.heads * GPU.head_dim > INT32_LIMIT
    assert GPU.one_document * GPU.heads * GPU.head_dim > INT32_LIMIT + 128 * GPU.heads * GPU.head_dim
    assert GPU.mlp_rows * GPU.intermediate > INT32_LIMIT
    assert 32_768 * GPU.vocab > INT32_LIMIT  # Liger's logits chunk at 800K tokens: 32,768 rows


@pytest.fixture(autouse=True)
def free_memory():
    """Each test's tensors go before the next test allocates its own (the largest take about 50 GiB)."""
    yield
    if DEVICE == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


_SEEDS = iter(range(1 << 30))


def randn(*shape: int, dtype=torch.bfloat16, scale: float = 1.0) -> torch.Tensor:
    """Normal values made on the device in pieces of 2**28 elements (a 6.7 GB bf16 tensor needs no float32 twin),
    each tensor from its own seed."""
    out = torch.empty(shape, dtype=dtype, device=DEVICE)
    flat = out.view(-1)
    generator = torch.Generator(device=DEVICE).manual_seed(next(_SEEDS))
    for start in range(0, flat.numel(), 1 << 28):
        piece = flat[start : start + (1 << 28)]
        piece.copy_(torch.randn(piece.shape, generator=generator, device=DEVICE) * scale)
    return out


def _relative_errors(ours: torch.Tensor, reference: torch.Tensor, what: str, tolerance: float) -> list[str]:
    """[] when ||ours - reference|| / ||reference|| is under ``tolerance``, else what failed (a test lists every
    tensor that failed, not only the first)."""
    ours, reference = ours.detach().float(), reference.detach().float()
    error = float((ours - reference).norm() / reference.norm())
    return [] if error < tolerance else [f"{what}: relative error {error:.3g} (tolerance {tolerance})"]


def assert_relative(ours: torch.Tensor, reference: torch.Tensor, tolerance: float, what: str) -> None:
    """||ours - reference|| / ||reference|| under ``tolerance``: bf16 rounding passes, a wrong row does not."""
    assert not torch.isnan(ours).any(), f"{what}: NaN"
    errors = _relative_errors(ours, reference, what, tolerance)
    assert not errors, errors[0]


# ---- lemo_ds's kernels: the last rows, exactly as on those rows alone ---------------------------------------------


def test_rms_norm_past_the_32_bit_limit():
    n, h, t = SIZES.tokens, SIZES.hidden, SIZES.tail
    x = randn(n, h).requires_grad_()  # [n, h]
    weight = (1 + 0.1 * randn(h, dtype=torch.float32)).to(torch.bfloat16).requires_grad_()  # [h]
    y = rms_norm(x, weight, 1e-5, backend="triton")
    dy = randn(n, h)
    y.backward(dy)
    x_tail = x[-t:].detach().clone().requires_grad_()
    w_tail = weight.detach().clone().requires_grad_()
    y_tail = rms_norm(x_tail, w_tail, 1e-5, backend="triton")
    y_tail.backward(dy[-t:])
    assert torch.equal(y[-t:], y_tail) and torch.equal(x.grad[-t:], x_tail.grad)
    # The weight's gradient sums every row: against a float32 sum over pieces of rows.
    reference = torch.zeros(h, dtype=torch.float32, device=DEVICE)
    for start in range(0, n, 1 << 16):
        rows = x[start : start + (1 << 16)].detach().float()
        normed = (rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16).float()
        reference += (dy[start : start + (1 << 16)].float() * normed).sum(0)
    assert_relative(weight.grad, reference, 1e-2, "dw")


def test_silu_mul_past_the_32_bit_limit():
    n, i, t = SIZES.mlp_rows, SIZES.intermediate, SIZES.tail
    gate, up = randn(n, i).requires_grad_(), randn(n, i, scale=0.5).requires_grad_()  # [n, i]
    out = silu_mul(gate, up, backend="triton")
    dout = randn(n, i)
    out.backward(dout)
    gate_tail, up_tail = gate[-t:].detach().clone().requires_grad_(), up[-t:].detach().clone().requires_grad_()
    out_tail = silu_mul(gate_tail, up_tail, backend="triton")
    out_tail.backward(dout[-t:])
    assert torch.equal(out[-t:], out_tail)
    assert torch.equal(gate.grad[-t:], gate_tail.grad) and torch.equal(up.grad[-t:], up_tail.grad)


def _rope_tables(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (500_000.0 ** (torch.arange(0, head_dim, 2, device=DEVICE).float() / head_dim))  # [d / 2]
    angles = positions.float()[:, None] * inv_freq[None, :]  # [s, d / 2]
    emb = torch.cat([angles, angles], dim=-1)[None]  # [1, s, d]
    return emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)


def test_rope_past_the_32_bit_limit():
    n, heads, kv, d, t = SIZES.tokens, SIZES.heads, SIZES.kv_heads, SIZES.head_dim, SIZES.tail
    # As the attention hands them in: transposed views of [1, s, heads, d].
    q = randn(1, n, heads, d).transpose(1, 2).requires_grad_()  # [1, H, s, d]
    k = randn(1, n, kv, d).transpose(1, 2).requires_grad_()  # [1, KV, s, d]
    cos, sin = _rope_tables(torch.arange(n, device=DEVICE) % 8192, d)  # [1, s, d]
    q_rot, k_rot = apply_rope(q, k, cos, sin, backend="triton")
    dq, dk = randn(1, heads, n, d), randn(1, kv, n, d)
    torch.autograd.backward((q_rot, k_rot), (dq, dk))
    q_tail = q[:, :, -t:].detach().clone().requires_grad_()
    k_tail = k[:, :, -t:].detach().clone().requires_grad_()
    q_rot_tail, k_rot_tail = apply_rope(q_tail, k_tail, cos[:, -t:], sin[:, -t:], backend="triton")
    torch.autograd.backward((q_rot_tail, k_rot_tail), (dq[:, :, -t:], dk[:, :, -t:]))
    assert torch.equal(q_rot[:, :, -t:], q_rot_tail) and torch.equal(k_rot[:, :, -t:], k_rot_tail)
    assert torch.equal(q.grad[:, :, -t:], q_tail.grad) and torch.equal(k.grad[:, :, -t:], k_tail.grad)


def test_gather_and_write_back_rows_past_the_32_bit_limit():
    """A sparse layer's row traffic at keep 0.4, the last row kept: the gathered rows, the written-back stream and
    both gradients, exactly as indexing computes them."""
    n, h = SIZES.tokens, SIZES.hidden
    x = randn(1, n, h).requires_grad_()  # [1, s, h]
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    kept = torch.randperm(n - 1, generator=generator, device=DEVICE)[: int(0.4 * n) - 1].sort().values
    index = torch.cat([kept, torch.tensor([n - 1], device=DEVICE)])[None]  # [1, k], ascending, last row kept
    rows, _, _ = gather_rows(x, index, backend="triton")  # [1, k, h]
    assert torch.equal(rows[0], x[0].detach()[index[0]])
    layer_out = randn(*rows.shape, scale=0.5).requires_grad_()  # [1, k, h]: the layer's outputs for the kept rows
    stream = x.detach().clone().requires_grad_()
    out = write_back_rows(stream, layer_out, index, backend="triton")  # [1, s, h]
    expected = stream.detach().clone()
    expected[0, index[0]] = layer_out.detach()[0]
    assert torch.equal(out, expected)
    del expected
    grad = randn(1, n, h)
    out.backward(grad)
    rows.backward(layer_out.grad)
    assert torch.equal(layer_out.grad[0], grad[0, index[0]])
    zeroed = grad.clone()
    zeroed[0, index[0]] = 0
    assert torch.equal(stream.grad, zeroed)
    del zeroed
    scattered = torch.zeros_like(grad)
    scattered[0, index[0]] = layer_out.grad[0]
    assert torch.equal(x.grad, scattered)


# ---- torch's attention: the last document, and the last queries of one long document -----------------------------


class _Attention(nn.Module):
    """What Hugging Face's SDPA reads off the attention module (the CPU path of document_attention calls it)."""

    def __init__(self, heads: int, kv_heads: int):
        super().__init__()
        self.num_key_value_groups = heads // kv_heads
        self.is_causal = True


def _causal_reference(q, k, v, dout, last_queries: int):
    """float32 causal attention of the last ``last_queries`` queries of q [1, H, s, d] over every key (k, v
    [1, KV, s, d]), head by head, with the gradients of q's last rows, of k and of v for ``dout`` [1, H, t, d]."""
    heads, s, d = q.shape[1], q.shape[2], q.shape[3]
    groups = heads // k.shape[1]
    positions = torch.arange(s - last_queries, s, device=q.device)
    allowed = torch.arange(s, device=q.device)[None, :] <= positions[:, None]  # [t, s]
    outs, dqs = [], []
    for head in range(heads):
        q_h = q[0, head, -last_queries:].detach().float().requires_grad_()  # [t, d]
        k_h, v_h = k[0, head // groups].detach().float(), v[0, head // groups].detach().float()  # [s, d]
        scores = (q_h @ k_h.T) / d**0.5  # [t, s]
        out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v_h  # [t, d]
        out.backward(dout[0, head].float())
        outs.append(out.detach())
        dqs.append(q_h.grad)
    return torch.stack(outs)[None], torch.stack(dqs)[None]  # [1, H, t, d] each


def test_packed_document_attention_past_the_32_bit_limit():
    """document_attention over packed documents (torch's varlen flash kernel on CUDA): the last document's
    output and gradients are those of that document alone."""
    n, heads, kv, d, doc = SIZES.tokens, SIZES.heads, SIZES.kv_heads, SIZES.head_dim, SIZES.document
    q = randn(1, n, heads, d).transpose(1, 2).requires_grad_()  # [1, H, s, d]
    k = randn(1, n, kv, d).transpose(1, 2).requires_grad_()  # [1, KV, s, d]
    v = randn(1, n, kv, d).transpose(1, 2).requires_grad_()  # [1, KV, s, d]
    keys = (torch.arange(n, device=DEVICE, dtype=torch.int32) // doc)[None]  # [1, s]: documents of ``doc`` tokens
    module = _Attention(heads, kv)
    out, _ = document_attention(module, q, k, v, Documents(keys), scaling=d**-0.5)  # [1, s, H, d]
    dout = randn(1, n, heads, d)
    out.backward(dout)
    last = n - (n - 1) // doc * doc  # the last document's length
    q_doc, k_doc, v_doc = (t[:, :, -last:].detach().clone().requires_grad_() for t in (q, k, v))
    out_doc, _ = document_attention(module, q_doc, k_doc, v_doc, Documents(keys[:, -last:]), scaling=d**-0.5)
    out_doc.backward(dout[:, -last:])
    errors = _relative_errors(out[:, -last:], out_doc, "output", 1e-2)
    for full, alone, name in ((q, q_doc, "dq"), (k, k_doc, "dk"), (v, v_doc, "dv")):
        errors += _relative_errors(full.grad[:, :, -last:], alone.grad, name, 2e-2)
    assert not errors, errors


def test_one_document_attention_past_the_32_bit_limit():
    """One document (the flash kernel on CUDA) long enough that the flash backward's dQ accumulator offset passes
    2**31: the last queries' output and every gradient against those queries alone over every key, in one small
    call (torch's varlen_attn on CUDA, causal aligned at the bottom right; plain torch on the CPU), whose output is
    checked against float32 attention."""
    n, heads, kv, d, t = SIZES.one_document, SIZES.heads, SIZES.kv_heads, SIZES.head_dim, 64
    q = randn(1, n, heads, d).transpose(1, 2).requires_grad_()  # [1, H, s, d]
    k = randn(1, n, kv, d).transpose(1, 2).requires_grad_()  # [1, KV, s, d]
    v = randn(1, n, kv, d).transpose(1, 2).requires_grad_()  # [1, KV, s, d]
    keys = torch.zeros(1, n, dtype=torch.int32, device=DEVICE)  # [1, s]: one document
    out, _ = document_attention(_Attention(heads, kv), q, k, v, Documents(keys), scaling=d**-0.5)  # [1, s, H, d]
    dout = torch.zeros_like(out)
    dout[:, -t:] = randn(1, t, heads, d)  # only the last queries' outputs reach the loss
    out.backward(dout)
    q_last = q[0, :, -t:].transpose(0, 1).detach().contiguous().requires_grad_()  # [t, H, d]
    k_all, v_all = (x[0].transpose(0, 1).detach().contiguous().requires_grad_() for x in (k, v))  # [s, KV, d]
    out_last = _last_queries_alone(q_last, k_all, v_all, d**-0.5)  # [t, H, d]
    out_last.backward(dout[0, -t:])
    out_ref, _ = _causal_reference(q, k, v, dout[:, -t:].transpose(1, 2), t)
    errors = _relative_errors(out_last.transpose(0, 1)[None], out_ref, "the small call's output (float32)", 1e-2)
    errors += _relative_errors(out[0, -t:], out_last, "output", 1e-2)
    errors += _relative_errors(q.grad[0, :, -t:].transpose(0, 1), q_last.grad, "dq", 2e-2)
    errors += _relative_errors(k.grad[0].transpose(0, 1), k_all.grad, "dk", 2e-2)  # only the last queries' keys
    errors += _relative_errors(v.grad[0].transpose(0, 1), v_all.grad, "dv", 2e-2)
    assert not errors, errors


def _last_queries_alone(q_last, k_all, v_all, scale: float) -> torch.Tensor:
    """The last queries q_last [t, H, d] over every key k_all, v_all [s, KV, d] of their document in one call."""
    t, s = q_last.shape[0], k_all.shape[0]
    if DEVICE != "cuda":
        return reference_piece(q_last, k_all, v_all, Piece(s - t, s, 0, (0, t), (0, s)), scale)
    cu_q, cu_k = (torch.tensor([0, length], dtype=torch.int32, device=DEVICE) for length in (t, s))
    return varlen_causal(q_last, k_all, v_all, cu_q, cu_k, t, s, scale)


# ---- the loss over every position -----------------------------------------------------------------------------------


def test_fused_linear_cross_entropy_past_the_32_bit_limit():
    """Liger's fused linear cross entropy as the main job calls it (segment_lm_loss, implementation "liger"): the
    loss against a float32 sum over pieces of rows, and the last rows' gradient against the same loss on those rows
    alone (each row's gradient depends on that row only)."""
    n, h, vocab, t = SIZES.tokens, SIZES.hidden, SIZES.vocab, SIZES.tail
    if not liger_usable(torch.empty(0, device=DEVICE)):
        pytest.skip("Liger's kernels cannot run here (on the CPU: Triton's interpreter before 3.7)")
    head = nn.Linear(h, vocab, bias=False, device=DEVICE, dtype=torch.bfloat16).requires_grad_(False)  # frozen (LoRA)
    head.weight.copy_(randn(vocab, h, scale=0.02))
    hidden = randn(1, n, h).requires_grad_()  # [1, s, h]
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    labels = torch.randint(0, vocab, (1, n), generator=generator, device=DEVICE)  # [1, s]
    labels[0, ::7] = IGNORE_INDEX  # some positions count nothing
    count = int((labels[0, 1:] != IGNORE_INDEX).sum())
    loss = segment_lm_loss(head, hidden, labels, num_items_in_batch=count, impl="liger")
    loss.backward()
    total = torch.zeros((), dtype=torch.float64, device=DEVICE)
    targets = torch.cat([labels[0, 1:], labels.new_full((1,), IGNORE_INDEX)])  # [s]: the next token's label
    for start in range(0, n, 1 << 14):
        logits = head(hidden[0, start : start + (1 << 14)].detach()).float()  # [piece, vocab]
        total += nn.functional.cross_entropy(logits, targets[start : start + (1 << 14)], reduction="sum",
                                             ignore_index=IGNORE_INDEX).double()  # fmt: skip
    assert_relative(loss.detach(), total / count, 1e-3, "loss")
    hidden_tail = hidden[:, -t:].detach().clone().requires_grad_()
    segment_lm_loss(head, hidden_tail, labels[:, -t:], num_items_in_batch=count, impl="liger").backward()
    assert_relative(hidden.grad[:, -t:], hidden_tail.grad, 1e-2, "the last rows' gradient")


# ---- offloaded inputs through a registered pinned buffer ------------------------------------------------------------


@pytest.mark.skipif(DEVICE != "cuda", reason="no CUDA: page-locking by cudaHostRegister")
def test_registered_host_buffer_round_trip_past_4_gib():
    """One dense layer's input at 800K tokens (6.25 GiB) to a registered pinned buffer and back, as the offloader
    copies it (non-blocking, on a side stream): byte for byte."""
    from lemo_ds.memory.offload import HostPool

    x = randn(SIZES.tokens, SIZES.hidden)  # [s, h]
    nbytes = x.numel() * x.element_size()
    pool = HostPool()
    buffer = pool.acquire(nbytes, "registered")
    host = buffer[:nbytes].view(torch.bfloat16).view(x.shape)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        host.copy_(x, non_blocking=True)
        back = host.to(DEVICE, non_blocking=True)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(back, x)
    pool.release(buffer, "registered")
