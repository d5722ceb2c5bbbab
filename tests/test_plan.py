"""The memory planner (lemo_ds/plan): its formula against committed GPU measurements and CPU runs, the planner's
command, and launch/train.py's memory check (refusal before loading weights, --seq-len max)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from launch_util import REPO, ok, summary, train_single

from lemo_ds.config import load_ds_config, split_ds_config
from lemo_ds.plan import job, memory, search
from lemo_ds.plan.__main__ import main as plan_main
from lemo_ds.plan.memory import GIB, Setup, Shape
from lemo_ds.training.presets import preset_config

CALIBRATION = REPO / "benchmarks" / "results" / "planner-calibration.json"
MIB = 1 << 20


def tiny_cpu_setup(seq_len: int, dtype: str = "float32") -> tuple[Shape, Setup]:
    """``dtype``: the job's, as its summary names it (bf16 "auto" is bf16 on a CPU with native bf16, else fp32)."""
    section, ds_config = split_ds_config(load_ds_config(REPO / "ds_configs" / "zero3_lemo.json"))
    return job.job_setup(
        preset_config("tiny-llama"), ds_config, section, seq_len=seq_len, lora_r=8, device="cpu",
        dtype=getattr(torch, dtype),
    )  # fmt: skip


def one_calibration_batch(folder) -> str:
    """zero3_lemo.json with its predictors calibrated on one micro-batch instead of 8: calibration runs before the
    first step, one micro-batch at a time under no_grad, so the count changes the job's time (8 batches of 8K tokens
    took most of a 5-minute test on CPU), not its peak memory or the plan."""
    config = json.loads((REPO / "ds_configs" / "zero3_lemo.json").read_text())
    config["lemo"]["predictor"] = {"calibration_batches": 1}
    path = folder / "zero3_lemo_calibration1.json"
    path.write_text(json.dumps(config))
    return str(path)


def cpu_bytes(seq_len: int, dtype: str = "float32") -> int:
    """What the planner counts in a CPU run's RAM: device terms plus the offloaded inputs (the same RAM)."""
    p = memory.predict(*tiny_cpu_setup(seq_len, dtype))
    return p.device_bytes + p.terms["host.offloaded inputs"]


def test_calibration_cases_within_ten_percent_and_oom_predicted():
    cal = json.loads(CALIBRATION.read_text())
    assert cal["model_constants_used"] == {"A_H": memory.A_H, "CONSTANT_BYTES": memory.CONSTANT_BYTES,
                                           "TILED_FULL_LENGTH_H_FUSED": memory.TILED_FULL_LENGTH_H_FUSED}
    shape = Shape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256)
    for case in cal["cases"]:
        setup = Setup(seq_len=case["seq_len"], keep_ratios=tuple(case["keep_ratios"]), **case["setup"])
        p = memory.predict(shape, setup)
        fits = memory.fits(p, int(case["gpu_gib"] * GIB), int(125 * GIB))
        if case.get("measured") == "out of memory":
            assert not fits, case["case"]
        else:
            error = p.device_bytes / GIB / case["measured_gib"] - 1
            assert abs(error) <= 0.10 and fits, (case["case"], error)
    assert sum(1 for c in cal["cases"] if c.get("measured") == "out of memory") == 5


@pytest.mark.slow
def test_formula_increment_against_cpu_rss(tmp_path):
    """Two 1-step CPU runs of tiny-llama (zero3_lemo.json): the growth of the process's peak RSS between 2048 and
    8192 tokens against the planner's growth. RSS includes the Python process, so only increments compare. The
    model is calibrated on CUDA allocations; on CPU the run holds more than it counts (glibc's arenas keep freed
    blocks, the chunked PyTorch oracle scorer and per-document attention run in PyTorch): measured 2.2x the
    predicted growth when this test was written, 2.4-2.8x in four runs on 2026-12-07 (MALLOC_ARENA_MAX=1 no
    steadier) and 3.01x once in CI, which failed the earlier bound of a third. Tolerance: the prediction is at most
    the measured growth and at least a quarter of it."""
    peaks = {}
    config = one_calibration_batch(tmp_path)
    for seq in (2048, 8192):
        out = tmp_path / str(seq)
        ok(train_single("--deepspeed", config, "--seq-len", str(seq), "--max-steps", "1", "--no-save", "--output-dir",
                        str(out)))  # fmt: skip
        peaks[seq], dtype = summary(out)["peak_mem_bytes"], summary(out)["dtype"]
    measured = peaks[8192] - peaks[2048]
    predicted = cpu_bytes(8192, dtype) - cpu_bytes(2048, dtype)
    assert measured / 4 <= predicted <= measured, (predicted / MIB, measured / MIB)


def test_float32_adapters_add_a_float32_copy_of_each_adapted_input_per_token():
    """peft's float32 adapters on a bf16 model: each of q, k, v, o keeps a float32 copy of its [s, h] input, in the
    layer backward (the dense layers' rows); bf16 adapters, fp32 training and full fine-tuning have none."""
    shape = Shape(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=97)
    ratios = (1.0, 1.0, 0.5, 0.5)

    def layer_backward(**setup) -> int:
        terms = memory.predict(shape, Setup(seq_len=4096, keep_ratios=ratios, **setup)).terms
        return terms.get("layer backward", 0)

    assert layer_backward(lora_float32=True) - layer_backward() == 4 * 4 * 64 * 4096
    assert layer_backward(lora_float32=True, dtype_bytes=4) == layer_backward(dtype_bytes=4)
    assert layer_backward(lora_float32=True, lora_r=0) == layer_backward(lora_r=0)


def test_launcher_refuses_a_job_the_plan_rejects_before_loading_weights(tmp_path):
    out = tmp_path / "run"
    result = train_single("--gpu-mem", "1MiB", "--max-steps", "1", "--output-dir", str(out))
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("lemo_ds: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "--seq-len 1024 does not fit: the planner predicts device peak" in errors[0]
    assert "of 0.00 GiB" in errors[0] and "--memory-check off" in errors[0]
    assert not out.exists()  # stopped in describe(): no output folder, no DeepSpeed log, no weights


@pytest.mark.slow
def test_seq_len_max_picks_a_length_that_runs(tmp_path):
    budget = 256 * MIB
    out = tmp_path / "run"
    result = train_single(
        "--deepspeed", one_calibration_batch(tmp_path), "--seq-len", "max", "--gpu-mem", "256MiB", "--max-steps", "1",
        "--no-save", "--output-dir", str(out)
    )  # fmt: skip
    ok(result)
    seq, dtype = summary(out)["seq_len"], summary(out)["dtype"]  # bf16 on a CPU that has it: the plan's dtype
    assert f"--seq-len max: {seq} tokens" in result.stdout + result.stderr
    assert seq % 64 == 0 and seq > 1024
    usable = budget * (1 - memory.RESERVE_SHARE)
    assert cpu_bytes(seq, dtype) <= usable < cpu_bytes(seq + 64, dtype)


def test_memory_check_off_refuses_seq_len_max():
    result = train_single("--seq-len", "max", "--memory-check", "off")
    assert result.returncode == 2 and "--seq-len max asks the memory planner" in result.stderr


def test_plan_command_prints_peak_and_a_fitting_section(capsys):
    argv = ["--model", "llama-3-8b", "--gpu-mem", "80GiB", "--host-mem", "128GiB", "--device", "cuda"]
    assert plan_main([*argv, "--seq-len", "128K"]) == 0
    printed = capsys.readouterr().out
    # zero3_lemo.json (keep 0.6) at 128K: the calibration's case of that config (the step does not depend on its
    # calibration count), whose prediction matched the H100 measurement.
    cases = json.loads(CALIBRATION.read_text())["cases"]
    name = "main job zero3_lemo at keep 0.6 (calibrated on 1 micro-batch) 128K packed"
    (case,) = [c for c in cases if c["case"].startswith(name)]
    assert f"predicted peak device memory: {case['predicted_gib']:.2f} GiB of 80.00 GiB" in printed, printed
    assert "fits" in printed
    assert plan_main([*argv, "--seq-len", "384K"]) == 1  # fits with the tiled MLP (measured: 66.5 GiB on an H100)
    printed = capsys.readouterr().out
    assert "does not fit" in printed and '"tiled_mlp": true' in printed
    # 512K: out of memory on an H100 with the tiled MLP too (measured at keep 0.4, attention in one flash call); with
    # attention in pieces past the flash limit the plan adds registered pinned buffers (the 16 sparse layers' inputs
    # at keep 0.6 outgrow the host in power-of-two buffers)
    assert plan_main([*argv, "--seq-len", "512K"]) == 1
    assert "with tiled_mlp + pinned_buffers registered it needs" in capsys.readouterr().out
    # 576K: ZeRO-3's parameter offload as well, a DeepSpeed section to paste beside the "lemo" one (the rest of
    # zero_optimization kept), and keep 0.4
    assert plan_main([*argv, "--seq-len", "576K"]) == 1
    printed = capsys.readouterr().out
    assert "with tiled_mlp + pinned_buffers registered + offload_param cpu + keep_ratio 0.4 it needs" in printed
    pasted = json.loads(printed[printed.index("{\n"):])
    assert pasted["lemo"]["memory"]["tiled_mlp"] is True and pasted["lemo"]["keep_ratio"] == 0.4
    assert pasted["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert pasted["zero_optimization"]["stage"] == 3
    assert plan_main([*argv, "--seq-len", "704K"]) == 1
    assert "no change the planner tries fits" in capsys.readouterr().out
    assert plan_main([*argv, "--seq-len", "max"]) == 0
    assert "longest --seq-len that fits 80.00 GiB device / 128.00 GiB host:" in capsys.readouterr().out


def test_cheapest_change_offloads_first():
    section, ds_config = split_ds_config(load_ds_config(REPO / "ds_configs" / "zero2_lemo.json"))
    shape, setup = job.job_setup(preset_config("llama-3-8b"), ds_config, section, seq_len=131072, lora_r=8)
    result = search.plan(shape, setup, 60 * GIB, 128 * GIB)
    assert not result.fits and [c.what for c in result.applied] == ["offload_checkpoints"]
    assert result.section({"keep_ratio": 0.4})["memory"] == {"offload_checkpoints": True}


def main_job_setup(seq_len: int, **memory_keys) -> tuple[Shape, Setup]:
    """zero3_lemo.json at keep 0.4 (LeMo's; the config's until 2026-12-07, which the sizes below are worked out for)
    with the given memory keys."""
    section, ds_config = split_ds_config(load_ds_config(REPO / "ds_configs" / "zero3_lemo.json"))
    memory_section = section.memory.model_copy(update=memory_keys)
    section = section.model_copy(update={"memory": memory_section, "keep_ratio": 0.4})
    return job.job_setup(preset_config("llama-3-8b"), ds_config, section, seq_len=seq_len, lora_r=8, device="cuda")


def test_registered_pinned_buffers_lift_the_host_limit_of_power_of_two_buffers():
    """640K tokens, zero3_lemo.json with the tiled MLP, 141 GB device (139 GiB), 128 GiB host: a dense layer's input
    is 5 GiB, which PyTorch's pinned allocator rounds up to 8 GiB, so the offloaded inputs need more host memory than
    there is; registered buffers of about their size fit. The planner proposes them for that, and keeps only the
    changes a fit needs."""
    shape, setup = main_job_setup(655360, tiled_mlp=True)
    pow2 = memory.predict(shape, setup)
    assert pow2.terms["host.offloaded inputs"] == 16 * 8 * GIB + 16 * 2 * GIB  # dense 5 -> 8 GiB, sparse 2 -> 2 GiB
    assert not memory.fits(pow2, 139 * GIB, 128 * GIB) and pow2.device_bytes < 0.95 * 139 * GIB  # the host is short
    result = search.plan(shape, setup, 139 * GIB, 128 * GIB)
    assert [c.what for c in result.applied] == ["pinned_buffers registered"]
    assert result.fitting.terms["host.offloaded inputs"] == 16 * 5 * GIB + 16 * 2 * GIB
    assert result.section({})["memory"] == {"pinned_buffers": "registered"}
    # 512K with an 80 GiB host: registered buffers, then 1, 2 and 4 resident layers are tried; 4 fits, and the plan
    # drops 1 and 2, which 4 replaces.
    shape, setup = main_job_setup(524288, tiled_mlp=True)
    result = search.plan(shape, setup, 139 * GIB, 80 * GIB)
    assert [c.what for c in result.applied] == ["pinned_buffers registered", "resident_checkpoints 4"]
    assert result.fitting.host_bytes <= 80 * GIB


def test_resident_checkpoints_put_spare_device_memory_to_use_where_the_host_is_short():
    """640K tokens on a 141 GB card (139 GiB) with 100 GiB of host memory, zero3_lemo.json with the tiled MLP: even
    registered buffers need more host memory than there is (16 dense inputs of 5 GiB, 16 sparse of 2 GiB), and the
    device has room: the plan keeps the first 4 layers' inputs on the device."""
    shape, setup = main_job_setup(655360, tiled_mlp=True)
    result = search.plan(shape, setup, 139 * GIB, 100 * GIB)
    assert [c.what for c in result.applied] == ["pinned_buffers registered", "resident_checkpoints 4"]
    dense = 655360 * 4096 * 2  # one dense layer's input, bytes: 5 GiB, a multiple of its 512 MiB granule
    terms = result.fitting.terms
    assert terms["stored inputs resident and in flight"] == 4 * dense + 2 * dense  # 4 resident, 2 in flight
    sparse = 2 * GIB  # 0.4 x 10240 blocks of 64 rows
    assert terms["host.offloaded inputs"] == 12 * dense + 16 * sparse
    assert result.fitting.host_bytes <= 100 * GIB
    assert result.section({})["memory"] == {"pinned_buffers": "registered", "resident_checkpoints": 4}


def test_fewer_stored_inputs_halve_the_dense_layers_host_memory_where_the_host_is_short():
    """1M tokens on a 141 GB card (139 GiB) with 125 GiB of host memory, zero3_lemo.json (keep 0.4) with the tiled
    MLP: even registered buffers need more host memory than there is (16 dense inputs of 8 GiB, 16 sparse of 3.2
    GiB), and keeping layers on the device does not fit it; layers_per_stored_input 2 stores every other dense
    layer's input, with no more on the device. k = 3 holds one more input on the device."""
    shape, setup = main_job_setup(1048576, tiled_mlp=True)
    result = search.plan(shape, setup, 139 * GIB, 125 * GIB)
    assert [c.what for c in result.applied] == ["pinned_buffers registered", "layers_per_stored_input 2"]
    dense, sparse = 8 * GIB, 3.25 * GIB  # 8 GiB in 512 MiB granules; 0.4 x 16384 blocks of 64 rows in 256 MiB ones
    terms = result.fitting.terms
    assert terms["host.offloaded inputs"] == 8 * dense + 16 * sparse
    assert terms["stored inputs in flight (offloaded)"] == 2 * 1048576 * 4096 * 2
    assert result.section({})["memory"] == {"pinned_buffers": "registered", "layers_per_stored_input": 2}
    three = memory.predict(shape, dataclasses.replace(setup, pinned_buffers="registered", layers_per_stored_input=3))
    assert three.device_bytes - result.fitting.device_bytes == 1048576 * 4096 * 2
    assert three.terms["host.offloaded inputs"] == 6 * dense + 16 * sparse  # layers 0, 3, .., 15 of 16


def test_rebuilt_inputs_follow_runs_of_dense_layers():
    """Which layers' inputs layers_per_stored_input leaves to rebuild: in each run of dense layers all but every k-th
    from the run's start; sparse layers always store their kept rows."""
    ratios = (1.0, 1.0, 1.0, 1.0, 1.0, 0.4, 1.0, 1.0, 0.4)
    assert memory.rebuilt_inputs(ratios, 1) == [False] * 9
    assert memory.rebuilt_inputs(ratios, 2) == [False, True, False, True, False, False, False, True, False]
    assert memory.rebuilt_inputs(ratios, 3) == [False, True, True, False, True, False, False, True, False]


def test_zero3_parameter_offload_moves_the_weights_to_the_host():
    """zero_optimization.offload_param (ZeRO-3): the device holds two gathered decoder layers and the embedding-sized
    module instead of every weight; the host holds each parameter pinned (a power of two each). Not calibrated: no
    GPU run of it is committed yet."""
    section, ds_config = split_ds_config(load_ds_config(REPO / "ds_configs" / "zero3_lemo.json"))
    offload = {"offload_param": {"device": "cpu", "pin_memory": True}}
    ds_config = {**ds_config, "zero_optimization": {**ds_config["zero_optimization"], **offload}}
    shape, setup = job.job_setup(preset_config("llama-3-8b"), ds_config, section, seq_len=524288, lora_r=8)
    resident = memory.predict(shape, dataclasses.replace(setup, offload_params=None))
    offloaded = memory.predict(shape, setup)
    assert setup.offload_params == "cpu" and sum(shape.param_sizes()) == shape.params()
    assert offloaded.terms["weights"] == (2 * shape.layer_params() + shape.vocab * shape.hidden) * 2
    assert resident.device_bytes - offloaded.device_bytes == resident.terms["weights"] - offloaded.terms["weights"]
    # bf16: q and o 32 MiB, k and v 8 MiB, gate/up/down 112 -> 128 MiB, norms 8 KiB; embeddings 1002 -> 1024 MiB
    per_layer = 2 * 32 * MIB + 2 * 8 * MIB + 3 * 128 * MIB + 2 * 8 * 1024
    assert offloaded.terms["host.offloaded parameters"] == 32 * per_layer + 2 * 1024 * MIB + 8 * 1024
    # stage 2 has no parameter partitions to offload
    stage2 = {**ds_config, "zero_optimization": {**ds_config["zero_optimization"], "stage": 2}}
    assert job.job_setup(preset_config("llama-3-8b"), stage2, section, seq_len=4096, lora_r=8)[1].offload_params is None


def test_resident_layers_are_not_tried_where_the_device_is_short():
    """Keeping layers' inputs on the device helps only where the host is short: at 576K on an 80 GiB card with 128 GiB
    of host memory the device is, and the search goes from the tiled MLP and registered buffers to parameter offload
    without carrying 16 resident layers (72 GiB more on the device) into every later candidate."""
    shape, setup = main_job_setup(589824)
    result = search.plan(shape, setup, 80 * GIB, 128 * GIB)
    assert [c.what for c in result.applied] == ["tiled_mlp", "pinned_buffers registered", "offload_param cpu"]
    assert result.fitting.terms["stored inputs in flight (offloaded)"] == 2 * 589824 * 4096 * 2


@pytest.mark.parametrize("config", ["zero2_lemo.json", "zero3_lemo.json"])
def test_every_plan_is_a_config_the_section_accepts(config):
    """Over lengths, device and host sizes, every plan that fits pastes as a valid "lemo" section: the offload settings
    (registered buffers, resident layers) never stay in a plan whose offload the fit turned out not to need (with
    zero2_lemo.json, which has no offload, 128K on 60 GiB and a 10 GiB host: the tiled MLP and keep 0.2)."""
    from lemo_ds.config import parse_lemo_config

    raw = json.loads((REPO / "ds_configs" / config).read_text())["lemo"]
    section, ds_config = split_ds_config(load_ds_config(REPO / "ds_configs" / config))
    found = 0
    for seq in (65536, 131072, 262144, 393216, 655360):
        for gpu_gib, host_gib in ((40, 8), (60, 10), (80, 16), (80, 48), (80, 128), (139, 64), (139, 128)):
            shape, setup = job.job_setup(preset_config("llama-3-8b"), ds_config, section, seq_len=seq, lora_r=8)
            result = search.plan(shape, setup, gpu_gib * GIB, host_gib * GIB)
            if result.applied and result.found:
                found += 1
                parse_lemo_config(result.section(raw))  # raises LemoConfigError on an invalid combination
    assert found >= 5


@pytest.mark.parametrize("text,value", [("80GiB", 80 * GIB), ("128GB", 128 * 10**9), ("1MiB", MIB), ("512", 512)])
def test_parse_bytes(text, value):
    assert search.parse_bytes(text) == value


def test_parse_tokens():
    assert [search.parse_tokens(t) for t in ("32K", "1M", "4096")] == [32768, 1 << 20, 4096]


LLAMA3 = Shape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256)


def test_attention_backward_is_one_pieces_past_the_flash_limit():
    """Past torch's flash limit (CUDA, 16-bit) the attention's working set is one piece's (lemo_ds.attention_pieces):
    only its gradients grow with the length; below it, or on the CPU, everything does."""

    def attention(rows: int, **setup) -> int:
        return memory.attention_backward_bytes(LLAMA3, Setup(seq_len=rows, keep_ratios=(1.0,) * 32, **setup), rows)

    split = memory.pieces_from(LLAMA3, Setup(seq_len=1, keep_ratios=(1.0,) * 32))
    assert split == (2**31 - 1) // 4096 - 128 + 1
    below, at = split - 1, split
    assert attention(2 * 65536) == 2 * attention(65536)  # linear below the limit: 5.5 x h x b per token here
    assert attention(65536) == 65536 * 5.5 * 4096 * 2
    gradients = 128 * (32 + 2 * 8) * 2  # dq, dk, dv per token
    assert attention(2 * at) - attention(at) == at * gradients  # past it only the gradients grow
    assert attention(at) < attention(below) / 2
    assert attention(at, device="cpu") > attention(below, device="cpu")
    assert attention(at, attention_pieces=False) > attention(below, attention_pieces=False)
    assert memory.pieces_from(LLAMA3, Setup(seq_len=1, keep_ratios=(1.0,), device="cpu")) is None
    assert memory.pieces_from(LLAMA3, Setup(seq_len=1, keep_ratios=(1.0,), sp=2)) == 2 * split


def test_longest_fit_finds_lengths_past_the_drop_at_the_flash_limit():
    """The prediction drops where attention starts to run in pieces; the longest fit is searched on both sides."""
    setup = Setup(seq_len=1, keep_ratios=(1.0,) * 16 + (0.4,) * 16, liger_loss=True, offload_checkpoints=True,
                  tiled_mlp=True, pinned_buffers="registered")  # fmt: skip
    split = memory.pieces_from(LLAMA3, setup)
    just_below = memory.predict(LLAMA3, dataclasses.replace(setup, seq_len=(split - 1) // 64 * 64)).device_bytes
    past = memory.predict(LLAMA3, dataclasses.replace(setup, seq_len=-(-split // 64) * 64)).device_bytes
    assert past < just_below
    budget = math.ceil(past / (1 - memory.RESERVE_SHARE))  # the first length in pieces fits; just below it does not
    longest = search.longest_fit(LLAMA3, setup, int(budget), 1 << 50)
    assert longest >= split
    assert memory.fits(memory.predict(LLAMA3, dataclasses.replace(setup, seq_len=longest)), int(budget), 1 << 50)
    assert not memory.fits(memory.predict(LLAMA3, dataclasses.replace(setup, seq_len=longest + 64)), int(budget),
                           1 << 50)  # fmt: skip
