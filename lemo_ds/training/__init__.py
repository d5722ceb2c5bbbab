"""The training job behind launch/train.py, one job per module.

- ``job``: the Job: the flags resolved and every input checked (the memory planner's verdict included) before
  anything heavy, on every rank alike
- ``runtime``: the Runtime: process group, heartbeat between the ranks, model, engine, data; closing them
- ``loop``: the training steps, checkpoints, held-out evaluation, metrics.jsonl and summary.json (a stop included)
- ``data``: text files -> documents -> packed rows (position ids restart per document) -> rank shards
- ``tokenizer``: the byte-level tokenizer of the presets, an adapter for Hugging Face tokenizers
- ``presets``: model configs built in code (tiny ones for CPU, real 7B/8B shapes for GPU benchmarks)
- ``model``: resolve ``--model``, build it (under ZeRO-3 partitioning), add LoRA
- ``checkpointing``: activation checkpointing, transformers' or DeepSpeed's
- ``precision``: bf16 "auto" resolved against the hardware
- ``flags``: the flags launch/train.py and launch/train_hf.py share, what they change in the DeepSpeed config
- ``parallel``: the job's ParallelDims (world, data- and sequence-parallel sizes, rows per step), Ulysses SP
- ``output_dir``: an earlier run is never overwritten by accident (``--overwrite`` clears it on every rank at once;
  a run that stopped before its first checkpoint is set aside by a rerun)
- ``launch_env``: a world of one without a launcher; CPU threads per rank; DeepSpeed's one-time op build
- ``ds_output``: DeepSpeed's log lines and prints, third-party warnings -> OUTPUT_DIR/deepspeed.log (or --verbose)
- ``sparsity``: a --seq-len too short for any sparse layer to skip a block (one warning)
- ``resume``: DeepSpeed checkpoints with the data position; resuming
- ``metrics``: metrics.jsonl, summary.json, peak memory
- ``tracking``: wandb, when the DeepSpeed config's monitor section enables it
"""
