"""The job a user runs instead of lemo_ds: Hugging Face + Liger-Kernel + activation checkpointing + packed rows.

What ``TrainingArguments(use_liger_kernel=True, gradient_checkpointing=True)`` with padding-free packing gives,
written as a plain loop so that nothing else differs from launch/train.py's job: the same model (preset or local
directory, built directly on the GPU), the same LoRA, the same rows in the same order (``lemo_ds.training.data``,
same seed), torch AdamW with the shipped configs' settings and gradient clipping (on float32 masters of bf16
adapters, ``--lora-dtype bfloat16``), no DeepSpeed. Liger:
``apply_liger_kernel_to_llama(rope, rms_norm, swiglu, fused_linear_cross_entropy)`` on the model; Hugging Face's
non-reentrant checkpointing of every decoder layer; packed documents attend within themselves through
``lemo_ds.enable_document_attention`` (varlen attention, no [s, s] mask: what flash-attention's padding-free path
does). ``--kernels torch`` leaves Liger out (plain Hugging Face + checkpointing + packing). ``--autocast`` runs the
forward under ``torch.autocast(bfloat16)``, as the Trainer does with ``bf16=True`` (through accelerate): peft keeps
the LoRA adapters in float32 beside the bf16 model, and autocast runs their matmuls in bf16.

ALST's memory features for one GPU (Arctic Long Sequence Training, on DeepSpeed's own implementations, as its recipes
turn them on), for the longest-context comparison: ``--offload-checkpoints`` moves each checkpointed decoder-layer
input to pinned host memory with asynchronous copies and brings it back for the layer's backward
(``deepspeed.runtime.activation_checkpointing.offload_activations.CheckpointHiddenStatesOffload`` around forward and
backward); ``--tiled-mlp`` runs every MLP in ceil(s / hidden) tiles along the sequence, each recomputed in backward
(``deepspeed.runtime.sequence_parallel.ulysses_sp.TiledMLP``, ALST's tile count), so the MLP's [s, intermediate]
activations never exist whole. Parameter and optimizer offload, ALST's other single-GPU features, do not apply to
LoRA on a model whose weights fit.

    python benchmarks/hf_liger_job.py --model llama-3-8b --data ROWS --seq-len 65536 --max-steps 6 --output-dir OUT

Writes OUT/metrics.jsonl (one line per step: loss, step_time_s, peak_mem_bytes) and OUT/summary.json with
launch/train.py's keys (tokens_per_s without the first step, peak_mem_bytes), so benchmarks/product_path.py reads
both jobs alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import lemo_ds  # noqa: E402
from lemo_ds.hf_compat import checkpointing_enable  # noqa: E402
from lemo_ds.training import data, metrics, model  # noqa: E402
from lemo_ds.training.tokenizer import ByteTokenizer, load_hf_tokenizer  # noqa: E402

# The shipped configs' optimizer (ds_configs/zero3_lemo.json): AdamW, betas (0.9, 0.95), clipping 1.0.
BETAS, CLIP = (0.9, 0.95), 1.0
PROFILE_SKIP, PROFILE_ACTIVE = 2, 2  # --profile-out: steps before the profiled ones, profiled steps
LORA_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}  # None: peft's own choice, float32 adapters


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--model", default="tiny-llama", help="a preset or a local Hugging Face model directory")
    parser.add_argument("--data", default=None, help="launch/train.py's --data (default: the Python stdlib)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--lora-r", type=int, default=8, help="0: full fine-tuning")
    parser.add_argument("--lora-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the adapters' dtype on CUDA. float32: peft's (the Trainer keeps them so with bf16=True); "
                             "bfloat16: as DeepSpeed's bf16 mode holds every parameter (the main job, ALST's stack), "
                             "so that no adapter copies its [s, h] input to float32")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kernels", choices=("liger", "torch"), default="liger",
                        help="liger: Liger-Kernel's RoPE, RMSNorm, SwiGLU and fused linear cross-entropy (CUDA)")
    parser.add_argument("--autocast", action="store_true",
                        help="forward under torch.autocast(bfloat16), as TrainingArguments(bf16=True) (CUDA)")
    parser.add_argument("--offload-checkpoints", action="store_true",
                        help="ALST: each checkpointed layer input to pinned host memory (DeepSpeed's "
                             "CheckpointHiddenStatesOffload)")
    parser.add_argument("--tiled-mlp", action="store_true",
                        help="ALST: every MLP in ceil(s / hidden) tiles along the sequence (DeepSpeed's TiledMLP)")
    parser.add_argument("--profile-out", default=None,
                        help="record steps 3 and 4 under torch.profiler and write ops-hf-liger.txt and "
                             "profile-hf-liger.json there, as benchmarks/profile_job.py does for the main job")
    parser.add_argument("--memory-peak", action="store_true",
                        help="with --profile-out (CUDA), instead of the time profile: what is alive at step 2's "
                             "peak of device memory, as memory-peak-hf-liger.json there (profile_job.py's record)")
    parser.add_argument("--output-dir", required=True)
    return parser.parse_args(argv)


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    source = model.resolve_model(args.model)
    with device:  # straight onto the GPU: an 8B model is never materialised on the host
        net = model.build_model(source, dtype, args.seed)
    if args.kernels == "liger":
        if source.config.model_type != "llama":
            raise SystemExit(f"--kernels liger: this job applies Liger's Llama patch; the model is a "
                             f"{source.config.model_type}")  # fmt: skip
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True, model=net)  # fmt: skip
    if args.tiled_mlp:
        tile_mlps(net)
    checkpointing_enable(net, use_reentrant=False)
    net.enable_input_require_grads()  # LoRA + checkpointing: gradients must reach the adapters
    if args.lora_r > 0:
        net = model.add_lora(net, args.lora_r, args.seed, dtype=LORA_DTYPES[args.lora_dtype])
    lemo_ds.enable_document_attention(net)
    return net.train()


def tile_mlps(net: torch.nn.Module) -> int:
    """Every decoder layer's MLP through DeepSpeed's TiledMLP, in ceil(s / hidden) tiles (ALST's count); returns how
    many MLPs. The forward wrapped is the instance's own, Liger's SwiGLU where Liger patched it."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in net.modules() if isinstance(m, GradientCheckpointingLayer)]
    mlps = [layer.mlp for layer in layers if isinstance(getattr(layer, "mlp", None), torch.nn.Module)]
    if not mlps:
        raise SystemExit(f"--tiled-mlp: no decoder layer with an .mlp in {type(net).__name__}")
    for mlp in mlps:
        mlp.forward = tiled_forward(mlp.forward)
    return len(mlps)


def tiled_forward(forward):
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    def forward_in_tiles(x: torch.Tensor) -> torch.Tensor:  # x [b, s, h]
        tiles = math.ceil(x.shape[-2] / x.shape[-1])
        if tiles <= 1:
            return forward(x)
        # No ZeRO here: no parameters whose gradient readiness TiledMLP must hold back between tiles.
        return TiledMLP.apply(lambda _module, tile: forward(tile), None, x, tiles, [])

    return forward_in_tiles


def checkpoint_offload() -> contextlib.AbstractContextManager:
    """DeepSpeed's offload of the checkpointed layer inputs; entered around each step's forward and backward (its
    exit waits for the copies and frees what it holds). Only on an accelerator: on a CPU it counts the layer inputs
    it is given and leaves them where they are."""
    from deepspeed.runtime.activation_checkpointing.offload_activations import CheckpointHiddenStatesOffload

    return CheckpointHiddenStatesOffload()


def step_adapters(trainable: list[torch.Tensor], masters: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    """Clip and step: on the float32 master copies of 16-bit adapters (their gradients upcast, the new values copied
    back), or on the adapters themselves where they are float32 (``masters`` holds the same tensors)."""
    for param, master in zip(trainable, masters, strict=True):
        if master is not param:
            master.grad = None if param.grad is None else param.grad.float()
            param.grad = None
    torch.nn.utils.clip_grad_norm_(masters, CLIP)
    optimizer.step()
    for param, master in zip(trainable, masters, strict=True):
        if master is not param:
            param.data.copy_(master)
    optimizer.zero_grad(set_to_none=True)


def write_memory_peak(record: dict, out: Path) -> None:
    """--memory-peak's record of step 2, as profile_job.py --memory-peak writes the main job's."""
    from benchmarks.memory_peak import markdown

    record = {"tag": "hf-liger", "argv": sys.argv[1:], "recorded_step": 2, **record}
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory-peak-hf-liger.json").write_text(json.dumps(record, indent=1))
    print(markdown(record, "### hf-liger, step 2"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = model.resolve_model(args.model)
    tokenizer = ByteTokenizer() if source.kind == "preset" else load_hf_tokenizer(args.model)
    files = data.discover_files(args.data)
    if args.lora_dtype != "float32" and not cuda:
        raise SystemExit(f"--lora-dtype {args.lora_dtype}: on a CPU this job runs in float32; leave --lora-dtype out")
    if args.memory_peak and (args.profile_out is None or not cuda or args.max_steps < 2):
        raise SystemExit("--memory-peak records step 2 on CUDA: give --profile-out DIR and --max-steps 2 or more")
    net = build(args, device, dtype)
    trainable = [p for p in net.parameters() if p.requires_grad]
    # The optimizer steps float32 copies of 16-bit adapters (--lora-dtype bfloat16), as DeepSpeed's bf16 optimizer
    # does: AdamW's updates are far below a bf16 weight's resolution.
    masters = [p.detach().float() if p.dtype != torch.float32 else p for p in trainable]
    optimizer = torch.optim.AdamW(masters, lr=args.lr, betas=BETAS, eps=1e-8, weight_decay=0.0)
    rows = data.packed_rows(files, tokenizer, args.seq_len, args.seed)  # launch/train.py's rows, in its order
    batches = data.rank_batches(rows, rank=0, world_size=1, micro_batch=1)
    log = metrics.MetricsLog(out / "metrics.jsonl")
    totals = metrics.RunTotals()
    started = time.perf_counter()
    profiler = None
    if args.profile_out is not None and not args.memory_peak:
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        schedule = torch.profiler.schedule(wait=PROFILE_SKIP, warmup=0, active=PROFILE_ACTIVE, repeat=1)
        profiler = torch.profiler.profile(activities=activities, schedule=schedule)
        profiler.start()
    peak_trace = None
    if args.memory_peak:
        from benchmarks.memory_peak import StepTrace

        peak_trace = StepTrace(device)
    walls: list[float] = []
    offload = checkpoint_offload() if args.offload_checkpoints else contextlib.nullcontext()
    for step in range(1, args.max_steps + 1):
        batch = {key: value.to(device) for key, value in next(batches).items()}  # [1, s] each
        if peak_trace is not None and step == 2:
            peak_trace.start()
        t0 = time.perf_counter()
        with offload:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
                loss = net(**batch).loss
            loss.backward()
        step_adapters(trainable, masters, optimizer)
        loss_value = loss.item()  # waits for the step
        step_s = time.perf_counter() - t0
        walls.append(step_s)
        if profiler is not None:
            profiler.step()
        if peak_trace is not None and step == 2:
            write_memory_peak(peak_trace.stop(depth=6, top=30), Path(args.profile_out))
        if not math.isfinite(loss_value):
            raise SystemExit(f"the loss is {loss_value} at step {step}")
        peak, _ = metrics.peak_memory(device.type)
        totals.add(loss_value, [1.0], args.seq_len, step_s, timed=step > 1 or args.max_steps == 1)
        log.write({"step": step, "loss": loss_value, "tokens": args.seq_len, "step_time_s": step_s,
                   "tokens_per_s": args.seq_len / step_s, "peak_mem_bytes": peak})  # fmt: skip
    if profiler is not None:
        profiler.stop()
        from benchmarks.profile_job import write_profile

        Path(args.profile_out).mkdir(parents=True, exist_ok=True)
        tag = "hf-liger" if args.kernels == "liger" else "hf"
        write_profile(profiler, walls, Path(args.profile_out), tag, PROFILE_SKIP, PROFILE_ACTIVE, sys.argv[1:])
    peak, kind = metrics.peak_memory(device.type)
    metrics.write_json_atomic(out / "summary.json", {
        "steps": args.max_steps, "final_loss": totals.final_loss, "tokens_per_s": totals.tokens_per_s,
        "peak_mem_bytes": peak, "peak_mem_kind": kind, "mean_keep_ratio": 1.0, "world_size": 1,
        "model": args.model, "seq_len": args.seq_len, "lora_r": args.lora_r, "kernels": args.kernels,
        "lora_dtype": args.lora_dtype,
        "autocast": args.autocast, "tiled_mlp": args.tiled_mlp, "offload_checkpoints": args.offload_checkpoints,
        # the last step's checkpointed layer inputs: given to the offload, copied to the host (all but the last
        # layer's, which the first backward needs at once), refused (every one on a CPU: no accelerator to copy from)
        **({"offload_stats": {"marked": offload.stats.marked_tensors, "offloaded": offload.stats.offloaded_tensors,
                              "skipped": offload.stats.skipped_marked_tensors}}
           if args.offload_checkpoints else {}),
        "dtype": str(dtype).removeprefix("torch."), "grad_ckpt": "hf", "device": device.type,
        "elapsed_s": time.perf_counter() - started, "command": " ".join(sys.argv),
    })  # fmt: skip
    print(f"hf job ({args.kernels}): {totals.tokens_per_s:,.0f} tok/s, peak {metrics.format_bytes(peak)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
