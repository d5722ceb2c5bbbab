"""The training job behind launch/train.py, one job per module.

- ``job``: the Job: the flags resolved and every input checked (the memory planner's verdict included) before
  anything heavy, on every rank alike
- ``runtime``: the Runtime: process group, heartbeat between the ranks, model, engine, data; closing them
- ``loop``: the training steps, checkpoints, held-out evaluation, metrics.jsonl and summary.json (a stop included)
- ``errors``: the error of the job's own setup checks (data, model, flags)
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
- ``text_check``: a --data file that is not text at all (random bytes, an image) is refused
- ``resume``: DeepSpeed checkpoints with the data position; resuming
- ``checkpoint_files``: a checkpoint's completion marker (every file's size and SHA-256) and checking it again
- ``universal``: resuming on another number of ranks, through DeepSpeed's universal checkpoint
- ``retention``: --keep-checkpoints N, the newest complete tags kept, the one 'latest' names never deleted
- ``finite``: a non-finite loss or weights are never saved as a checkpoint
- ``peers``: a lost node stops the other ranks within a timeout, with one line naming it
- ``evaluate``: held-out perplexity (and passkey accuracy) at the end of a run
- ``metrics``: metrics.jsonl, summary.json, peak memory
- ``tracking``: wandb, when the DeepSpeed config's monitor section enables it
"""
