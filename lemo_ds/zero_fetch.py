"""ZeRO-3 on one rank fetches its parameters without stopping the host (a fix of DeepSpeed 0.19.8).

Where a parameter's partition group has one rank (a one-GPU job, or a group of one), DeepSpeed's "gather" is
``NoGatherHandle`` / ``NoGatherCoalescedHandle``: ``param.data = param.ds_tensor.data.to(device)``, which is the
partition itself when it already lives on the device (no copy), and then ``wait()`` synchronises the whole current
stream before every module's forward and backward. The host then cannot run ahead of the GPU, and every Python
step between two modules (hooks, the next launch) leaves the GPU idle: on one H200 the main job at 64K tokens made
about 500 stream synchronisations a step and the GPU ran kernels 89% of the wall time
(benchmarks/results/faster-than-hf-liger-20261206/, the profiles).

The synchronisation protects a real host-to-device copy (a partition offloaded to the CPU, a quantized one). Where
no copy was made (``param.data`` is the partition's own storage) there is nothing to wait for, and this fix skips it;
in every other case it calls DeepSpeed's own ``wait``. Groups of more than one rank take another path (the
all-gather handles), which this does not touch.
"""

from __future__ import annotations

from typing import Any

_PATCHED = "_lemo_no_needless_sync"


def _gathered_in_place(param: Any) -> bool:
    """The fetched data is the partition's own storage on the same device: nothing was copied."""
    partition = getattr(param, "ds_tensor", None)
    if partition is None or hasattr(partition, "ds_quant_scale") or param.data.device != partition.device:
        return False
    return param.data.untyped_storage().data_ptr() == partition.untyped_storage().data_ptr()


def _patched_wait(handle_class: type, params_attr: str) -> Any:
    original = handle_class.wait
    complete_attr = f"_{handle_class.__name__}__complete"

    def wait(self, **kwargs: Any) -> None:
        params = getattr(self, params_attr)
        params = params if isinstance(params, list) else [params]
        if getattr(self, complete_attr) or not all(_gathered_in_place(p) for p in params):
            return original(self, **kwargs)
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        for param in params:
            param.ds_status = ZeroParamStatus.AVAILABLE
        setattr(self, complete_attr, True)

    wait.__wrapped__ = original
    return wait


def skip_needless_fetch_syncs() -> None:
    """Install the fix once (idempotent)."""
    from deepspeed.runtime.zero import partition_parameters as pp

    for handle_class, params_attr in ((pp.NoGatherHandle, "_NoGatherHandle__param"),
                                      (pp.NoGatherCoalescedHandle, "_NoGatherCoalescedHandle__params")):  # fmt: skip
        if not getattr(handle_class, _PATCHED, False):
            handle_class.wait = _patched_wait(handle_class, params_attr)
            setattr(handle_class, _PATCHED, True)
