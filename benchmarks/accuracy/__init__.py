"""The accuracy experiment: does token elimination keep fine-tuning quality? (LeMo's context extension, small).

One command (``python benchmarks/accuracy/run.py``) pretrains a small Llama on real books, extends its context 8x
with RoPE scaling and LoRA fine-tuning through launch/train.py for every scorer and keep ratio, and evaluates
dense held-out perplexity and predictor recall. See run.py.
"""
