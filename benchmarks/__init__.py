"""lemo_ds benchmarks: one harness for memory, step time and longest context (see benchmarks/run.py)."""
