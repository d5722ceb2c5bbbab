"""What every kernel benchmark in this folder shares: the checkout root, the kernels module, git facts.

The scripts run as ``python benchmarks/kernels/bench_<op>.py`` (this folder is then first on sys.path)."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def import_kernels():
    """lemo_ds.kernels when installed; else kernels/ of this checkout, loaded as a package on its own (its imports
    are relative), so the benchmarks also run where lemo_ds's own dependencies (DeepSpeed, ...) are missing."""
    try:
        return importlib.import_module("lemo_ds.kernels")
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "lemo_kernels_checkout",
            REPO / "kernels" / "__init__.py",
            submodule_search_locations=[str(REPO / "kernels")],
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


def git(*args: str) -> str | None:
    """Output of ``git ARGS`` in the checkout, or None without git or outside a repository."""
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
