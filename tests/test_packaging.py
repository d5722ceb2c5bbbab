"""The built distribution: every lemo_ds package (the kernels in lemo_ds.kernels), no top-level kernels."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent


def test_wheel_holds_every_package_and_no_bare_kernels(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("lemo_ds-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not any(name.startswith("kernels/") for name in names)
    for init in (REPO / "lemo_ds").rglob("__init__.py"):
        assert init.relative_to(REPO).as_posix() in names, f"{init} is missing from the wheel"
    for source in (REPO / "lemo_ds" / "kernels").glob("*.py"):
        assert f"lemo_ds/kernels/{source.name}" in names


def _setup_requirements() -> list[str]:
    """Every requirement string setup.py declares (install_requires and every extra), read without running it."""
    tree = ast.parse((REPO / "setup.py").read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup"]
    (call,) = calls
    wanted = ("install_requires", "extras_require")
    arguments = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg in wanted}
    return arguments["install_requires"] + [r for extra in arguments["extras_require"].values() for r in extra]


def test_lower_bounds_are_the_oldest_versions_ci_tests():
    # setup.py's lower bounds are a claim; CI's first run installs exactly them (.ci/oldest.txt). They must agree,
    # and no upper bound may appear without a known break (setup.py says why beside any it adds).
    pins = {}
    for line in (REPO / ".ci" / "oldest.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pins[requirement.name] = Version(spec.version)
    bounds = {}
    for text in _setup_requirements():
        requirement = Requirement(text)
        for spec in requirement.specifier:
            assert spec.operator == ">=", f"{text}: only lower bounds are declared"
            bounds[requirement.name] = Version(spec.version)
    # torch: CI's machine has one CPU build (2.13.0); the lower bound (2.11) is the GPU suite's torch.
    assert bounds.pop("torch") <= pins.pop("torch")
    assert {name: bounds.get(name) for name in pins} == pins
    assert set(bounds) <= set(pins), f"lower bounds CI does not install: {sorted(set(bounds) - set(pins))}"
