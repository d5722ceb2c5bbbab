"""What is alive on the GPU at a training step's peak: allocations grouped by the code that made them.

    python benchmarks/memory_peak.py --shape llama3-8b --seq 131072 --variant lemo-oracle+ckpt+stack --out $OUT

For each ``--variant`` (comma-separated names of benchmarks/harness/variants.py) the harness's model takes one
warm-up step, then one step under ``torch.cuda.memory._record_memory_history``. The recorded trace is replayed:
every allocation adds its bytes when made and removes them when its free completes, so the replay finds the moment
of the step's peak and the allocations alive then. Those made before the step (weights, optimizer state) are one
line; the others are grouped by the innermost frame inside this repository, transformers, peft, DeepSpeed or torch's
checkpoint and autograd Python code (the line that asked for the memory, one level above the operator). Written:
<out>/memory-peak-<timestamp>.json and the same as a Markdown table on stdout. CUDA only.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.harness import losses, results  # noqa: E402
from benchmarks.harness.measure import TrainingStep  # noqa: E402
from benchmarks.harness.model import build_model, random_batch  # noqa: E402
from benchmarks.harness.shapes import get_shape  # noqa: E402
from benchmarks.harness.variants import get_variant, parse_lemo_overrides, with_lemo_overrides  # noqa: E402

GIB = 2**30
# Frames worth naming, most specific first; a frame outside all of them (torch internals, the standard library) is
# skipped so that the group names the caller that decided to allocate.
INTERESTING = ("lemo_ds/", "benchmarks/", "transformers/", "peft/", "deepspeed/", "liger_kernel/",
               "torch/utils/checkpoint", "torch/autograd/")


def frame_key(frames: list[dict], depth: int) -> str:
    """'file:line (function)' of the ``depth`` innermost interesting frames, innermost first."""
    picked = []
    for frame in frames:
        name = frame.get("filename", "")
        for marker in INTERESTING:
            at = name.find(marker)
            if at >= 0:
                picked.append(f"{name[at:]}:{frame.get('line')} ({frame.get('name')})")
                break
        if len(picked) == depth:
            break
    return " <- ".join(picked) or "(no Python frame)"


def replay(trace: list[dict]) -> tuple[int, dict[int, dict]]:
    """(peak bytes above the start, the allocations made in the trace and alive at that moment: addr -> event)."""
    live: dict[int, dict] = {}
    current = peak = 0
    peak_at = -1
    for index, event in enumerate(trace):
        action = event["action"]
        if action == "alloc":
            live[event["addr"]] = event
            current += event["size"]
        elif action == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
        if current > peak:
            peak, peak_at = current, index
    # Second pass up to the peak: the live set at that event.
    live = {}
    for event in trace[: peak_at + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_completed":
            live.pop(event["addr"], None)
    return peak, live


class StepTrace:
    """The CUDA allocator's trace from ``start()`` to ``stop()`` (one training step: forward, backward, optimizer
    step), for the harness, the main job (benchmarks/profile_job.py) and the baseline job (hf_liger_job.py) alike."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.before = device, 0

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.before = torch.cuda.memory_allocated(self.device)
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, context="alloc", stacks="python")

    def stop(self, depth: int, top: int) -> dict:
        """The allocator's peak since ``start()`` and ``alive_at_peak`` of the trace; recording ends."""
        try:
            torch.cuda.synchronize(self.device)
            snapshot = torch.cuda.memory._snapshot()
            peak = torch.cuda.max_memory_allocated(self.device)
        finally:
            self.end()
        trace = snapshot["device_traces"][self.device.index or 0]
        return {"peak_allocated_gib": peak / GIB, **alive_at_peak(trace, self.before, depth, top)}

    @staticmethod
    def end() -> None:
        """Recording ends, nothing read (a step that raised)."""
        torch.cuda.memory._record_memory_history(enabled=None)


def profile(step: TrainingStep, variant, device: torch.device, depth: int, top: int) -> dict:
    step(variant, clean_cache=True)  # warm-up: kernels compiled, pools and host buffers made
    trace = StepTrace(device)
    trace.start()
    try:
        outcome = step(variant)
    except BaseException:
        trace.end()
        raise
    return {"variant": variant.name, "loss": outcome.loss, "step_s": outcome.seconds, **trace.stop(depth, top)}


def alive_at_peak(trace: list[dict], before: int, depth: int, top: int) -> dict:
    """The replayed peak of a recorded step (``before``: bytes allocated when recording began) and what was alive
    then, grouped by ``frame_key`` (the ``top`` largest groups, the rest summed)."""
    peak, live = replay(trace)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for event in live.values():
        group = groups[frame_key(event.get("frames", []), depth)]
        group[0] += event["size"]
        group[1] += 1
    ranked = sorted(groups.items(), key=lambda item: -item[1][0])
    return {
        "allocated_before_step_gib": before / GIB,
        "replayed_peak_gib": (before + peak) / GIB,
        "trace_events": len(trace),
        "alive_at_peak": [{"where": key, "gib": size / GIB, "count": count} for key, (size, count) in ranked[:top]],
        "alive_at_peak_other_gib": sum(size for _, (size, _) in ranked[top:]) / GIB,
    }


def markdown(record: dict, title: str | None = None) -> str:
    """A record of ``alive_at_peak`` as Markdown: a heading (``title``: what was recorded; by default the harness
    variant and its step time), then the table of what was alive at the peak."""
    title = title or f"### {record['variant']}"
    step = f", step {record['step_s']:.1f} s" if "step_s" in record else ""
    lines = [f"{title}: peak {record['peak_allocated_gib']:.2f} GiB (replayed {record['replayed_peak_gib']:.2f}; "
             f"{record['allocated_before_step_gib']:.2f} before the step){step}", "",
             "| GiB | allocations | made at (innermost first) |", "|---|---|---|",
             f"| {record['allocated_before_step_gib']:.2f} | | before the step (weights, optimizer state, batch) |"]
    lines += [f"| {g['gib']:.2f} | {g['count']} | `{g['where']}` |" for g in record["alive_at_peak"]]
    lines.append(f"| {record['alive_at_peak_other_gib']:.2f} | | the rest |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--variant", required=True, help="comma-separated variant names")
    parser.add_argument("--lemo-set", action="append", default=[], metavar="KEY=VALUE",
                        help="KEY=VALUE or memory.KEY=VALUE: a key of every lemo variant's section (JSON)")
    parser.add_argument("--depth", type=int, default=3, help="interesting frames per group")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("memory_peak.py needs CUDA: it reads the CUDA caching allocator's trace")
    device = torch.device("cuda", torch.cuda.current_device())
    shape = get_shape(args.shape)
    bench = build_model(shape, args.seq, device, torch.bfloat16)
    step = TrainingStep(bench, random_batch(shape.vocab, args.seq, device), losses.resolve_chunked_impl("auto", device))
    out = results.ResultFile(args.out, "memory-peak", {"kind": "memory-peak", "command": results.command_line(),
                                                      "environment": results.environment(), "shape": shape.name,
                                                      "seq": args.seq, "variants": []})
    overrides = parse_lemo_overrides(args.lemo_set)
    tag = "".join(f"[{pair}]" for pair in args.lemo_set)
    for name in args.variant.split(","):
        variant = with_lemo_overrides(get_variant(name.strip()), overrides, tag)
        record = profile(step, variant, device, args.depth, args.top)
        out.data["variants"].append(record)
        out.write()
        print(markdown(record), flush=True)
        step.cleanup()
    out.finish("complete")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
