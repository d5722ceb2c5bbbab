"""Longest context whose training step fits on one GPU, for one variant and one model shape.

    PYTHONUNBUFFERED=1 python benchmarks/maxctx.py --shape llama3-8b --variant dense+ckpt+chunked-loss \\
        --start 229376
    python benchmarks/maxctx.py --resume benchmarks/results/maxctx-20261122-101500.json --budget-s 540
    python benchmarks/run.py --suite maxctx [--variant NAME] [--budget-s S] [--resume FILE]

Search, at a granularity of 4096 tokens: probe ``--start``; while everything fits, grow by x1.25 (rounded up to
the granularity) until a probe fails or ``--max-seq``; then bisect between the longest fitting and the shortest
failing length until they are one granule apart. Every probe is a fresh process (``--probe`` mode: build the
model, run one training step of the variant exactly as benchmarks/run.py does, print one ``MAXCTX_PROBE {json}``
line), so a failed allocation leaves nothing behind; the parent never touches the GPU. A probe that runs out of
memory fails; one that exceeds ``--probe-timeout`` also counts as failing (too slow to train at that length,
flagged ``timeout``); one that crashes otherwise stops the search. ``--budget-s`` (default 540, 0: none) stops starting
probes after that many seconds (a single command on the GPU machine gets at most 10 minutes): the JSON then says
``"complete": false``, and ``--resume FILE`` continues from its probes in a later command. The JSON
(<out>/maxctx-<timestamp>.json) is rewritten after every probe and records every probe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import losses, results  # noqa: E402
from benchmarks.harness.suites import MaxCtxTarget, Suite  # noqa: E402

PROBE_TAG = "MAXCTX_PROBE "
GROWTH = 1.25
DEFAULT_MAX_SEQ = 1024 * 1024


def log(message: str) -> None:
    print(message, flush=True)


# ---- the search ----------------------------------------------------------------------------------------

def next_probe(fit: int, fail: int | None, start: int, granularity: int, max_seq: int) -> int | None:
    """Next length to probe given the longest fitting length ``fit`` (0: none yet) and the shortest failing
    one ``fail`` (None: none yet); None when the search is over."""
    if fit == 0 and fail is None:
        return max(granularity, _round_up(start, granularity))
    if fail is None:  # everything so far fits: grow
        grown = max(fit + granularity, _round_up(int(fit * GROWTH), granularity))
        return grown if grown <= max_seq else None
    if fit == 0:  # nothing fits yet: halve
        if fail <= granularity:
            return None
        return max(granularity, (fail // 2) // granularity * granularity)
    if fail - fit <= granularity:
        return None
    return max(fit + granularity, ((fit + fail) // 2) // granularity * granularity)


def _round_up(value: int, granularity: int) -> int:
    return math.ceil(value / granularity) * granularity


@dataclass
class ProbeSettings:
    dtype: str | None
    chunked_impl: str
    mem_cap_gib: float | None
    timeout_s: float
    seed: int = 0
    lora_adapters: str = "fp32"


def run_probe(shape: str, variant: str, seq: int, settings: ProbeSettings, timeout_s: float,
              documents: int = 1) -> dict[str, Any]:
    """One probe in a fresh process (its own session, killed as a group on timeout)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--probe", "--shape", shape, "--variant", variant,
               "--seq", str(seq), "--chunked-loss-impl", settings.chunked_impl, "--seed", str(settings.seed),
               "--lora-adapters", settings.lora_adapters, "--documents", str(documents)]
    if settings.dtype:
        command += ["--dtype", settings.dtype]
    if settings.mem_cap_gib is not None:
        command += ["--mem-cap-gib", str(settings.mem_cap_gib)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               cwd=results.REPO_ROOT)
    lines: list[str] = []

    def pump() -> None:  # stream the child's progress, keep its lines
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if not line.startswith(PROBE_TAG):
                print(f"      | {line.rstrip()}", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGKILL)  # the probe and whatever it started (e.g. compilers)
        process.wait()
    reader.join(timeout=10)
    wall = round(time.perf_counter() - started, 2)
    reports = [json.loads(line[len(PROBE_TAG):]) for line in lines if line.startswith(PROBE_TAG)]
    if reports:
        return {**reports[-1], "wall_s": wall}
    if timed_out:
        return {"seq": seq, "outcome": "timeout", "wall_s": wall, "timeout_s": round(timeout_s, 1)}
    return {"seq": seq, "outcome": "error", "wall_s": wall, "returncode": process.returncode,
            "error": "\n".join(lines[-30:])}


# A probe runner: (length, seconds it may take) -> the probe's record, with "seq", "outcome" (fit / oom / timeout /
# error), "wall_s" and whatever else it measured ("peak_allocated_gib", a step time). The searches of this file
# (run_probe: a harness model) and of benchmarks/product_path.py --maxctx (the main job itself) differ only there.
ProbeRunner = Callable[[int, float], dict[str, Any]]


def search(record: dict[str, Any], runner: ProbeRunner, probe_timeout_s: float, deadline: float | None,
           on_probe: Callable[[dict[str, Any]], None], name: str) -> dict[str, Any]:
    """Run probes until the bounds meet (or the deadline). ``record`` names the search and holds its "start",
    "granularity", "max_seq" and "probes" (earlier ones, on resume; the new ones are appended); it is returned
    completed, and handed to ``on_probe`` after every probe. ``name`` is the search's name in the log."""
    probes = record["probes"]
    start, granularity, max_seq = record["start"], record["granularity"], record["max_seq"]

    def bounds() -> tuple[int, int | None]:
        fits = [p["seq"] for p in probes if p["outcome"] == "fit"]
        fails = [p["seq"] for p in probes if p["outcome"] in ("oom", "timeout")]
        return max(fits, default=0), min(fails, default=None)

    stop_reason = None
    while True:
        fit, fail = bounds()
        record.update(max_fit_seq=fit or None, min_fail_seq=fail)
        if any(p["outcome"] == "error" for p in probes):
            stop_reason = "a probe crashed (not out of memory); see its error"
            break
        seq = next_probe(fit, fail, start, granularity, max_seq)
        if seq is None:
            stop_reason = "bounds met" if fail is not None or fit == 0 else f"reached --max-seq {max_seq}"
            break
        remaining = None if deadline is None else deadline - time.perf_counter()
        if remaining is not None and remaining < 30:
            stop_reason = "budget spent"
            break
        timeout = probe_timeout_s if remaining is None else min(probe_timeout_s, remaining)
        log(f"  probe {name} @ {seq} tokens (fit {fit or '-'}, fail {fail or '-'}, timeout {timeout:.0f} s)")
        probe = runner(seq, timeout)
        if probe["outcome"] == "timeout" and timeout < probe_timeout_s:
            probe["outcome"] = "budget"  # cut by the budget, not by the per-probe limit: says nothing
        probes.append(probe)
        log(f"    -> {probe['outcome']} in {probe['wall_s']} s"
            + (f", peak {probe['peak_allocated_gib']} GiB" if probe.get("peak_allocated_gib") else "")
            + (f", {probe['s_per_step']:.2f} s/step" if probe.get("s_per_step") else ""))
        on_probe(record)
    record["complete"] = stop_reason == "bounds met" or stop_reason.startswith("reached")
    record["non_monotonic"] = bool(record["min_fail_seq"] and record["max_fit_seq"]
                                   and record["min_fail_seq"] < record["max_fit_seq"])
    record["stop_reason"] = stop_reason
    record["notes"] = ("fit: the training step completed; oom: out of memory; timeout: slower than the per-probe "
                       "limit, counted as failing; budget: cut by --budget-s, not counted")
    on_probe(record)
    return record


def earlier_probes(previous: dict[str, Any] | None, same: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """The probes of the first search of an earlier result (``previous``, None: none) that ``same`` accepts, marked
    ``resumed``. Probes cut by the budget said nothing, and a crashed one is worth a retry: both are probed again."""
    if previous is None:
        return []
    for search_record in previous.get("searches", []):
        if same(search_record):
            return [dict(p, resumed=True) for p in search_record.get("probes", [])
                    if p["outcome"] not in ("budget", "error")]
    return []


def run_targets(suite: Suite | None, args: argparse.Namespace, targets: list[MaxCtxTarget] | None = None):
    """Run the searches of a maxctx suite (or ``targets``); returns (result path, exit status)."""
    targets = list(targets if targets is not None else suite.maxctx)
    if getattr(args, "documents", None):
        targets = [dataclasses.replace(t, documents=args.documents) for t in targets]
    names = None if not getattr(args, "variant", None) else [n.strip() for n in args.variant.split(",")]
    if names is not None:
        targets = [t for t in targets if t.variant in names]
        if not targets:
            raise SystemExit(f"--variant {args.variant}: not a search of this suite")
    previous = results.load(args.resume) if args.resume else None
    dtype = args.dtype or (suite.dtype if suite is not None else None)
    # The parent does not touch the GPU (each probe needs all of it), so it cannot see whether liger-kernel
    # runs there; the probe resolves "auto" itself and records the implementation it used.
    settings = ProbeSettings(dtype, args.chunked_loss_impl, args.mem_cap_gib, args.probe_timeout, args.seed,
                             args.lora_adapters)
    name = suite.name if suite is not None else "maxctx"
    out = results.ResultFile(args.out, name, {
        "kind": "maxctx",
        "description": suite.description if suite is not None else "longest-context search",
        "command": results.command_line(),
        "environment": results.environment(include_device=False),
        "settings": {"dtype": dtype, "chunked_loss_impl": args.chunked_loss_impl, "seed": args.seed,
                     "lora_adapters": args.lora_adapters,
                     "mem_cap_gib": args.mem_cap_gib, "probe_timeout_s": args.probe_timeout,
                     "budget_s": args.budget_s, "growth": GROWTH,
                     "resumed_from": str(args.resume) if args.resume else None},
        "notes": {"probe": "one training step (forward + loss + backward + AdamW step over the LoRA parameters) "
                           "of the variant in a fresh process, random token ids, batch 1; see benchmarks/run.py"},
        "searches": [],
    })
    deadline = time.perf_counter() + args.budget_s if args.budget_s else None
    status = 0
    for target in targets:
        max_seq = target.max_seq or args.max_seq
        earlier = _earlier_probes(previous, target)
        log(f"maxctx {target.shape} / {target.variant}: start {target.start}, granularity {target.granularity}"
            + (f", {len(earlier)} earlier probe(s)" if earlier else ""))
        out.data["searches"].append({})
        index = len(out.data["searches"]) - 1

        def on_probe(record: dict[str, Any], index: int = index) -> None:
            out.data["searches"][index] = record
            if "device" not in out.data:
                devices = [p["device"] for p in record["probes"] if p.get("device")]
                if devices:
                    out.data["device"] = devices[0]
            out.write()

        record = {"shape": target.shape, "variant": target.variant, "start": target.start,
                  "granularity": target.granularity, "max_seq": max_seq, "documents_per_row": target.documents,
                  "probes": earlier}

        def runner(seq: int, timeout_s: float, target: MaxCtxTarget = target) -> dict[str, Any]:
            return run_probe(target.shape, target.variant, seq, settings, timeout_s, target.documents)

        record = search(record, runner, settings.timeout_s, deadline, on_probe, target.variant)
        status |= 0 if record["complete"] else 3
        log(f"  {target.variant}: longest fitting {record['max_fit_seq']}, shortest failing "
            f"{record['min_fail_seq']} ({record['stop_reason']})")
    out.finish("complete" if status == 0 else "incomplete")
    return out.path, status


def _earlier_probes(previous: dict[str, Any] | None, target: MaxCtxTarget) -> list[dict[str, Any]]:
    return earlier_probes(previous, lambda s: (s.get("shape"), s.get("variant"), s.get("documents_per_row", 1)) == (
        target.shape, target.variant, target.documents))


# ---- one probe (child process) -------------------------------------------------------------------------

def probe_main(args: argparse.Namespace) -> int:
    """Build the model, run one step of the variant at ``--seq`` tokens, print one MAXCTX_PROBE line."""
    import torch

    from benchmarks.harness.measure import GIB, MemoryCap, TrainingStep, is_oom
    from benchmarks.harness.model import DTYPES, build_model, random_batch
    from benchmarks.harness.shapes import get_shape
    from benchmarks.harness.variants import get_variant

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    shape, variant = get_shape(args.shape), get_variant(args.variant)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    chunked_impl = losses.resolve_chunked_impl(args.chunked_loss_impl, device)
    report: dict[str, Any] = {"seq": args.seq, "documents_per_row": args.documents or 1,
                              "device": results.device_info(),
                              "loss_impl": TrainingStep.LOSS_IMPL_NAMES[variant.loss, chunked_impl]}
    try:
        bench = build_model(shape, args.seq, device, dtype, seed=args.seed, lora_adapters=args.lora_adapters)
        batch = random_batch(shape.vocab, args.seq, device, seed=args.seed, documents=args.documents or 1)
        step = TrainingStep(bench, batch, chunked_impl, cap=MemoryCap(args.mem_cap_gib, device))
        outcome = step(variant, clean_cache=True)
        report.update(outcome="fit", step_s=round(outcome.seconds, 3), loss=outcome.loss,
                      mean_keep_ratio=sum(outcome.keep_ratio_per_layer) / len(outcome.keep_ratio_per_layer))
        if outcome.peak_allocated is not None:
            report.update(peak_allocated_gib=round(outcome.peak_allocated / GIB, 3),
                          peak_reserved_gib=round(outcome.peak_reserved / GIB, 3))
    except Exception as exc:  # noqa: BLE001 - the outcome is the result
        first_line = (str(exc).strip().splitlines() or [""])[0][:400]
        report.update(outcome="oom" if is_oom(exc) else "error", error=f"{type(exc).__name__}: {first_line}")
        if not is_oom(exc):
            import traceback

            traceback.print_exc()
    print(PROBE_TAG + json.dumps(report), flush=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--variant", default=None, help="the variant searched (default: the resumed file's)")
    parser.add_argument("--start", type=int, default=224 * 1024, help="first length probed")
    parser.add_argument("--granularity", type=int, default=4096)
    parser.add_argument("--max-seq", type=int, default=DEFAULT_MAX_SEQ, help="stop growing past this length")
    parser.add_argument("--probe-timeout", type=float, default=540.0, help="seconds per probe")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="stop starting probes after this many seconds (0: no limit)")
    parser.add_argument("--resume", default=None, help="earlier maxctx JSON whose probes count")
    parser.add_argument("--out", default=str(results.DEFAULT_RESULTS_DIR))
    parser.add_argument("--dtype", default=None, help="bf16 (GPU default) / fp32 (CPU default)")
    parser.add_argument("--mem-cap-gib", type=float, default=None, help="real memory cap (see MemoryCap)")
    parser.add_argument("--lora-adapters", default="fp32", choices=("fp32", "model"), help="LoRA adapter dtype")
    parser.add_argument("--chunked-loss-impl", default="auto", choices=losses.LOSS_IMPLS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--documents", type=int, default=None,
                        help="documents per row (default 1, or the suite's): more makes packed rows")
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:
        return probe_main(args)
    if args.variant is None and args.resume:
        searches = results.load(args.resume).get("searches", [])
        targets = [MaxCtxTarget(s["shape"], s["variant"], s["start"], s["granularity"],
                                documents=s.get("documents_per_row", 1)) for s in searches]
    elif args.variant is None:
        raise SystemExit("--variant is required (or --resume FILE)")
    else:
        targets = [MaxCtxTarget(args.shape, args.variant, args.start, args.granularity, documents=args.documents or 1)]
    args.variant = None  # every target above is searched
    path, status = run_targets(None, args, targets)
    from benchmarks.run import report_and_table

    report_and_table(path, args)
    return status


if __name__ == "__main__":
    sys.exit(main())
