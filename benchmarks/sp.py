"""Ulysses sequence parallelism with LeMo: peak memory, step time and tokens/s per GPU; longest context.

One measurement (every rank of one SP group: the world is the SP group, data parallel size 1)::

    deepspeed --num_gpus 4 benchmarks/sp.py --sp 4 --seq 65536 --variant dense-stack,lemo-stack --out DIR
    python benchmarks/sp.py --sp 1 --seq 16384 --variant lemo-stack --out DIR      # one GPU, no launcher

Longest context (a parent that never touches the GPU; every probe is a fresh launch of ``--sp`` ranks, and
probes that need fewer GPUs than there are run side by side on disjoint GPUs)::

    python benchmarks/sp.py --maxctx --sp 4 --variant lemo-stack --seqs 786432,1048576,1310720 --out DIR

The model: the Llama-3-8B shape (``--shape``), random init directly on the GPU, bf16, LoRA r=8 on q/k/v/o
(benchmarks/harness/model.py), Hugging Face activation checkpointing; variants (benchmarks/harness/variants.py):
``dense-stack`` = every keep ratio 1.0 with lemo_ds's memory stack (segment loss, sparse checkpointing, tiled MLP),
``lemo-stack`` = the same plus LeMo (oracle scores, keep 0.4 in the deeper half). Under SP every rank trains its
shard of one random sequence (position ids global, labels shifted before sharding) through lemo_ds's Ulysses path
(lemo_ds.sequence_parallel); the LoRA gradients are summed over the SP group (plain torch AdamW, no ZeRO: the
frozen bf16 weights are replicated, 16 GB a GPU), as DeepSpeed's SP data-parallel reduction would.

Reported per variant: peak memory (max over ranks of torch.cuda.max_memory_allocated / reserved), median step
time (forward + backward + gradient all-reduce + AdamW), tokens/s per GPU (= seq / step / sp) and model TFLOP/s
per GPU (benchmarks/harness/flops.py, quadratic attention included: at the same tokens per GPU, SP attends over an
sp-times longer sequence). An out-of-memory is a result (``"oom": true``), not a crash.

``--memory-probe`` (the max-context mode uses it): one step, and every decoder layer but the last skips its
attention kernel (it returns the queries, as DeepSpeed's ``skip_all_but_last_attention_debug_mode``), so a probe
at a million tokens takes a minute, not an hour. Peak memory stays that of a real step (under checkpointing one
layer is live at a time and the last layer's attention is real; FlashAttention's own memory is O(seq)); the step
time of a probe means nothing.

JSON: ``<out>/sp-<variants>-sp<N>-seq<S>-<timestamp>.json`` (results.py's format: environment, git commit or
$LEMO_BENCH_GIT_COMMIT, command line) and ``<out>/sp-maxctx-<variant>-sp<N>-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import results  # noqa: E402
from lemo_ds.training import launch_env  # noqa: E402

VARIANT_NAMES = {"dense-stack": "dense+ckpt+stack", "lemo-stack": "lemo-oracle+ckpt+stack"}
OOM_EXIT = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--sp", type=int, required=True, help="sequence-parallel size (= number of GPUs of the run)")
    add("--seq", type=int, help="tokens per sequence (whole sequence, all ranks together)")
    add("--seqs", default="", help="--maxctx: comma-separated sequence lengths to probe, ascending")
    add("--variant", default="lemo-stack", help=f"comma-separated: {', '.join(VARIANT_NAMES)}")
    add("--shape", default="llama3-8b", help="model shape (benchmarks/harness/shapes.py)")
    add("--out", default=str(results.DEFAULT_RESULTS_DIR), help="folder of the JSON results")
    add("--steps", type=int, default=3, help="timed steps per variant")
    add("--warmup", type=int, default=1, help="untimed steps per variant first")
    add("--lora-r", type=int, default=8)
    add("--dtype", default=None, help="bf16 (default on CUDA) or fp32 (default on CPU)")
    add("--keep-ratio", type=float, default=0.4, help="lemo-stack's keep ratio in the sparse layers")
    add("--memory-probe", action="store_true", help="one step, attention kernels skipped but in the last layer")
    add("--maxctx", action="store_true", help="probe --seqs, each in a fresh launch; record the longest that fits")
    add("--gpus", default=None, help="--maxctx: GPU ids to use (default: all visible)")
    add("--probe-timeout", type=float, default=420.0, help="--maxctx: seconds before a probe counts as failed")
    add("--budget-s", type=float, default=0.0, help="--maxctx: start no probe after this many seconds (0: none)")
    add("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in args.variant.split(","):
        if name not in VARIANT_NAMES:
            parser.error(f"--variant {name}: known variants are {', '.join(VARIANT_NAMES)}")
    if not args.maxctx and args.seq is None:
        parser.error("--seq is required (or --maxctx with --seqs)")
    return args


# ---- one measurement (every rank) -----------------------------------------------------------------------------


def _variant(name: str, keep_ratio: float):
    from benchmarks.harness.variants import dense_stack_variant, lemo_variant

    if name == "dense-stack":
        return dense_stack_variant(checkpointing=True)
    return lemo_variant("oracle", checkpointing=True, stack=True, keep_ratio=keep_ratio)


def _skip_attention_but_last(num_layers: int) -> None:
    """--memory-probe: every layer but the last returns its queries instead of attending (see the docstring).
    Installed as the core "sdpa" before sequence parallelism wraps it, so Ulysses' all-to-alls still run."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if getattr(module, "layer_idx", num_layers - 1) != num_layers - 1:
            return query.transpose(1, 2).contiguous(), None  # [b, S, H, d] like SDPA's output
        return sdpa(module, query, key, value, attention_mask, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = attention


def measure(args: argparse.Namespace) -> int:
    import deepspeed
    import torch
    import torch.distributed as dist

    from benchmarks.harness import flops
    from benchmarks.harness.measure import is_oom
    from benchmarks.harness.model import DTYPES, build_model
    from benchmarks.harness.shapes import get_shape
    from benchmarks.harness.variants import activate, deactivate
    from lemo_ds import get_controller, sequence_parallel

    cuda = torch.cuda.is_available()
    launch_env.default_single_process_env()  # one process without a launcher: a world of one on a free port
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != args.sp:
        raise SystemExit(f"benchmarks/sp.py: --sp {args.sp} but {world} ranks; launch --num_gpus {args.sp}")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    shape = get_shape(args.shape)
    names = args.variant.split(",")
    lemo_block = 64
    sequence_parallel.check_dims(sp=args.sp, world_size=world, seq_len=args.seq, block_size=lemo_block,
                                 heads=shape.heads, kv_heads=shape.kv_heads)  # fmt: skip
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    tag = f"sp-{'+'.join(names)}-sp{args.sp}-seq{args.seq}" + ("-probe" if args.memory_probe else "")
    record: dict[str, Any] = {
        "environment": results.environment(include_device=rank == 0),
        "command": results.command_line(),
        "commit": results.git_state().get("commit") or os.environ.get("LEMO_BENCH_GIT_COMMIT"),
        "settings": {"sp": args.sp, "world": world, "seq": args.seq, "tokens_per_gpu": args.seq // args.sp,
                     "shape": shape.describe(), "lora_rank": args.lora_r, "dtype": str(dtype).removeprefix("torch."),
                     "steps": 1 if args.memory_probe else args.steps, "warmup": 0 if args.memory_probe else args.warmup,
                     "memory_probe": args.memory_probe, "keep_ratio": args.keep_ratio,
                     "optimizer": "torch AdamW on LoRA, gradients summed over the SP group; no ZeRO"},
        "results": [],
    }  # fmt: skip
    out = results.ResultFile(args.out, tag, record) if rank == 0 else None

    def finish_with_oom(name: str, where: str, error: BaseException) -> int:
        # A rank out of memory cannot count on the others reaching the next collective: write what it knows and
        # exit at once (the launcher then stops the other ranks).
        entry = {"variant": name, "oom": True, "where": where, "rank": rank, "error": str(error).splitlines()[0]}
        path = Path(args.out) / f"{tag}-oom-rank{rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**record, "status": "oom", "results": [*record["results"], entry]}, indent=1))
        print("SP_BENCH_OOM " + json.dumps(entry), flush=True)
        sys.stdout.flush()
        os._exit(OOM_EXIT)

    try:
        bench = build_model(shape, args.seq, device, dtype, args.lora_r)
    except Exception as error:  # noqa: BLE001
        if is_oom(error):
            finish_with_oom(names[0], "build", error)
        raise
    if args.memory_probe:
        _skip_attention_but_last(shape.layers)
    state = sequence_parallel.setup(bench.model, args.sp, micro_batch=1) if args.sp > 1 else None
    local = args.seq // args.sp
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(shape.vocab, 32000), (1, args.seq), generator=generator)  # same on every rank
    shift = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)  # shifted before sharding
    rows = slice(rank * local, (rank + 1) * local)
    batch = {"input_ids": ids[:, rows].to(device), "position_ids": torch.arange(args.seq)[None, rows].to(device),
             "shift_labels": shift[:, rows].to(device)}  # fmt: skip
    trainable = [p for p in bench.model.parameters() if p.requires_grad]

    def step() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        if state is not None:
            loss, reported = sequence_parallel.forward_loss(bench.model, batch, state)
        else:
            loss = bench.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                               labels=batch["shift_labels"], shift_labels=batch["shift_labels"]).loss  # fmt: skip
            reported = loss.detach()
        loss.backward()
        if state is not None:  # the SP group's gradient is the sum of its ranks' (lemo_ds.sequence_parallel)
            for p in trainable:
                if p.grad is None:  # every rank must contribute every parameter to the one all-reduce
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.reshape(-1) for p in trainable])
            dist.all_reduce(flat, group=state.group)
            for p, g in zip(trainable, flat.split([p.numel() for p in trainable]), strict=True):
                p.grad.copy_(g.view_as(p))
        bench.optimizer.step()
        bench.optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        step.last_loss = float(reported)
        return time.perf_counter() - started

    for name in names:
        variant = _variant(name, args.keep_ratio)
        activate(bench, variant)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        warmup, steps = (0, 1) if args.memory_probe else (args.warmup, args.steps)
        times = []
        try:
            for index in range(warmup + steps):
                seconds = step()
                if index >= warmup:
                    times.append(seconds)
        except Exception as error:  # noqa: BLE001
            if is_oom(error):
                finish_with_oom(name, "step", error)
            raise
        controller = get_controller(bench.model)
        keep = controller.stats()["keep_ratio_per_layer"] if controller is not None else [1.0] * shape.layers
        peaks = torch.tensor([torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)]
                             if cuda else [0, 0], dtype=torch.float64, device=device)  # fmt: skip
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        step_s = statistics.median(times)
        model_flops = flops.step_flops(shape, args.seq, keep, args.lora_r)["model_flops"]
        entry = {
            "variant": name,
            "harness_variant": variant.describe(),
            "oom": False,
            "peak_alloc_gib": round(peaks[0].item() / 2**30, 3) if cuda else None,
            "peak_reserved_gib": round(peaks[1].item() / 2**30, 3) if cuda else None,
            "step_s_median": step_s,
            "step_s_all": times,
            "tokens_per_s_per_gpu": args.seq / step_s / args.sp,
            "model_tflops_per_gpu": model_flops / step_s / args.sp / 1e12,
            "mean_keep_ratio": sum(keep) / len(keep),
            "keep_ratio_per_layer": keep,
            "loss": step.last_loss,
        }
        record["results"].append(entry)
        if out is not None:
            out.data["results"] = record["results"]
            out.write()
            print("SP_BENCH " + json.dumps({k: entry[k] for k in ("variant", "peak_alloc_gib", "step_s_median",
                                                                   "tokens_per_s_per_gpu", "mean_keep_ratio")}),
                  flush=True)  # fmt: skip
        deactivate(bench)
    if out is not None:
        out.finish()
        print(f"SP_BENCH_FILE {out.path}", flush=True)
    dist.destroy_process_group()
    return 0


# ---- max context (parent: never touches the GPU) ----------------------------------------------------------------


def _launch_command(args: argparse.Namespace, seq: int, gpus: list[str], out: str, port: int) -> list[str]:
    script = str(Path(__file__).resolve())
    common = ["--sp", str(args.sp), "--seq", str(seq), "--variant", args.variant, "--shape", args.shape, "--out", out,
              "--lora-r", str(args.lora_r), "--keep-ratio", str(args.keep_ratio), "--memory-probe"]  # fmt: skip
    if args.dtype:
        common += ["--dtype", args.dtype]
    if args.sp == 1:
        return [sys.executable, script, *common]
    launcher = os.environ.get("DEEPSPEED_LAUNCHER") or "deepspeed"
    include = ["--include", "localhost:" + ",".join(gpus)] if gpus else ["--num_gpus", str(args.sp)]
    return [launcher, *include, "--master_port", str(port), script, *common]


def maxctx(args: argparse.Namespace) -> int:
    seqs = sorted(int(s) for s in args.seqs.split(",") if s)
    if not seqs:
        raise SystemExit("--maxctx needs --seqs")
    if "," in args.variant:
        raise SystemExit("--maxctx probes one variant at a time")
    visible = args.gpus.split(",") if args.gpus else _visible_gpus()
    slots = [visible[i : i + args.sp] for i in range(0, len(visible) - args.sp + 1, args.sp)] if visible else [[]]
    out = results.ResultFile(args.out, f"sp-maxctx-{args.variant}-sp{args.sp}", {
        "environment": results.environment(include_device=False), "command": results.command_line(),
        "commit": results.git_state().get("commit") or os.environ.get("LEMO_BENCH_GIT_COMMIT"),
        "settings": {"sp": args.sp, "variant": args.variant, "shape": args.shape, "seqs": seqs, "gpus": visible,
                     "probe": "memory probe: one step, attention kernels skipped but in the last layer"},
        "probes": [], "max_fit": None, "min_fail": None})  # fmt: skip
    started = time.perf_counter()
    pending, running = list(seqs), []
    while pending or running:
        free = [slot for slot in slots if all(slot is not r["slot"] for r in running)]
        budget_over = args.budget_s and time.perf_counter() - started > args.budget_s
        # Skip lengths that cannot change the answer: longer than a failure, or shorter than a fit.
        fail, fit = out.data["min_fail"], out.data["max_fit"]
        pending = [s for s in pending if (fail is None or s < fail) and (fit is None or s > fit)]
        while free and pending and not budget_over:
            seq, slot = pending.pop(0), free.pop(0)
            folder = tempfile.mkdtemp(prefix=f"sp-probe-{seq}-")
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            if args.sp == 1 and slot:
                env["CUDA_VISIBLE_DEVICES"] = slot[0]
            command = _launch_command(args, seq, slot if args.sp > 1 else [], folder, launch_env.free_port())
            log = open(Path(folder) / "log.txt", "w")  # noqa: SIM115 - closed when the probe ends
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            running.append({"seq": seq, "slot": slot, "process": process, "folder": folder, "log": log,
                            "started": time.perf_counter(), "command": command})  # fmt: skip
            print(f"probe {seq} on GPUs {slot or 'default'}", flush=True)
        if not running:
            break
        time.sleep(2)
        for probe in list(running):
            elapsed = time.perf_counter() - probe["started"]
            code = probe["process"].poll()
            if code is None and elapsed < args.probe_timeout:
                continue
            if code is None:
                os.killpg(probe["process"].pid, 9)
                probe["process"].wait()
            probe["log"].close()
            running.remove(probe)
            outcome = _probe_outcome(probe, code, elapsed)
            shutil.rmtree(probe["folder"], ignore_errors=True)  # the outcome holds its result and its log's tail
            out.data["probes"].append(outcome)
            if outcome["fits"]:
                out.data["max_fit"] = max(out.data["max_fit"] or 0, probe["seq"])
            elif outcome["status"] in ("oom", "timeout"):
                fail = out.data["min_fail"]
                out.data["min_fail"] = probe["seq"] if fail is None else min(fail, probe["seq"])
            out.write()
            peak = outcome["peak_alloc_gib"]
            note = f", peak {peak} GiB" if peak else ""
            print(f"probe {probe['seq']}: {outcome['status']} ({elapsed:.0f} s){note}", flush=True)
    out.data["complete"] = not pending
    out.finish()
    print(f"SP_MAXCTX max_fit={out.data['max_fit']} min_fail={out.data['min_fail']} file={out.path}", flush=True)
    return 0


def _probe_outcome(probe: dict, code: int | None, elapsed: float) -> dict[str, Any]:
    folder = Path(probe["folder"])
    files = sorted(folder.glob("*.json"))
    data = [json.loads(f.read_text()) for f in files]
    complete = [d for d in data if d.get("status") == "complete" and d.get("results")]
    oom = any(d.get("status") == "oom" for d in data)
    log_tail = (folder / "log.txt").read_text(errors="replace")[-2000:]
    if code is None:
        status = "timeout"
    elif complete and code == 0:
        status = "fit"
    elif oom or "out of memory" in log_tail.lower():
        status = "oom"
    else:
        status = "crash"
    result = complete[0]["results"][0] if complete else {}
    return {"seq": probe["seq"], "status": status, "fits": status == "fit", "exit_code": code,
            "seconds": round(elapsed, 1), "peak_alloc_gib": result.get("peak_alloc_gib"),
            "peak_reserved_gib": result.get("peak_reserved_gib"), "gpus": probe["slot"],
            "command": " ".join(probe["command"]), "log_tail": None if status == "fit" else log_tail}  # fmt: skip


def _visible_gpus() -> list[str]:
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return os.environ["CUDA_VISIBLE_DEVICES"].split(",")
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return maxctx(args) if args.maxctx else measure(args)


if __name__ == "__main__":
    sys.exit(main())
