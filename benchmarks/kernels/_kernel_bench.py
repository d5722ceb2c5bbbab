"""What every kernel benchmark in this folder shares: the checkout root, the kernels module, git facts, the
environment record, the command line's common options, the timing of one call, the loop over sequence lengths, the
JSON file and the steps of main around a bench's own ``bench_seqlen``; for the row-copy ops timed per mode and
backend (gather_rows, write_back_rows), also the kept rows, the records and the table.

The scripts run as ``python benchmarks/kernels/bench_<op>.py`` (this folder is then first on sys.path)."""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
QUANTILES = [0.5, 0.2, 0.8]  # do_bench's median, 20th and 80th percentiles, in the order it returns them
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # --dtype's choices
# How the notes open: what measure's fields mean (run_benchmark), then time_backends' (run_mode_benchmark).
MEASURE_NOTES = (
    "ms from triton.testing.do_bench (L2 flushed between calls); peak_above_inputs_mib: "
    "max_memory_allocated during one call minus memory_allocated before it; "
)
MODE_NOTES = (
    "host_us_per_call: CPU time to issue one call (no sync), the floor of ms_median when the GPU work is shorter; "
    "model_bytes: least bytes read + written; "
)


def import_kernels():
    """lemo_ds.kernels of the installed (or PYTHONPATH) lemo_ds: the kernels import lemo_ds's own modules, so there
    is no stand-alone copy to fall back to."""
    return importlib.import_module("lemo_ds.kernels")


def git(*args: str) -> str | None:
    """Output of ``git ARGS`` in the checkout, or None without git or outside a repository."""
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(kernels, capability: bool = False, fields: Sequence[str] | None = None) -> dict:
    """Where and with what the benchmark ran (GPU 0, versions, git commit, exact command). ``capability`` adds
    the GPU's compute capability; ``fields`` keeps only those keys, in that order (a bench's shorter record)."""
    import triton

    props = torch.cuda.get_device_properties(0)
    env = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0),
        "gpu_count": torch.cuda.device_count(),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "gpu_sm_count": props.multi_processor_count,
    }
    if capability:
        env["gpu_capability"] = list(torch.cuda.get_device_capability(0))
    env.update(
        {
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "triton": triton.__version__,
            "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "command": shlex.join([sys.executable, *sys.argv]),
            "cwd": os.getcwd(),
            "kernels_module": kernels.__file__,
            "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
    )
    return env if fields is None else {key: env[key] for key in fields}


def measure(fn, warmup: int, rep: int, grad_to_none=None, host_calls: int = 50, brief: bool = False) -> dict:
    """do_bench quantiles (ms); the host (CPU) time of one call, launches only, no sync: where it exceeds the GPU
    time the op is launch-bound in isolation (in a training step the CPU runs ahead and hides it); then the peak
    memory of one more call above what was allocated before it. ``grad_to_none``: tensors whose .grad is reset
    between calls. ``brief``: the quantiles and the peak above the inputs only, no host timing."""
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, quantiles=QUANTILES)
    record = {"ms_median": median, "ms_p20": p20, "ms_p80": p80}
    if not brief:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(host_calls):
            fn()
            for t in grad_to_none or []:
                t.grad = None
        record["host_us_per_call"] = (time.perf_counter() - start) / host_calls * 1e6
        for t in grad_to_none or []:
            t.grad = None
    torch.cuda.synchronize()
    if not brief:
        torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    for t in grad_to_none or []:
        t.grad = None
    if not brief:
        record["peak_alloc_mib"] = peak / 2**20
    record["peak_above_inputs_mib"] = (peak - before) / 2**20
    return record


def write_json(path_arg: str, payload: dict, op: str) -> Path:
    """Write ``payload`` to ``path_arg``: a .json file, or a directory to write kernels_<op>.json into."""
    path = Path(path_arg)
    if path.suffix != ".json":  # a directory
        path = path / f"kernels_{op}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def bench_parser(op: str, doc: str, seqlens: Sequence[int]) -> argparse.ArgumentParser:
    """The options every bench starts with: ``--out`` and ``--seqlens`` (default ``seqlens``); the description is
    the first paragraph of the bench's ``doc``. The bench adds its own, then parses with ``parse_bench_args``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    default_out = REPO / "benchmarks" / "results" / f"kernels_{op}.json"
    p.add_argument("--out", default=str(default_out), help=f"JSON file, or a directory to write kernels_{op}.json into")
    p.add_argument("--seqlens", type=int, nargs="+", default=list(seqlens))
    return p


def add_attention_args(p: argparse.ArgumentParser) -> None:
    """``--heads``, ``--kv-heads`` and ``--head-dim``: the attention's shape, Llama-3-8B's by default."""
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)


def parse_bench_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Add the options every bench ends with (do_bench's times, the seed) to ``p``, then parse ``argv``."""
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up time, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def parse_kept_rows_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parse_bench_args for the row-copy benches (gather_rows, write_back_rows), after the options they share
    beyond their widths: which rows are kept (``--keep``, ``--block``: kept_index's, LeMo's 40% of 64-token blocks by
    default), ``--batch`` and ``--dtype``."""
    p.add_argument("--keep", type=float, default=0.4, help="share of blocks kept")
    p.add_argument("--block", type=int, default=64, help="tokens per kept block")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    return parse_bench_args(p, argv)


def require_cuda(message: str) -> None:
    """Exit with ``message`` where no CUDA GPU is available: the benches time kernels on the device."""
    if not torch.cuda.is_available():
        sys.exit(message)


def kept_index(b: int, s: int, keep: float, block: int, gen: torch.Generator) -> torch.Tensor:
    """[b, k] int64 on CUDA: whole blocks of `block` tokens, round(keep * blocks) of them per sample, ascending."""
    n_blocks = -(-s // block)
    n_keep = max(1, round(keep * n_blocks))
    rows = []
    for _ in range(b):
        blocks = torch.randperm(n_blocks, generator=gen)[:n_keep].sort().values  # [n_keep]
        tokens = (blocks[:, None] * block + torch.arange(block)).flatten()  # [n_keep * block]
        rows.append(tokens[tokens < s])
    k = min(len(r) for r in rows)  # a short last block can make samples differ by a few tokens
    return torch.stack([r[:k] for r in rows]).cuda()


def time_backends(op: str, kernel, reference, modes_of, shape: dict, args: argparse.Namespace) -> list[dict]:
    """Time an op's modes under its Triton kernel, then under its torch reference. ``modes_of(call)``: the
    (mode, fn, tensors whose .grad to reset, model_bytes) to time, ``call`` being ``kernel`` with backend="triton"
    or ``reference``. A record per (backend, mode): measure's, then op, mode, backend, ``shape``'s entries (s among
    them), dtype, model_bytes and the bandwidth at the median; a progress line each."""
    results = []
    for backend, call in (("triton", functools.partial(kernel, backend="triton")), ("torch", reference)):
        modes = modes_of(call)
        width = max(len(mode) for mode, *_ in modes)
        for mode, fn, grads, nbytes in modes:
            record = measure(fn, args.warmup, args.rep, grad_to_none=grads)
            record.update(
                {"op": op, "mode": mode, "backend": backend, **shape, "dtype": args.dtype, "model_bytes": nbytes}
            )
            record["gbps_at_median"] = nbytes / (record["ms_median"] * 1e-3) / 1e9
            results.append(record)
            print(f"  s={shape['s']:>7} {mode:<{width}} {backend:<6} {record['ms_median']:.4f} ms", flush=True)
    return results


def print_rows(header: str, rows: Sequence[str]) -> None:
    """A table: its header, a rule as wide, then its rows."""
    print(header)
    print("-" * len(header))
    for row in rows:
        print(row)


def print_mode_table(results: list[dict]) -> None:
    """time_backends' records, a row each, with the speed-up over the torch reference at the same (s, mode)."""
    width = max(len("mode"), *(len(r["mode"]) for r in results))
    by_key = {(r["s"], r["mode"], r["backend"]): r for r in results}
    header = (
        f"{'s':>7} {'k':>7} {'mode':<{width}} {'backend':<7} {'median ms':>10} {'p20':>8} {'p80':>8} {'GB/s':>7} "
        f"{'peak+MiB':>9} {'host us':>8} {'vs torch':>8}"
    )
    print_rows(header, [mode_row(r, by_key[(r["s"], r["mode"], "torch")], width) for r in results])


def mode_row(r: dict, ref: dict, width: int) -> str:
    """One of time_backends' records as a row of print_mode_table (modes ``width`` wide); ``ref``: the torch
    reference's record at the same (s, mode)."""
    speedup = ref["ms_median"] / r["ms_median"]
    return (
        f"{r['s']:>7} {r['k']:>7} {r['mode']:<{width}} {r['backend']:<7} {r['ms_median']:>10.4f} "
        f"{r['ms_p20']:>8.4f} {r['ms_p80']:>8.4f} {r['gbps_at_median']:>7.0f} {r['peak_above_inputs_mib']:>9.1f} "
        f"{r['host_us_per_call']:>8.1f} {speedup:>7.2f}x"
    )


def time_seqlens(seqlens: Sequence[int], bench) -> list[dict]:
    """``bench(s)``'s records for each sequence length in turn, the CUDA cache emptied after each."""
    results = []
    for s in seqlens:
        results.extend(bench(s))
        torch.cuda.empty_cache()
    return results


def run_benchmark(
    op: str,
    args: argparse.Namespace,
    bench,
    notes: str,
    table,
    *,
    timed: str = "the Triton kernels",
    capability: bool = False,
    target: str | None = None,
) -> None:
    """A bench's main once its arguments are parsed: exit without a CUDA GPU (the message says it times ``timed``),
    print the environment (``capability``: with the GPU's compute capability), time ``bench(kernels, s)`` at each of
    ``args.seqlens``, write the JSON file (op, environment, config, quantiles, ``target`` where given, notes: ``notes``
    after MEASURE_NOTES, results) and print ``table(results)`` last."""
    require_cuda(f"bench_{op}: needs a CUDA GPU (it times {timed} on the device); none is available here")
    kernels = import_kernels()
    env = environment(kernels, capability=capability)
    print(f"bench_{op}: {env['gpu']}, torch {env['torch']}, triton {env['triton']}", flush=True)
    results = time_seqlens(args.seqlens, lambda s: bench(kernels, s))
    payload = {"op": op, "environment": env, "config": vars(args), "quantiles": QUANTILES}
    if target is not None:
        payload["target"] = target
    payload.update({"notes": MEASURE_NOTES + notes, "results": results})
    path = write_json(args.out, payload, op)
    print(f"\nwrote {path}\n")
    table(results)


def run_mode_benchmark(op: str, args: argparse.Namespace, bench_seqlen, notes: str) -> None:
    """run_benchmark for an op timed per mode and backend: ``bench_seqlen(kernels, args, s, gen)`` returns
    time_backends' records, ``gen`` being one CPU generator, seeded with ``--seed``, for all the lengths in turn;
    ``notes`` (what the modes mean) follow MODE_NOTES."""
    gen = torch.Generator().manual_seed(args.seed)
    run_benchmark(
        op, args, lambda kernels, s: bench_seqlen(kernels, args, s, gen), MODE_NOTES + notes, print_mode_table
    )
