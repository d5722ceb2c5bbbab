"""What token sparsity adds to the longest context, by the planner: the main job against itself with every layer dense.

    PYTHONPATH=. python benchmarks/plan_sparsity_gain.py [--out benchmarks/results/plan-sparsity-gain.json]

For each lent GPU (an H100's and an H200's memory, the machines' 125 GiB of host memory) and each combination of the
memory settings that reach past 256K (ZeRO-3 parameter offload on, the tiled MLP on, ``layers_per_stored_input`` 1, 2
or 4, power-of-two or registered pinned buffers), the longest ``--seq-len`` the planner
(``lemo_ds.plan.search.longest_fit``) says fits: for ``zero3_lemo.json`` at keep 0.4 (dense first half) and for the
same job at keep 1.0, every layer dense. Their ratio is the longest-context gain of the sparsity alone, everything
else equal; what stops each (device or host memory) comes with it. These are predictions of the calibrated memory model
(benchmarks/planner_calibration.py, within 10% on every committed case), not measurements: the measured cases are in
benchmarks/results/max-context-* and benchmarks/results/longest-context-*.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness.results import git_state  # noqa: E402
from lemo_ds.config import load_ds_config, split_ds_config  # noqa: E402
from lemo_ds.plan import job, memory, search  # noqa: E402
from lemo_ds.plan.memory import GIB  # noqa: E402
from lemo_ds.training.model import resolve_model  # noqa: E402

GPUS_GIB = {"H100": 79.18, "H200": 139.8}  # what torch reports on the lent machines
HOST_GIB = 125.0
KEEPS = (0.4, 1.0)


def setups(model: str):
    """(memory settings, {keep: (shape, setup)}) for every combination, from zero3_lemo.json."""
    source = resolve_model(model)
    raw = load_ds_config(ROOT / "ds_configs" / "zero3_lemo.json")
    raw["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
    for per_input, buffers in itertools.product((1, 2, 4), ("power_of_two", "registered")):
        settings = {"tiled_mlp": True, "layers_per_stored_input": per_input, "pinned_buffers": buffers,
                    "offload_param": "cpu"}  # fmt: skip
        by_keep = {}
        for keep in KEEPS:
            config = json.loads(json.dumps(raw))
            config["lemo"]["keep_ratio"] = keep
            config["lemo"].setdefault("memory", {}).update(
                tiled_mlp=True, layers_per_stored_input=per_input, pinned_buffers=buffers
            )
            lemo, ds_config = split_ds_config(config)
            by_keep[keep] = job.job_setup(source.config, ds_config, lemo, seq_len=1, lora_r=8, device="cuda")
        yield settings, by_keep


def limit(shape, setup, gpu: int, host: int) -> str:
    """What the first length past the longest fit runs out of."""
    p = memory.predict(shape, setup)
    checks = {"device": memory.device_fits(p, gpu), "host": memory.host_fits(p, host)}
    over = [name for name, ok in checks.items() if not ok]
    return " and ".join(over) or "nothing (the search's ceiling)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "plan-sparsity-gain.json"))
    args = parser.parse_args(argv)
    host = int(HOST_GIB * GIB)
    rows = []
    for (gpu_name, gpu_gib), (settings, by_keep) in itertools.product(GPUS_GIB.items(), setups(args.model)):
        gpu = int(gpu_gib * GIB)
        row = {"gpu": gpu_name, "gpu_gib": gpu_gib, "host_gib": HOST_GIB, **settings}
        for keep, (shape, setup) in by_keep.items():
            longest = search.longest_fit(shape, setup, gpu, host)
            at = memory.predict(shape, dataclasses.replace(setup, seq_len=longest))
            past = dataclasses.replace(setup, seq_len=longest + 64)
            row[f"keep {keep}"] = {"longest": longest, "device_gib": round(at.device_bytes / GIB, 2),
                                   "host_gib": round(at.host_bytes / GIB, 2),
                                   "stopped_by": limit(shape, past, gpu, host)}  # fmt: skip
        row["gain"] = round(row["keep 0.4"]["longest"] / max(row["keep 1.0"]["longest"], 1), 3)
        rows.append(row)
    lines = ["| GPU | stored input per | pinned buffers | keep 0.4: longest (stopped by) "
             "| keep 1.0: longest (stopped by) | gain |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        a, b = r["keep 0.4"], r["keep 1.0"]
        lines.append(f"| {r['gpu']} | {r['layers_per_stored_input']} layer(s) | {r['pinned_buffers']} | "
                     f"{a['longest']:,} ({a['stopped_by']}) | {b['longest']:,} ({b['stopped_by']}) | "
                     f"{r['gain']:.2f}x |")  # fmt: skip
    best = {}
    for gpu_name in GPUS_GIB:
        of_gpu = [r for r in rows if r["gpu"] == gpu_name]
        best[gpu_name] = {f"keep {keep}": max(r[f"keep {keep}"]["longest"] for r in of_gpu) for keep in KEEPS}
        best[gpu_name]["gain"] = round(best[gpu_name]["keep 0.4"] / best[gpu_name]["keep 1.0"], 3)
        lines.append(f"| {gpu_name} | best of each | | {best[gpu_name]['keep 0.4']:,} | {best[gpu_name]['keep 1.0']:,} "
                     f"| {best[gpu_name]['gain']:.2f}x |")  # fmt: skip
    print("\n".join(lines))
    out = {"command": "PYTHONPATH=. python benchmarks/plan_sparsity_gain.py", "git": git_state(), "model": args.model,
           "what": "predictions of the planner's memory model, not measurements; machine-independent",
           "planner_constants": {"A_H": memory.A_H, "CONSTANT_BYTES": memory.CONSTANT_BYTES,
                                 "TILED_FULL_LENGTH_H_FUSED": memory.TILED_FULL_LENGTH_H_FUSED},
           "rows": rows, "best": best, "table": lines}  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
