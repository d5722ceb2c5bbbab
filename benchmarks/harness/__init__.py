"""Building blocks of the benchmark harness, one job per module.

- ``shapes``: model shapes (real dimensions of Llama-2-7B, Llama-3-8B; a tiny one for CPU tests).
- ``model``: builds the random-init bf16 model with LoRA directly on the device.
- ``variants``: the compared variants (declarative) and switching one model object between them.
- ``losses``: the HF loss and the chunked linear cross-entropy (Liger on GPU, a PyTorch fallback).
- ``measure``: one training step, timed, with peak memory; the alternating loop; OOM as a result.
- ``flops``: model FLOPs of one step from the tokens each layer really processed, and MFU.
- ``suites``: the registry of suites (which shapes, sequence lengths, variants).
- ``results``: environment metadata, the incremental JSON file, the Markdown table.
"""
