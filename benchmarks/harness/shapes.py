"""Model shapes: the real dimensions of the models the paper uses, built as transformers ``LlamaConfig``.

Weights are random (see ``harness.model``): memory and time depend on the shape only, not on the values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import LlamaConfig


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rope_theta: float
    max_positions: int  # the model's own max_position_embeddings; raised to the longest benchmarked sequence

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def to_config(self, max_seq: int, attn_implementation: str = "sdpa", **overrides) -> LlamaConfig:
        """``overrides``: further LlamaConfig arguments, taking precedence over the ones set here (the accuracy
        benchmark's model keeps its tokenizer's special tokens and Hugging Face's default KV cache setting)."""
        arguments = {
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "max_position_embeddings": max(self.max_positions, max_seq),
            "rope_theta": self.rope_theta,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "use_cache": False,  # training: no KV cache
        }
        config = LlamaConfig(**{**arguments, **overrides})
        config._attn_implementation = attn_implementation
        return config

    def describe(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config, name: str = "") -> ModelShape:
        """The shape of a Hugging Face Llama-style config (a preset of lemo_ds.training.presets, say)."""
        rope = getattr(config, "rope_parameters", None) or {}
        return cls(name or getattr(config, "model_type", ""), hidden=config.hidden_size,
                   layers=config.num_hidden_layers, heads=config.num_attention_heads,
                   kv_heads=config.num_key_value_heads, intermediate=config.intermediate_size,
                   vocab=config.vocab_size, rope_theta=float(rope.get("rope_theta", 10000.0)),
                   max_positions=config.max_position_embeddings)  # fmt: skip


SHAPES: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        ModelShape("llama2-7b", hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000,
                   rope_theta=10000.0, max_positions=4096),
        ModelShape("llama3-8b", hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256,
                   rope_theta=500000.0, max_positions=8192),
        # CPU tests: 8 layers so that "auto" dense layers (first half + last) leave 3 sparse layers (4, 5, 6).
        ModelShape("tiny-llama", hidden=64, layers=8, heads=4, kv_heads=2, intermediate=128, vocab=512,
                   rope_theta=10000.0, max_positions=256),
    )
}


def get_shape(name: str) -> ModelShape:
    if name not in SHAPES:
        raise KeyError(f"unknown model shape {name!r}; known shapes: {', '.join(SHAPES)}")
    return SHAPES[name]
