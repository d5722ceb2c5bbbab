"""Where torch's variable-length flash attention stops giving right gradients, and lemo_ds's pieces past it.

For each token count, packed documents of ``--document`` tokens at the Llama-3-8B heads (32 x 128, 8 key/value
heads) go through ``torch.nn.attention.varlen.varlen_attn`` in one call, and through
``lemo_ds.attention_pieces`` (calls under 2**31 elements, planned by ``plan_pieces``). The last document's output
and gradients are compared with that document alone (one small call): the relative error of each, with the
sizes that could wrap, tokens x heads x head dim with and without flash's 128 spare accumulator rows per document.
Writes ``<out>/flash-limit-<time>.json``. CUDA only:

    python benchmarks/flash_limit.py --out OUT [--tokens 458752,475136,524288,819200] [--document 1024]
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness.results import ResultFile, command_line, environment  # noqa: E402
from lemo_ds.attention_pieces import PIECE_ELEMENT_LIMIT, piecewise_attention, plan_pieces  # noqa: E402
from lemo_ds.document_attention import varlen_causal  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def _relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = ours.detach().float(), reference.detach().float()
    return float((ours - reference).norm() / reference.norm())


def _random(shape, generator) -> torch.Tensor:
    out = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    flat = out.view(-1)
    for start in range(0, flat.numel(), 1 << 28):  # no float32 twin of a 6.7 GB tensor
        piece = flat[start : start + (1 << 28)]
        piece.copy_(torch.randn(piece.shape, generator=generator, device="cuda"))
    return out


def _varlen(q, k, v, cu, longest):
    """torch's varlen_attn in one call, as lemo_ds.document_attention calls it under the limit."""
    return varlen_causal(q, k, v, cu, cu, longest, longest, HEAD_DIM**-0.5)


def _pieces(q, k, v, cu, longest):
    """lemo_ds's pieces of PIECE_ELEMENT_LIMIT, as lemo_ds.document_attention runs them past the limit."""
    pieces = plan_pieces(cu.tolist(), HEADS, HEAD_DIM, PIECE_ELEMENT_LIMIT)
    return piecewise_attention(q, k, v, pieces, HEAD_DIM**-0.5)


def measure(tokens: int, document: int, attention) -> dict:
    generator = torch.Generator(device="cuda").manual_seed(tokens)
    q = _random((tokens, HEADS, HEAD_DIM), generator).requires_grad_()  # [T, H, d]
    k = _random((tokens, KV_HEADS, HEAD_DIM), generator).requires_grad_()  # [T, KV, d]
    v = _random((tokens, KV_HEADS, HEAD_DIM), generator).requires_grad_()  # [T, KV, d]
    dout = _random((tokens, HEADS, HEAD_DIM), generator)  # [T, H, d]
    cu = torch.tensor([*range(0, tokens, document), tokens], dtype=torch.int32, device="cuda")  # [docs + 1]
    longest = int((cu[1:] - cu[:-1]).max())
    out = attention(q, k, v, cu, longest)
    out.backward(dout)
    last = tokens - int(cu[-2])
    alone = [t[-last:].detach().clone().requires_grad_() for t in (q, k, v)]
    cu_alone = torch.tensor([0, last], dtype=torch.int32, device="cuda")
    out_alone = _varlen(*alone, cu_alone, last)
    out_alone.backward(dout[-last:])
    docs = cu.numel() - 1
    return {
        "tokens": tokens,
        "documents": docs,
        "query_elements": tokens * HEADS * HEAD_DIM,
        "accumulator_elements": (tokens + 128 * docs) * HEADS * HEAD_DIM,
        "relative_error": {
            "output": _relative(out[-last:], out_alone),
            "dq": _relative(q.grad[-last:], alone[0].grad),
            "dk": _relative(k.grad[-last:], alone[1].grad),
            "dv": _relative(v.grad[-last:], alone[2].grad),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", default="458752,475136,524288,819200")
    parser.add_argument("--document", type=int, default=1024)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("flash_limit.py measures torch's CUDA flash kernels: run it on a GPU machine")
    result = ResultFile(args.out, "flash-limit", {"command": command_line(), "environment": environment(),
                                                  "document": args.document, "cases": []})  # fmt: skip
    for tokens in (int(t) for t in args.tokens.split(",")):
        for name, attention in (("varlen_attn", _varlen), ("lemo_ds pieces", _pieces)):
            case = {"attention": name, **measure(tokens, args.document, attention)}
            print(case, flush=True)
            result.data["cases"].append(case)
            result.write()
            gc.collect()
            torch.cuda.empty_cache()
    result.finish()
    print(result.path)


if __name__ == "__main__":
    main()
