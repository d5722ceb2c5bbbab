"""Where the bytes go: what autograd stores for one decoder layer of the real shapes, counted on CPU.

    PYTHONPATH=. python benchmarks/memory_accounting.py [--out benchmarks/results/memory_accounting.json]

One decoder layer of the Llama-2-7B / Llama-3-8B shape (bf16, SDPA, peft LoRA r=8 on q/k/v/o with float32
adapters, as benchmarks/harness/model.py builds it), a short sequence (320 tokens; blocks of 32 so that keep 0.4 is
exactly 4 of 10 blocks), forward + backward under saved-tensor hooks that count every stored storage once, measured
when the forward ends (so offloaded inputs count 0). Per token and layer, in units of hidden-size bytes, for:
dense and sparse (keep 0.4), each with lemo_ds's memory stack off, with saved-tensor compaction, with compaction +
tiled MLP; under checkpointing the stored input per layer, with and without offload. Then it extrapolates to the
32-layer model at 8K and 128K (17 dense layers, 15 at keep 0.4) and puts the estimates next to the H200 peaks
measured in benchmarks/results/memory-*.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness.model import LORA_TARGETS  # noqa: E402
from benchmarks.harness.shapes import get_shape  # noqa: E402

GIB = 2**30
SEQ, BLOCK = 320, 32
OFF = {"segment_loss": False, "sparse_checkpointing": False, "tiled_mlp": False, "compact_saves": False}
COMPACT = {**OFF, "compact_saves": True}
STACK = {**COMPACT, "segment_loss": True, "tiled_mlp": True, "tiled_mlp_tokens": 64, "sparse_checkpointing": True}
# Measured on one H200 (benchmarks/results/memory-paper-20261122-000308.json, memory-long-20261122-000352.json).
MEASURED = {
    "llama2-7b@8192": {"dense": 63.83, "dense+stack(old)": 47.40, "lemo-oracle": 50.28,
                       "lemo-oracle+stack(old)": 37.84},
    "llama3-8b@131072": {"dense+ckpt+chunked-loss": 83.69, "dense+ckpt+stack(old)": 72.69,
                         "lemo-oracle+ckpt+stack(old)": 64.08},
}


def build(shape_name: str, vocab: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    shape = get_shape(shape_name)
    config = shape.to_config(SEQ)
    config.num_hidden_layers, config.vocab_size = 1, vocab
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(LORA_TARGETS), bias="none",
                      task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    model.train()
    return shape, model


def stored_bytes(model, ids, checkpointing: str | None = None) -> dict[str, int]:
    """Bytes autograd holds for backward at the end of the forward, inside the decoder layer and outside it."""
    import lemo_ds  # noqa: F401

    layer = model.get_base_model().model.layers[0]
    where = {"inside": False}
    packed: list[tuple[str, torch.Tensor]] = []
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        packed.append(("layer" if where["inside"] else "outside", tensor))
        return tensor

    pre = layer.register_forward_pre_hook(lambda *a: where.update(inside=True))
    post = layer.register_forward_hook(lambda *a: where.update(inside=False))
    inputs = []
    if checkpointing is not None:  # the layer's stored input: what the checkpoint keeps (a closure or ctx)
        original = layer._gradient_checkpointing_func
        def spy(function, *args, **kwargs):  # noqa: E306
            inputs.extend(a for a in args if isinstance(a, torch.Tensor))
            return original(function, *args, **kwargs)
        layer._gradient_checkpointing_func = spy
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        seen, out = set(), {"layer": 0, "outside": 0, "checkpoint_input": 0}
        for kind, tensor in [*(("checkpoint_input", t) for t in inputs), *packed]:
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in seen or key in params or storage.nbytes() == 0:
                continue
            seen.add(key)
            out[kind] += storage.nbytes()
        loss.backward()
    finally:
        pre.remove()
        post.remove()
        if checkpointing is not None:
            layer._gradient_checkpointing_func = original
    return out


def variant(shape_name: str, vocab: int, keep: float | None, memory: dict | None, checkpointing: str | None = None):
    import lemo_ds
    from lemo_ds.hf_compat import checkpointing_enable

    _, model = build(shape_name, vocab)  # built afresh (seed 0) for each case: one layer's weights in memory at a time
    # The embedding output requires grad, so the one layer stores what a middle layer of the model stores.
    model.get_base_model().enable_input_require_grads()
    if checkpointing is not None:
        checkpointing_enable(model.get_base_model(), use_reentrant=checkpointing == "reentrant")
    if keep is not None:
        lemo_ds.apply_lemo(model, {"keep_ratio": keep, "dense_layers": [], "block_size": BLOCK, "scorer": "norm",
                                   "inplace_writeback": False,  # the one layer's input is a leaf here
                                   "memory": memory})
    return model


# The vocabulary of the one-layer model: a small one (memory of the CPU machine). Only the Hugging Face loss stores
# something of vocabulary size (float32 logits, 4 B per entry and token: a run of Llama-2 with its own 32000-token
# vocabulary stored 35.25 h outside the layer = the final norm's 4 h + 32000 x 4 B); ``account`` adds the difference
# to the real vocabulary.
ACCOUNTING_VOCAB = {"llama2-7b": 2048, "llama3-8b": 2048}
HF_LOSS_ROWS = ("dense", "sparse0.4", "dense+ckpt")


def account(shape_name: str) -> dict:
    vocab = ACCOUNTING_VOCAB.get(shape_name, 2048)
    shape = get_shape(shape_name)
    h = shape.hidden
    ids = torch.randint(0, vocab, (1, SEQ), generator=torch.Generator().manual_seed(0))
    rows = {}
    tiles = {"tiled_mlp": True, "tiled_mlp_tokens": 64}
    old_stack = {**OFF, "segment_loss": True, "sparse_checkpointing": True, **tiles}  # before this change
    exact = {**COMPACT, "segment_loss": True, "sparse_checkpointing": True}  # no matmul recomputed in the layers
    cases = {
        "dense": (None, None, None),
        "dense+oldstack": (1.0, old_stack, None), "dense+exact": (1.0, exact, None), "dense+stack": (1.0, STACK, None),
        "sparse0.4": (0.4, OFF, None), "sparse0.4+oldstack": (0.4, old_stack, None),
        "sparse0.4+exact": (0.4, exact, None), "sparse0.4+stack": (0.4, STACK, None),
        "dense+ckpt": (None, None, "non-reentrant"),
        "sparse0.4+ckpt+stack": (0.4, STACK, "non-reentrant"),
        "dense+ckpt+offload": (1.0, {**STACK, "offload_checkpoints": True}, "non-reentrant"),
        "sparse0.4+ckpt+offload": (0.4, {**STACK, "offload_checkpoints": True}, "non-reentrant"),
    }
    for name, (keep, memory, ckpt) in cases.items():
        counted = stored_bytes(variant(shape_name, vocab, keep, memory, ckpt), ids, ckpt)
        gc.collect()
        stored_layer = counted["layer"] + counted["checkpoint_input"]
        rows[name] = {"layer_bytes": stored_layer, "outside_bytes": counted["outside"],
                      "per_token_per_layer_in_h": round(stored_layer / SEQ / h, 2),
                      "outside_per_token_in_h": round(counted["outside"] / SEQ / h, 2)}
        print(f"{shape_name:10s} {name:30s} layer {rows[name]['per_token_per_layer_in_h']:6.2f} h B/token   "
              f"outside {rows[name]['outside_per_token_in_h']:6.2f} h B/token", flush=True)
    params = full_params(shape)
    for name in HF_LOSS_ROWS:
        rows[name]["outside_per_token_in_h"] = round(
            rows[name]["outside_per_token_in_h"] + (shape.vocab - vocab) * 4 / h, 2)
        rows[name]["outside_note"] = f"measured with a {vocab}-token vocabulary, + (V - {vocab}) x 4 B"
    return {"name": shape_name, "shape": shape.describe(), "seq": SEQ, "block_size": BLOCK, "rows": rows,
            "params": params, "accounting_vocab": vocab}


def full_params(shape) -> int:
    """Parameters of the 32-layer model (embedding, layers, final norm, LM head; LoRA adds 0.1%)."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return shape.layers * layer + 2 * shape.vocab * h + h


LORA_AND_ADAM_GIB = 0.13  # r=8 on q/k/v/o of 32 layers: 8.4M float32 parameters x (value, grad, 2 Adam moments)


def extrapolate(result: dict, seq: int, vocab: int, segment: int = 4096) -> dict:
    """The 32-layer model (17 dense layers, 15 at keep 0.4) at ``seq`` tokens: stored activations, and peak
    estimates = weights + LoRA/Adam + stored + the loss's transient (HF: [s, V] float32 gradient + bf16 copy, 6 B;
    segment loss: one [segment, V] block, logits + gradient in float32 + bf16, 10 B). Under checkpointing: the
    stored layer inputs + one dense layer's recompute (its no-checkpointing bytes) + what lies outside + a backward
    transient T calibrated on the measured lemo-oracle+ckpt+stack (old stack) peak, reused for the new stacks."""
    shape, rows = result["shape"], result["rows"]
    h, n_dense, n_sparse = shape["hidden"], 17, 15
    weights = result["params"] * 2 / GIB
    tok = {name: row["per_token_per_layer_in_h"] * h for name, row in rows.items()}
    out = {name: row["outside_per_token_in_h"] * h for name, row in rows.items()}
    hf_loss, seg_loss = seq * vocab * 6 / GIB, min(seq, segment) * vocab * 10 / GIB
    fixed = weights + LORA_AND_ADAM_GIB

    def no_ckpt(dense_row: str, sparse_row: str | None, loss: float) -> dict:
        layers = seq * (n_dense * tok[dense_row] + n_sparse * tok[sparse_row or dense_row]) / GIB
        outside = seq * out[dense_row] / GIB
        return {"layers_gib": round(layers, 2), "outside_gib": round(outside, 2),
                "peak_estimate_gib": round(fixed + layers + outside + loss, 2)}

    est = {"weights_gib": round(weights, 2), "params": result["params"], "no_ckpt": {
        "dense (HF loss)": no_ckpt("dense", None, hf_loss),
        "dense+oldstack": no_ckpt("dense+oldstack", None, seg_loss),
        "dense+exact": no_ckpt("dense+exact", None, seg_loss),
        "dense+stack": no_ckpt("dense+stack", None, seg_loss),
        "lemo (HF loss)": no_ckpt("dense", "sparse0.4", hf_loss),
        "lemo+oldstack": no_ckpt("dense+oldstack", "sparse0.4+oldstack", seg_loss),
        "lemo+exact": no_ckpt("dense+exact", "sparse0.4+exact", seg_loss),
        "lemo+stack": no_ckpt("dense+stack", "sparse0.4+stack", seg_loss),
    }}
    input_bytes = 2 * h  # a layer input [s, h] in bf16
    kept_inputs = seq * (n_dense + n_sparse * 0.4) * input_bytes / GIB
    old = {"stored_inputs": kept_inputs, "recompute": seq * tok["dense+oldstack"] / GIB,
           "outside": seq * out["dense+oldstack"] / GIB}
    measured_old = MEASURED.get(f"{result['name']}@{seq}", {}).get("lemo-oracle+ckpt+stack(old)")
    transient = None if measured_old is None else measured_old - fixed - sum(old.values())
    ckpt = {"lemo+ckpt+oldstack": old,
            "dense+ckpt+oldstack": {**old, "stored_inputs": seq * 32 * input_bytes / GIB},
            "lemo+ckpt+stack": {"stored_inputs": kept_inputs, "recompute": seq * tok["dense+stack"] / GIB,
                                "outside": seq * out["dense+ckpt+offload"] / GIB},
            # two layer inputs on the device: the one being recomputed and the prefetched one
            "lemo+ckpt+offload": {"stored_inputs": 2 * seq * input_bytes / GIB,
                                  "recompute": seq * tok["dense+stack"] / GIB,
                                  "outside": seq * out["dense+ckpt+offload"] / GIB},
            "dense+ckpt+offload": {"stored_inputs": 2 * seq * input_bytes / GIB,
                                   "recompute": seq * tok["dense+stack"] / GIB,
                                   "outside": seq * out["dense+ckpt+offload"] / GIB}}
    for parts in ckpt.values():
        for key in list(parts):
            parts[key] = round(parts[key], 2)
        if transient is not None:
            parts["peak_estimate_gib"] = round(fixed + sum(parts.values()) + transient, 2)
    est["ckpt"] = ckpt
    est["ckpt_backward_transient_gib"] = None if transient is None else round(transient, 2)
    est["host_pinned_gib"] = {"lemo+ckpt+offload": round(kept_inputs, 2),
                              "dense+ckpt+offload": round(seq * 32 * input_bytes / GIB, 2)}
    return est


def table(report: dict) -> str:
    lines = ["| shape | tokens | setting | layers GiB | peak estimate GiB | measured GiB |",
             "|---|---|---|---|---|---|"]
    for name, result in report["shapes"].items():
        for seq, est in result["extrapolated"].items():
            measured = MEASURED.get(f"{name}@{seq}", {})
            for setting, row in est["no_ckpt"].items():
                key = {"dense (HF loss)": "dense", "lemo (HF loss)": "lemo-oracle",
                       "dense+oldstack": "dense+stack(old)", "lemo+oldstack": "lemo-oracle+stack(old)"}.get(setting)
                lines.append(f"| {name} | {int(seq) // 1024}K | {setting}, no ckpt | {row['layers_gib']} | "
                             f"{row['peak_estimate_gib']} | {measured.get(key, '')} |")
            for setting, row in est["ckpt"].items():
                key = {"lemo+ckpt+oldstack": "lemo-oracle+ckpt+stack(old)",
                       "dense+ckpt+oldstack": "dense+ckpt+stack(old)"}.get(setting)
                lines.append(f"| {name} | {int(seq) // 1024}K | {setting} | {row['stored_inputs']} stored + "
                             f"{row['recompute']} recompute | {row.get('peak_estimate_gib', '')} | "
                             f"{measured.get(key, '')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/memory_accounting.json")
    parser.add_argument("--shapes", default="llama2-7b,llama3-8b")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    report = {"command": "PYTHONPATH=. python benchmarks/memory_accounting.py", "measured_h200_gib": MEASURED,
              "shapes": {}}
    out = Path(args.out)
    if out.is_file():  # one shape at a time keeps the CPU machine's memory low: merge into what is there
        report["shapes"] = json.loads(out.read_text())["shapes"]
    for name in args.shapes.split(","):
        result = account(name)
        vocab = get_shape(name).vocab
        result["extrapolated"] = {str(seq): extrapolate(result, seq, vocab) for seq in (8192, 131072)}
        report["shapes"][name] = result
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report), flush=True)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
