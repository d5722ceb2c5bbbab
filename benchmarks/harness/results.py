"""The result file: environment metadata, incremental writes, and the Markdown table.

One run writes one JSON file, ``<out>/<suite>-<YYYYmmdd-HHMMSS>.json``, rewritten (atomically) after every
round of steps, so a run killed by a time limit leaves every figure it reached; ``"status"`` says
``running`` / ``complete``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
PACKAGES = ("torch", "transformers", "peft", "triton", "deepspeed", "liger-kernel", "accelerate", "lemo_ds")
SCHEMA_VERSION = 1


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the checkout; $LEMO_BENCH_GIT_COMMIT, when set, wins (a copied working tree may carry
    a stale .git or none)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                              timeout=30).stdout.rstrip("\n")

    explicit = os.environ.get("LEMO_BENCH_GIT_COMMIT")
    if explicit:  # the GPU machine's copy carries a .git of the session's first commit, not of the code it runs
        return {"commit": explicit, "dirty": None, "changed_paths": None, "note": "commit from $LEMO_BENCH_GIT_COMMIT"}
    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain").splitlines()
        return {"commit": commit, "dirty": bool(changed), "changed_paths": [line[3:] for line in changed][:50]}
    except (OSError, subprocess.SubprocessError):
        return {"commit": os.environ.get("LEMO_BENCH_GIT_COMMIT"), "dirty": None, "changed_paths": None,
                "note": "git unavailable here; commit from $LEMO_BENCH_GIT_COMMIT"}


def device_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_name=props.name, gpu_count=torch.cuda.device_count(),
                    gpu_total_memory_gib=round(props.total_memory / 2**30, 2),
                    compute_capability=f"{props.major}.{props.minor}")
    else:
        info.update(gpu_name=None, gpu_count=0, cpu=platform.processor() or platform.machine(),
                    cpu_count=os.cpu_count())
    return info


def environment(include_device: bool = True) -> dict[str, Any]:
    """Host, versions, git state, allocator settings and (unless ``include_device`` is false: a parent process
    that must leave the GPU alone) the device."""
    return {
        "hostname": socket.gethostname(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": package_versions(),
        "git": git_state(),
        "env": {key: os.environ.get(key) for key in ("PYTORCH_CUDA_ALLOC_CONF", "CUDA_VISIBLE_DEVICES",
                                                     "PYTHONUNBUFFERED")},
        **(device_info() if include_device else {}),
    }


def command_line() -> str:
    """The exact command line, interpreter included."""
    return shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))


def timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


class ResultFile:
    """A JSON document written whole after each change (tmp file + rename: never half-written)."""

    def __init__(self, out_dir: str | os.PathLike, suite: str, data: dict[str, Any]) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / f"{suite}-{timestamp()}.json"
        self.data = {"schema_version": SCHEMA_VERSION, "suite": suite, "status": "running",
                     "started": _dt.datetime.now().isoformat(timespec="seconds"), **data}
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    def finish(self, status: str = "complete") -> None:
        self.data["status"] = status
        self.data["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
        self.write()


def load(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ---- Markdown --------------------------------------------------------------------------------------------

def seq_label(seq: int) -> str:
    return f"{seq // 1024}K" if seq % 1024 == 0 and seq >= 1024 else str(seq)


def _num(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _status(record: dict[str, Any]) -> str | None:
    if record.get("oom"):
        if record.get("oom_inferred_from_seq"):
            return f"OOM (as at {seq_label(record['oom_inferred_from_seq'])})"
        return "OOM"
    if record.get("error"):
        return "error"
    return None


def markdown_table(result: dict[str, Any]) -> str:
    """One row per (configuration, variant); step time as median [p20-p80]."""
    if result.get("kind") == "maxctx":
        return maxctx_markdown(result)
    lines = ["| shape | tokens | variant | peak alloc GiB | peak reserved GiB | step s median [p20-p80] | tokens/s "
             "| MFU | keep | loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for config in result.get("configurations", []):
        for record in config.get("variants", []):
            prefix = f"| {config['shape']} | {seq_label(config['seq'])} | {record['name']} |"
            status = _status(record)
            if status:
                lines.append(f"{prefix} {status} | | | | | | |")
                continue
            t = record["step_time_s"]
            timing = f"{_num(t['median'], 3)} [{_num(t['p20'], 3)}-{_num(t['p80'], 3)}]" if t["median"] else ""
            mfu = f"{100 * record['mfu']:.1f}%" if record.get("mfu") is not None else ""
            lines.append(f"{prefix} {_num(record['peak_allocated_gib'])} | {_num(record['peak_reserved_gib'])} | "
                         f"{timing} | {_num(record['tokens_per_s'], 0)} | {mfu} | "
                         f"{_num(record['mean_keep_ratio'], 3)} | {_num(record['loss_value'], 3)} |")
    return "\n".join(lines)


def maxctx_markdown(result: dict[str, Any]) -> str:
    lines = ["| shape | variant | longest fitting context | first failing | probes | complete |",
             "|---|---|---|---|---|---|"]
    for search in result.get("searches", []):
        fit, fail = search.get("max_fit_seq"), search.get("min_fail_seq")
        lines.append(f"| {search['shape']} | {search['variant']} | {seq_label(fit) if fit else 'none'} | "
                     f"{seq_label(fail) if fail else ''} | {len(search.get('probes', []))} | "
                     f"{'yes' if search.get('complete') else 'no'} |")
    return "\n".join(lines)
