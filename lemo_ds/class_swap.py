"""The one class factory of lemo_ds: a subclass with a mixin in front, and converting a module in place with it.

``mixed_class(mixin, cls)`` is the class ``<Mixin's name without "Mixin"><cls's name>`` = (mixin, cls), made once
per (mixin, class) and registered in this module so that pickling finds it by name (``LemoDecoderLayerMixin`` on
``LlamaDecoderLayer`` gives ``LemoDecoderLayerLlamaDecoderLayer``; ``FusedRMSNormMixin`` on ``LlamaRMSNorm`` gives
``FusedRMSNormLlamaRMSNorm``); ``register`` names one written by hand instead (Megatron's ``LemoTransformerLayer``).
``swap_in`` gives a module such a class: the module object stays the same (its parameters and their names, so
checkpoints, peft adapters and ZeRO-3 partitions are untouched; its hooks; ``isinstance`` checks against its
original class); ``swap_out`` undoes every swap.
"""

from __future__ import annotations

from torch import nn

_SUBCLASSES: dict[tuple[type, type], type] = {}
_ORIGINALS: dict[type, type] = {}


def register(mixin: type, cls: type, subclass: type) -> None:
    """Make ``mixed_class(mixin, cls)`` return ``subclass`` (defined elsewhere, with the mixin before ``cls``)."""
    _SUBCLASSES[mixin, cls] = subclass
    _ORIGINALS[subclass] = cls


def mixed_class(mixin: type, cls: type) -> type:
    """The subclass (mixin, cls) (see the module docstring)."""
    key = (mixin, cls)
    if key not in _SUBCLASSES:
        name = f"{mixin.__name__.removesuffix('Mixin')}{cls.__name__}"
        subclass = type(name, (mixin, cls), {"__module__": __name__, "__qualname__": name})
        register(mixin, cls, subclass)
        globals()[name] = subclass
    return _SUBCLASSES[key]


def swap_in(module: nn.Module, mixin: type) -> nn.Module:
    """Give ``module`` the class ``mixed_class(mixin, its class)``; returns the module."""
    module.__class__ = mixed_class(mixin, type(module))
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
