"""The fused decoder-layer ops (lemo_ds/fused.py) on real Hugging Face models: the fused path computes what today's
path computes (forward and every gradient, fp32 and bf16, sparse layers and packed rows, with and without
checkpointing), "off" and "auto" on a CPU really run the model's own ops, and remove_lemo undoes the conversion."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import VOCAB, packed_position_ids, tiny_model

import lemo_ds
from lemo_ds.hf_compat import checkpointing_enable
from lemo_ds.kernels import rms_norm as rms_norm_module
from lemo_ds.kernels import rope as rope_module
from lemo_ds.kernels import swiglu as swiglu_module
from lemo_ds.memory import segment_loss

BLOCK = 8
SEQ = 24
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# keep 0.5 in the deeper layers of a 3-layer model ("auto": layer 0 and the last layer dense): one sparse layer.
SPARSE = {"keep_ratio": 0.5, "block_size": BLOCK, "scorer": "random"}


def converted(model, fused_ops, checkpointing=False, **section):
    model = copy.deepcopy(model)
    if checkpointing:
        checkpointing_enable(model, use_reentrant=False)
    return lemo_ds.apply_lemo(model, {**SPARSE, "fused_ops": fused_ops, **section})


def loss_and_grads(model, ids, position_ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, position_ids=position_ids).loss
    loss.backward()
    return loss.detach().double(), {name: p.grad.double() for name, p in model.named_parameters()}


def rows(seed=0):
    ids = torch.randint(1, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    return ids, packed_position_ids(2, [5, 11, 8]).to(DEVICE)  # packed: a document shorter than a block


def kernel_calls(monkeypatch):
    """Counts of each fused kernel's autograd.Function.apply."""
    calls = {"rms_norm": 0, "rope": 0, "swiglu": 0}
    for name, cls in (("rms_norm", rms_norm_module.RMSNormFunction), ("rope", rope_module.RoPEFunction),
                      ("swiglu", swiglu_module.SiluMulFunction)):  # fmt: skip
        real = cls.apply

        def counted(*args, _name=name, _real=real):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(cls, "apply", counted)
    return calls


# qwen3: per-head q/k RMSNorms in the attention. Two of the four combinations: the interpreter runs each for 10-25 s.
@pytest.mark.parametrize("family, checkpointing", [("llama", True), ("qwen3", False)], ids=["llama-ckpt", "qwen3"])
def test_fused_path_equals_todays_path_fp32(family, checkpointing, monkeypatch):
    base = tiny_model(family, layers=3, dtype=torch.float32).to(DEVICE)
    ids, position_ids = rows()
    calls = kernel_calls(monkeypatch)
    fused = loss_and_grads(converted(base, "on", checkpointing), ids, position_ids)
    assert min(calls.values()) > 0, calls  # every kernel ran, in forward
    plain = loss_and_grads(converted(base, "off", checkpointing), ids, position_ids)
    torch.testing.assert_close(fused[0], plain[0], atol=1e-6, rtol=1e-6)
    assert fused[1].keys() == plain[1].keys()
    for name in plain[1]:
        torch.testing.assert_close(fused[1][name], plain[1][name], atol=1e-6, rtol=1e-4, msg=name)


def test_fused_path_bf16_is_as_close_to_exact_as_todays_path():
    """bf16: the fused model's loss and gradients are about as far from the exact (fp64) model's as today's bf16
    path is (the kernels round once where the model's ops round after each op; see tests/kernel_checks.py for the
    interpreter's truncation on a CPU)."""
    base = tiny_model("llama", layers=3, dtype=torch.float64).to(DEVICE)
    ids, position_ids = rows(1)
    exact = loss_and_grads(converted(base, "off"), ids, position_ids)
    low = base.to(torch.bfloat16)
    fused = loss_and_grads(converted(low, "on"), ids, position_ids)
    plain = loss_and_grads(converted(low, "off"), ids, position_ids)
    factor = 4 if DEVICE.type == "cpu" else 2
    assert abs(fused[0] - exact[0]) <= factor * abs(plain[0] - exact[0]) + 2e-2
    for name in exact[1]:
        fused_error = (fused[1][name] - exact[1][name]).norm()
        plain_error = (plain[1][name] - exact[1][name]).norm()
        assert fused_error <= factor * plain_error + 1e-2 * exact[1][name].norm(), name


def test_off_and_auto_on_cpu_run_the_models_own_ops(monkeypatch):
    base = tiny_model("llama", layers=3, dtype=torch.float32)
    ids, position_ids = rows()
    calls = kernel_calls(monkeypatch)
    off = converted(base, "off")
    assert not [m for m in off.modules() if type(m).__name__.startswith("Fused")]
    off(input_ids=ids.cpu(), labels=ids.cpu(), position_ids=position_ids.cpu()).loss.backward()
    auto = converted(base, "auto")
    kinds = {type(m).__name__ for m in auto.modules() if type(m).__name__.startswith("Fused")}
    assert kinds == {"FusedRMSNormLlamaRMSNorm", "FusedSwiGLULlamaMLP", "FusedRoPEAttentionLlamaAttention"}
    auto(input_ids=ids.cpu(), labels=ids.cpu(), position_ids=position_ids.cpu()).loss.backward()  # CPU tensors
    assert calls == {"rms_norm": 0, "rope": 0, "swiglu": 0}
    assert lemo_ds.LemoConfig().fused_ops == "auto"


def test_remove_lemo_restores_classes_and_rope():
    from transformers.models.llama import modeling_llama

    model = tiny_model("llama", layers=3, dtype=torch.float32)
    classes = {name: type(m) for name, m in model.named_modules()}
    hf_rope = modeling_llama.apply_rotary_pos_emb
    # "auto" on CPU tensors runs the model's ops, but converts the same modules and binds RoPE the same way.
    lemo_ds.apply_lemo(model, {**SPARSE, "fused_ops": "auto", "memory": {"compact_saves": True}})
    norm = model.model.layers[0].input_layernorm
    assert type(norm).__name__ == "RecordedNormFusedRMSNormLlamaRMSNorm"  # compaction wraps the fused norm
    ids, position_ids = rows()
    model(input_ids=ids.cpu(), labels=ids.cpu(), position_ids=position_ids.cpu()).loss.backward()
    assert modeling_llama.apply_rotary_pos_emb is hf_rope  # bound for the attention's own forward only
    lemo_ds.remove_lemo(model)
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert not [k for m in model.modules() for k in m.__dict__ if k.startswith("_lemo")]


def test_a_module_patched_on_the_instance_keeps_its_forward():
    """Liger-Kernel's apply_liger_kernel_to_* replaces ``forward`` on module instances: such a module is left as
    it is (the user chose those kernels)."""
    model = tiny_model("llama", layers=3, dtype=torch.float32)
    mlp = model.model.layers[1].mlp
    mlp.forward = type(mlp).forward.__get__(mlp)  # a forward bound on the instance
    lemo_ds.apply_lemo(model, {**SPARSE, "fused_ops": "on"})
    assert type(mlp).__name__ == "LlamaMLP"
    assert type(model.model.layers[0].mlp).__name__ == "FusedSwiGLULlamaMLP"


def test_on_without_triton_names_what_is_missing(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = converted(tiny_model("llama", layers=3, dtype=torch.float32), "on")
    ids, position_ids = rows()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 is not set"):
        model(input_ids=ids.cpu(), labels=ids.cpu(), position_ids=position_ids.cpu())


def test_fused_linear_cross_entropy_equals_segment_loss():
    """segment_loss_impl "liger" (Liger's fused linear cross-entropy, called as the LM head's forward) against
    lemo_ds's torch segment loss: loss, the hidden states' gradient and the head's own gradient (full fine-tuning)."""
    pytest.importorskip("liger_kernel")
    gen = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(16, 50, bias=False).to(DEVICE)
    hidden = torch.randn(2, 13, 16, generator=gen).to(DEVICE).requires_grad_()
    if not segment_loss.liger_usable(hidden):
        triton = pytest.importorskip("triton")
        pytest.skip(f"Liger's kernels cannot run on {DEVICE} here (Triton {triton.__version__}: its interpreter runs "
                    "them from 3.7)")
    labels = torch.randint(0, 50, (2, 13), generator=gen).to(DEVICE)
    labels[0, 4] = -100
    results = []
    for impl in ("liger", "torch"):
        head.zero_grad(set_to_none=True)
        hidden.grad = None
        loss = segment_loss.segment_lm_loss(head, hidden, labels, segment_tokens=5, impl=impl)
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), head.weight.grad.clone()))
        assert "forward" not in head.__dict__  # the fused forward was bound for that one call
    for fused, plain in zip(*results):
        torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
