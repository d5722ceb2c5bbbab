"""Converting a module in place by swapping its class for a subclass with a mixin in front.

The module object stays the same: its parameters and their names (so checkpoints, peft adapters and ZeRO-3
partitions are untouched), its hooks, and ``isinstance`` checks against the original class. Each subclass is
made once per (mixin, class) and registered in this module so that pickling finds it by name.
"""

from __future__ import annotations

from torch import nn

_SUBCLASSES: dict[tuple[type, type], type] = {}
_ORIGINALS: dict[type, type] = {}


def swap_in(module: nn.Module, mixin: type) -> nn.Module:
    """Give ``module`` the class ``Lemo<Mixin-less name>`` = (mixin, original class); returns the module."""
    original = type(module)
    key = (mixin, original)
    if key not in _SUBCLASSES:
        name = f"{mixin.__name__.removesuffix('Mixin')}{original.__name__}"
        subclass = type(name, (mixin, original), {"__module__": __name__, "__qualname__": name})
        _SUBCLASSES[key] = subclass
        _ORIGINALS[subclass] = original
        globals()[name] = subclass
    module.__class__ = _SUBCLASSES[key]
    return module


def swap_out(module: nn.Module) -> nn.Module:
    """Undo every ``swap_in`` of the module: it gets the class it had before the first one back."""
    module.__class__ = root_class(module)
    return module


def original_class(module: nn.Module) -> type:
    """The class the last ``swap_in`` replaced."""
    return _ORIGINALS.get(type(module), type(module))


def root_class(module: nn.Module) -> type:
    """The module's class before any ``swap_in`` (one module may carry several mixins: a fused RMSNorm that
    compaction also records)."""
    cls = type(module)
    while cls in _ORIGINALS:
        cls = _ORIGINALS[cls]
    return cls
