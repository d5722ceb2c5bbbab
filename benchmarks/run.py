"""Benchmark entry point: peak memory, step time, tokens/s and MFU of the compared variants, per suite.

    python benchmarks/run.py --suite smoke --out /tmp/bench                   # CPU: a tiny Llama, every variant

On the GPU machine (repository root; wheels in .whl/ as benchmarks/device_env.sh expects; the copied tree has
no .git, so pass the commit in LEMO_BENCH_GIT_COMMIT; only $OUT comes back, so write there):

    . benchmarks/device_env.sh && export LEMO_BENCH_GIT_COMMIT=<sha>
    python benchmarks/run.py --suite foundation --out $OUT
    python benchmarks/run.py --suite paper --out $OUT
    python benchmarks/run.py --suite long --seq 32768,65536 --out $OUT   # and --seq 131072 in a second command
    python benchmarks/run.py --suite maxctx --variant dense+ckpt+chunked-loss --out $OUT  # --resume <json> if cut

Options: ``--out DIR`` (default benchmarks/results), ``--steps N`` / ``--warmup N`` (override the suite's),
``--seq 4096,8192`` and ``--variant dense,lemo-norm`` (run part of a suite), ``--documents N`` (packed rows of N
documents instead of the suite's), ``--mem-cap-gib X`` (a real memory
limit, see harness.measure.MemoryCap), ``--chunked-loss-impl auto|liger|torch``, ``--no-report``.

For each model shape of the suite the model is built once (random init, directly on the device, bf16, LoRA r=8
on q/k/v/o, SDPA); each sequence length is a configuration in which every variant gets a warm-up step, then the
variants are measured alternately (A, B, C, A, B, C, ...). A variant that runs out of memory is recorded with
``"oom": true`` and skipped at the longer sequences of that shape (``oom_inferred_from_seq``). The JSON result
(<out>/<suite>-<timestamp>.json) is rewritten after every round; a Markdown report and PNG plots are written
next to it at the end (benchmarks/report.py), and the Markdown table is printed last.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.harness import flops as flops_mod  # noqa: E402
from benchmarks.harness import losses, results  # noqa: E402
from benchmarks.harness.measure import MemoryCap, TrainingStep, is_oom, measure_configuration, summarize  # noqa: E402
from benchmarks.harness.model import DTYPES, build_model, random_batch  # noqa: E402
from benchmarks.harness.shapes import get_shape  # noqa: E402
from benchmarks.harness.suites import SUITES, Config, Suite, get_suite  # noqa: E402
from benchmarks.harness.variants import Variant, parse_lemo_overrides, with_lemo_overrides  # noqa: E402


def log(message: str) -> None:
    print(message, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", required=True, choices=sorted(SUITES))
    parser.add_argument("--out", default=str(results.DEFAULT_RESULTS_DIR), help="results folder")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per variant (suite default)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (suite default)")
    parser.add_argument("--seq", default=None, help="comma-separated sequence lengths to run (default: all)")
    parser.add_argument("--variant", default=None, help="comma-separated variant names to run (default: all)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="model dtype (suite default)")
    parser.add_argument("--lora-adapters", default="fp32", choices=("fp32", "model"),
                        help="LoRA adapter dtype: fp32 (peft's default on a bf16 model) or the model dtype")
    parser.add_argument("--mem-cap-gib", type=float, default=None, help="real memory cap around each step")
    parser.add_argument("--chunked-loss-impl", default="auto", choices=losses.LOSS_IMPLS)
    parser.add_argument("--chunk-tokens", type=int, default=1024, help="chunk of the PyTorch chunked loss")
    parser.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (default: by GPU name)")
    parser.add_argument("--no-infer-oom", action="store_true", help="run longer sequences after an OOM too")
    parser.add_argument("--lemo-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of every lemo variant's section (value parsed as JSON), e.g. "
                             "kernels=\"torch\" or inplace_writeback=false; repeatable")
    parser.add_argument("--documents", type=int, default=None,
                        help="documents per row for every configuration (default: the suite's; 1: one document, "
                             "more: packed rows with position ids restarting at each document)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-report", action="store_true", help="skip the Markdown/PNG report")
    # maxctx suites (see benchmarks/maxctx.py)
    parser.add_argument("--probe-timeout", type=float, default=540.0, help="maxctx: seconds per probe")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="maxctx: stop starting probes after this many seconds (0: no limit)")
    parser.add_argument("--resume", default=None, help="maxctx: a previous maxctx JSON whose probes count")
    parser.add_argument("--max-seq", type=int, default=1024 * 1024, help="maxctx: stop growing past this")
    return parser.parse_args(argv)


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [item.strip() for item in value.split(",") if item.strip()]


def select(suite: Suite, args: argparse.Namespace) -> tuple[list[Config], list[Variant]]:
    seqs = _csv(args.seq)
    names = _csv(args.variant)
    configs = [c for c in suite.configs if seqs is None or str(c.seq) in seqs]
    variants = [v for v in suite.variants if names is None or v.name in names]
    overrides = parse_lemo_overrides(args.lemo_set)
    variants = [with_lemo_overrides(v, overrides) for v in variants]
    if names is not None and len(variants) != len(names):
        unknown = set(names) - {v.name for v in suite.variants}
        raise SystemExit(f"--variant: {sorted(unknown)} not in suite {suite.name}: {[v.name for v in suite.variants]}")
    if not configs or not variants:
        raise SystemExit(f"nothing to run: configurations {[c.seq for c in configs]}, variants {len(variants)}")
    return configs, variants


def resolve_device(suite: Suite, requested: str | None) -> torch.device:
    if requested is not None:
        device = torch.device(requested)
    else:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
        return torch.device("cuda", torch.cuda.current_device())
    if suite.needs_cuda:
        raise SystemExit(f"suite {suite.name!r} needs a CUDA GPU (full-size models); on CPU run --suite smoke")
    return device


def notes(device: torch.device) -> dict[str, str]:
    return {
        "data": "random token ids (uniform over the vocab, fixed seed), labels = input_ids, batch of 1 sequence; "
                "memory and time do not depend on the values",
        "model": "transformers LlamaConfig with the real dimensions, random init (HF init) built directly on the "
                 "device; LoRA via peft get_peft_model defaults (adapters in float32), SDPA attention",
        "step": "timed step = forward + loss + backward + torch.optim.AdamW step over the LoRA parameters + "
                "zero_grad; median and p20/p80 over the measured steps",
        "alternation": "every variant gets its warm-up step(s), then measured steps alternate A, B, C, A, B, C",
        "checkpointing": "HF gradient_checkpointing_enable(use_reentrant=False); the embedding output requires grad "
                         "only while checkpointing is on (peft + checkpointing), so other variants are plain LoRA",
        "chunked_loss": "hidden states from the whole model called with logits_to_keep=1 (one logits row), then "
                        "the chunked linear cross-entropy (liger-flce on GPU, torch-chunked-ce otherwise); "
                        "chunked_loss_check compares it with HF's loss on the same weights",
        "memory": "peak_allocated_gib: max over measured steps of torch.cuda.max_memory_allocated after "
                  "reset_peak_memory_stats; peak_reserved_gib: max_memory_reserved on the variant's first step "
                  "after torch.cuda.empty_cache() (clean cache); GiB = 2**30 bytes"
                  if device.type == "cuda" else "not measured on CPU (null)",
        "keep_ratio": "lemo_ds controller stats() since reset_stats() before each step: share of tokens each "
                      "layer processed; 1.0 per layer for dense variants",
        "flops_formula": flops_mod.__doc__.strip(),
    }


def run_measure_suite(suite: Suite, args: argparse.Namespace) -> int:
    configs, variants = select(suite, args)
    device = resolve_device(suite, args.device)
    dtype = DTYPES[args.dtype or suite.dtype]
    env = results.environment()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else flops_mod.peak_flops_for(env.get("gpu_name"))
    chunked_impl = losses.resolve_chunked_impl(args.chunked_loss_impl, device)
    cap = MemoryCap(args.mem_cap_gib, device)
    out = results.ResultFile(args.out, suite.name, {
        "kind": "measure",
        "description": suite.description,
        "command": results.command_line(),
        "environment": env,
        "settings": {
            "device": str(device), "dtype": str(dtype).removeprefix("torch."), "seed": args.seed,
            "warmup": args.warmup if args.warmup is not None else suite.warmup,
            "steps": args.steps if args.steps is not None else suite.steps,
            "chunked_loss_impl": chunked_impl, "chunk_tokens": args.chunk_tokens,
            "peak_flops": peak, "peak_flops_note": "H200 dense BF16 peak 989e12 FLOP/s (by GPU name)",
            "memory_cap": cap.describe(), "lemo_overrides": parse_lemo_overrides(args.lemo_set),
            "variants": [v.describe() for v in variants],
        },
        "notes": notes(device),
        "configurations": [],
    })
    log(f"suite {suite.name}: {len(configs)} configuration(s) x {len(variants)} variant(s) on {device}; "
        f"results -> {out.path}")
    errors = 0
    shapes = list(dict.fromkeys(c.shape for c in configs))
    for shape_name in shapes:
        shape = get_shape(shape_name)
        shape_configs = sorted((c for c in configs if c.shape == shape_name), key=lambda c: c.seq)
        first_oom: dict[str, int] = {}
        log(f"building {shape_name} (max {shape_configs[-1].seq} tokens) ...")
        try:
            bench = build_model(shape, shape_configs[-1].seq, device, dtype, seed=args.seed,
                                lora_adapters=args.lora_adapters)
        except Exception as exc:  # noqa: BLE001 - an OOM while building is a result too
            if not is_oom(exc):
                raise
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            log(f"  model build out of memory: {message}")
            for config in shape_configs:
                out.data["configurations"].append({"shape": shape_name, "seq": config.seq, "build_oom": message,
                                                   "variants": []})
            out.write()
            continue
        log(f"  built in {bench.build_s:.1f} s: {bench.info['params_total'] / 1e9:.2f} B parameters, "
            f"{bench.info['params_trainable'] / 1e6:.2f} M trainable")
        if any(v.loss == "chunked" for v in variants):
            check_ids = random_batch(shape.vocab, min(2048, shape_configs[0].seq), device, seed=args.seed + 1).input_ids
            bench.info["chunked_loss_check"] = check = losses.check_chunked_loss(
                bench.model, bench.decoder, bench.lm_head_weight, check_ids, chunked_impl)
            log(f"  chunked loss check ({chunked_impl}, {check['seq']} tokens): HF {check['hf_loss']:.6f}, "
                f"chunked {check['chunked_loss']:.6f}")
            del check_ids
        for config in shape_configs:
            errors += run_configuration(suite, config, bench, variants, args, out, peak, chunked_impl, cap,
                                        first_oom)
        del bench
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out.finish("complete" if not errors else "complete-with-errors")
    report_and_table(out.path, args)
    return 1 if errors else 0


def run_configuration(suite: Suite, config: Config, bench, variants: list[Variant], args: argparse.Namespace,
                      out: results.ResultFile, peak: float | None, chunked_impl: str, cap: MemoryCap,
                      first_oom: dict[str, int]) -> int:
    """Measure every variant at one sequence length on the already built model; returns the error count.
    ``first_oom`` (variant -> shortest sequence that ran out of memory) is read and updated."""
    shape, device = bench.shape, bench.device
    warmup = args.warmup if args.warmup is not None else (config.warmup if config.warmup is not None
                                                           else suite.warmup)
    steps = args.steps if args.steps is not None else (config.steps if config.steps is not None else suite.steps)
    log(f"  {shape.name} @ {config.seq} tokens ({args.documents or config.documents} document(s) per row): "
        f"warm-up {warmup}, steps {steps}")
    documents = args.documents or config.documents
    batch = random_batch(shape.vocab, config.seq, device, seed=args.seed, documents=documents)
    step = TrainingStep(bench, batch, chunked_impl, args.chunk_tokens, cap)
    record = {"shape": shape.name, "shape_dims": shape.describe(), "seq": config.seq, "documents_per_row": documents,
              "batch": 1, "warmup": warmup,
              "steps": steps, "model": bench.info, "complete": False, "variants": []}
    out.data["configurations"].append(record)
    started = time.perf_counter()

    def summaries(runs) -> list[dict]:
        return [summarize(run, shape, config.seq, bench.lora_rank, peak, step.loss_impl(run.variant),
                          step.timer.method, device.type == "cuda") for run in runs.values()]

    def after_round(runs) -> None:
        record["variants"] = summaries(runs)
        out.write()

    runs = measure_configuration(step, step.cleanup, variants, warmup, steps, log=log, after_round=after_round,
                                 inferred_oom={} if args.no_infer_oom else dict(first_oom))
    record["variants"] = summaries(runs)
    record["complete"] = True
    record["wall_s"] = round(time.perf_counter() - started, 2)
    out.write()
    for run in runs.values():
        if run.oom and run.oom_inferred_from_seq is None:
            first_oom.setdefault(run.variant.name, config.seq)
    step.cleanup()  # back to the plain model; nothing of this configuration stays on the device
    return sum(run.error is not None for run in runs.values())


def report_and_table(path: Path, args: argparse.Namespace) -> None:
    if not args.no_report:
        from benchmarks import report

        written = report.write_report([path], Path(args.out))
        log("report: " + ", ".join(str(p) for p in written))
    log(f"\nresults: {path}\n")
    log(results.markdown_table(results.load(path)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    suite = get_suite(args.suite)
    if suite.kind == "maxctx":
        from benchmarks import maxctx

        path, status = maxctx.run_targets(suite, args)
        report_and_table(path, args)
        return status
    return run_measure_suite(suite, args)


if __name__ == "__main__":
    sys.exit(main())
