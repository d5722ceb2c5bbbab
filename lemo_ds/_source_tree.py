"""Make ``lemo_ds.kernels`` importable from a source checkout that was not installed.

An installed lemo_ds has ``lemo_ds.kernels`` (setup.py maps the repository's ``kernels/`` there). A checkout
used through PYTHONPATH, as on a machine where nothing can be installed, has ``kernels/`` beside ``lemo_ds/``
instead: this registers it under its installed name, once.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def register_kernels_from_checkout() -> None:
    if "lemo_ds.kernels" in sys.modules or importlib.util.find_spec("lemo_ds.kernels") is not None:
        return
    init = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not init.is_file():
        return  # a broken install: the import of lemo_ds.kernels below reports it
    spec = importlib.util.spec_from_file_location(
        "lemo_ds.kernels", init, submodule_search_locations=[str(init.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["lemo_ds.kernels"] = module
    spec.loader.exec_module(module)
    sys.modules["lemo_ds"].kernels = module
