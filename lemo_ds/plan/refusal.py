"""The one line that stops a job the plan rejects (launch/train.py), and the section that fits, as JSON."""

from __future__ import annotations

import json

from lemo_ds.plan.search import Plan, gib


def fix_text(result: Plan, lemo_section: dict | None, ds_config: dict | None = None) -> str:
    """What to change: the flags, the "lemo" section and any DeepSpeed section that fit, or why nothing in the search
    does."""
    if not result.found:
        return (
            "no change the planner tries fits (offload, segment loss, tiled MLP, registered pinned buffers, "
            "resident checkpoints, fewer stored inputs, parameter offload, keep_ratio 0.1): use a shorter --seq-len or "
            "more ranks"
        )
    parts = [f"with {' + '.join(c.what for c in result.applied)} it needs {gib(result.fitting.device_bytes)}"]
    if result.flags():
        parts.append(" ".join(result.flags()))
    parts.append('"lemo": ' + json.dumps(result.section(lemo_section), separators=(", ", ": ")))
    for name, section in result.ds_sections(ds_config or {}).items():
        parts.append(f'"{name}": ' + json.dumps(section, separators=(", ", ": ")))
    return ": ".join(parts[:1]) + ": " + ", ".join(parts[1:])


def refusal(result: Plan, gpu_mem: int, host_mem: int, seq_len: int, lemo_section: dict | None,
            ds_config: dict | None = None) -> str:  # fmt: skip
    p = result.prediction
    over = f"device peak {gib(p.device_bytes)} of {gib(gpu_mem)}, host {gib(p.host_bytes)} of {gib(host_mem)}"
    return (
        f"--seq-len {seq_len} does not fit: the planner predicts {over}; {fix_text(result, lemo_section, ds_config)} "
        "(or --memory-check off to run anyway)"
    )
