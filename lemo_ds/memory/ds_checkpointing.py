"""A one-line fix of DeepSpeed 0.19.8's synchronous CPU checkpointing (``cpu_checkpointing: true``).

Why it broke (the expected failure of the memory tests): ``CheckpointFunction.forward`` copies the checkpoint's
inputs to the host with ``copy_to_device(args, cpu)`` and then, in ``get_cpu_activations_for_backward``, replaces
each input's storage with a 0-d placeholder (``arg.data = torch.empty([])``) *before* it reads the host copy
(``arg.saved_data = inp.data``). Where ``.to("cpu")`` is a no-op (the CPU accelerator, and any tensor already on
the host), ``inp`` *is* ``arg``, so what it keeps is the placeholder: the recompute in backward gets a 0-d tensor
and the layer fails (``IndexError`` in ``LlamaAttention.forward``). Nothing of it is specific to transformers
5.17. On CUDA, DeepSpeed 0.19.8 takes another path (its asynchronous ``_ActivationOffloadEngine``), which this fix
does not touch. The fix reads the data before replacing it; where ``inp`` is a real copy it does exactly what
DeepSpeed did.
"""

from __future__ import annotations

import torch

_PATCHED = "_lemo_fixed_cpu_checkpointing"


def _get_cpu_activations_for_backward(args, inputs):
    from deepspeed.runtime.activation_checkpointing.checkpointing import is_activation_to_checkpoint

    new_args = []
    for arg, inp in zip(args, inputs, strict=True):
        if not is_activation_to_checkpoint(arg):
            new_args.append(arg)
            continue
        saved = inp.data  # read before the placeholder: inp is arg when the host copy was a no-op
        arg.data = torch.empty([], device=arg.device).data
        arg.saved_data = saved
        new_args.append(arg)
    return new_args


def fix_deepspeed_cpu_checkpointing() -> None:
    """Install the fix once (idempotent; DeepSpeed's module-level function is looked up at call time)."""
    from deepspeed.runtime.activation_checkpointing import checkpointing

    if not getattr(checkpointing, _PATCHED, False):
        checkpointing.get_cpu_activations_for_backward = _get_cpu_activations_for_backward
        setattr(checkpointing, _PATCHED, True)
