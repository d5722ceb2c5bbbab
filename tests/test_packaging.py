"""The built distribution: every lemo_ds package, kernels/ installed as lemo_ds.kernels, no top-level kernels."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_holds_every_package_and_no_bare_kernels(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("lemo_ds-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not any(name.startswith("kernels/") for name in names)
    for init in (REPO / "lemo_ds").rglob("__init__.py"):
        assert init.relative_to(REPO).as_posix() in names, f"{init} is missing from the wheel"
    for source in (REPO / "kernels").glob("*.py"):
        assert f"lemo_ds/kernels/{source.name}" in names
