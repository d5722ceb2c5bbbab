"""python -m lemo_ds.plan --model PRESET_OR_DIR --seq-len N|32K|1M|max [--deepspeed CONFIG] [--gpu-mem 80GiB]
[--host-mem 128GiB] [--world-size N] [--lora-r 8] [--device cuda|cpu]

Prints the predicted peak device and host memory of that launch/train.py job with the formula's terms
(lemo_ds/plan/memory.py) and, when it does not fit, the cheapest change that does, as the "lemo" section to paste.
Default --gpu-mem: the CUDA device's total memory, or on a machine without CUDA its RAM (MemTotal; a CPU run's
tensors live there) over the job's ranks on the machine (LOCAL_WORLD_SIZE); default --host-mem: MemTotal over those
ranks. Totals, not what is free: every rank of a job reaches the same verdict.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from lemo_ds.config import load_ds_config, split_ds_config
from lemo_ds.plan import job, search
from lemo_ds.plan.refusal import fix_text
from lemo_ds.plan.search import gib


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from lemo_ds.training.flags import DEFAULT_CONFIG, JobArgumentParser

    parser = JobArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", required=True, help="a preset (lemo_ds/training/presets.py) or a Hugging Face model directory")
    add("--seq-len", required=True, help="tokens per row: 4096, 32K, 1M, or max (the longest that fits)")
    add("--deepspeed", default=str(DEFAULT_CONFIG), metavar="CONFIG", help="DeepSpeed config (default: %(default)s)")
    add("--gpu-mem", default=None, help="device memory, e.g. 80GiB (default: this CUDA device's, else RAM per rank)")
    add("--host-mem", default=None, help="host memory, e.g. 128GiB (default: RAM per rank here)")
    add("--world-size", type=int, default=1, help="ranks (default: %(default)s)")
    add("--lora-r", type=int, default=8, help="LoRA rank; 0 = full fine-tuning (default: %(default)s)")
    add("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    try:
        args.seq_len = "max" if args.seq_len == "max" else search.parse_tokens(args.seq_len)
        args.gpu_mem = search.parse_bytes(args.gpu_mem) if args.gpu_mem else None
        args.host_mem = search.parse_bytes(args.host_mem) if args.host_mem else None
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    from lemo_ds.training.model import resolve_model
    from lemo_ds.training.precision import resolve_precision

    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    raw = load_ds_config(args.deepspeed)
    section, ds_config = split_ds_config(raw)
    lemo = section if section is not None and section.enabled else None
    if device == "cuda" and not torch.cuda.is_available():  # planning a GPU job here: bf16 "auto" means bf16 there
        dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") in (True, "auto") else torch.float32
    else:
        ds_config, dtype, _ = resolve_precision(ds_config, device)
    source = resolve_model(args.model)
    gpu_mem = args.gpu_mem or search.default_gpu_mem(device)
    host_mem = args.host_mem or search.default_host_mem()
    seq = 1 if args.seq_len == "max" else args.seq_len
    shape, setup = job.job_setup(source.config, ds_config, lemo, seq_len=seq, lora_r=args.lora_r,
                                 world_size=args.world_size, device=device, dtype=dtype)  # fmt: skip
    if args.seq_len == "max":
        longest = search.longest_fit(shape, setup, gpu_mem, host_mem, lemo.block_size if lemo else 64)
        print(f"longest --seq-len that fits {gib(gpu_mem)} device / {gib(host_mem)} host: {longest}")
        if longest == 0:
            return 1
        setup = job.with_seq_len(setup, longest)
    result = search.plan(shape, setup, gpu_mem, host_mem)
    p = result.prediction
    print(f"{args.model}, --seq-len {setup.seq_len}, {args.deepspeed}, {args.world_size} rank(s), {device}, "
          f"{dtype}".replace("torch.", ""))  # fmt: skip
    print(f"predicted peak device memory: {gib(p.device_bytes)} of {gib(gpu_mem)}")
    print(f"predicted host memory: {gib(p.host_bytes)} of {gib(host_mem)}")
    for name, value in p.terms.items():
        print(f"  {name:<40} {gib(value):>12}")
    if result.fits:
        print("fits")
        return 0
    print(f"does not fit; {fix_text(result, raw.get('lemo'), raw)}")
    if result.found:
        print(json.dumps({"lemo": result.section(raw.get("lemo")), **result.ds_sections(raw)}, indent=2))
    return 1


if __name__ == "__main__":
    sys.exit(main())
