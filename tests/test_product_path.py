"""benchmarks/product_path.py on CPU: the main job and the baseline job (benchmarks/hf_liger_job.py) on the same rows,
the per-row FLOPs, the table against the baseline; and the harness's hf-liger variant leaving the model as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # benchmarks/ is a folder of the checkout, not an installed package

from benchmarks import product_path  # noqa: E402
from benchmarks.harness.flops import layer_lora_params, layer_weight_params, row_flops  # noqa: E402
from benchmarks.harness.shapes import get_shape  # noqa: E402

TINY = get_shape("tiny-llama")


def test_row_flops_count_attention_per_document():
    one = row_flops(TINY, [96], lora_rank=8)
    packed = row_flops(TINY, [40, 56], lora_rank=8)
    linear = TINY.layers * 6 * (layer_weight_params(TINY) + layer_lora_params(TINY, 8)) * 96
    head = 4 * TINY.hidden * TINY.vocab * 96
    attention = TINY.layers * 8 * TINY.heads * TINY.head_dim
    assert one["flops"] == linear + head + attention * 96**2
    assert packed["flops"] == linear + head + attention * (40**2 + 56**2)
    assert (packed["tokens"], packed["documents"]) == (96, 2)


@pytest.mark.slow
def test_main_job_and_baseline_run_on_the_same_rows(tmp_path, monkeypatch):
    books = tmp_path / "books"
    books.mkdir()
    for index in range(3):  # text of varied sizes: the longest makes the one-document rows
        (books / f"book{index}.txt").write_text("It was a dark and stormy night. " * (200 * (index + 1)))
    out = tmp_path / "out"
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the jobs' kernels in PyTorch: the interpreter only slows them
    product_path.main(["--model", "tiny-llama", "--seq", "256", "--rows", "packed", "--config",
                       "hf,ds_configs/zero3_lemo.json", "--books", str(books), "--doc-bytes", "100",
                       "--steps", "3", "--out", str(out)])  # fmt: skip
    (result_file,) = out.glob("product-path-*.json")
    result = json.loads(result_file.read_text())
    cases = {case["config"]: case for case in result["cases"]}
    assert set(cases) == {"hf", "ds_configs/zero3_lemo.json"}
    for case in cases.values():
        assert case["status"] == "ok", case.get("tail")
        assert case["timed_steps"] == 2 and case["s_per_step"] > 0 and case["tflops_per_s"] > 0
        rows = [(step["tokens"], step["documents"]) for step in case["steps"]]
        assert all(tokens == 256 and documents >= 3 for tokens, documents in rows)  # 100-byte documents, packed
    # Both jobs were handed the same rows: the same figures per step (they come from the rows, not the jobs).
    flops = {name: [step["flops"] for step in case["steps"]] for name, case in cases.items()}
    assert flops["hf"] == flops["ds_configs/zero3_lemo.json"]
    assert cases["hf"]["summary"]["kernels"] == "torch"
    lemo = cases["ds_configs/zero3_lemo.json"]["summary"]
    assert lemo["mean_keep_ratio"] < 1.0 and lemo["scorer"] == "predictor"
    table = product_path.table(result["cases"])
    assert "speed vs hf" in table and "| hf | packed | 256 |" in table and "| zero3_lemo | packed | 256 |" in table
    plot = tmp_path / "plot.png"
    product_path.main(["--plot", str(result_file), "--out", str(plot)])
    assert plot.stat().st_size > 0


def test_hf_liger_variant_is_undone():
    """The harness's hf-liger variant applies Liger's Llama patch (module globals and the modules' instance dicts) and
    undoes it exactly, so the next variant runs the plain model."""
    pytest.importorskip("liger_kernel")
    from transformers.models.llama import modeling_llama

    from benchmarks.harness.model import build_model
    from benchmarks.harness.variants import HF_LIGER, apply_liger

    assert HF_LIGER.liger and HF_LIGER.checkpointing and HF_LIGER.lemo is None
    bench = build_model(TINY, 256, torch.device("cpu"), torch.float32)
    before_globals = dict(vars(modeling_llama))
    before = [(module, dict(module.__dict__)) for module in bench.causal_lm.modules()]
    undo = apply_liger(bench.causal_lm)
    assert modeling_llama.apply_rotary_pos_emb is not before_globals["apply_rotary_pos_emb"]
    assert "forward" in bench.decoder.layers[0].mlp.__dict__  # Liger's SwiGLU on the instance
    undo()
    assert {k: v for k, v in vars(modeling_llama).items() if k in before_globals} == before_globals
    for module, saved in before:
        assert module.__dict__.keys() == saved.keys(), type(module).__name__
        assert all(module.__dict__[key] is value for key, value in saved.items())


def test_a_case_cut_by_its_timeout_keeps_what_the_job_printed(tmp_path):
    script = "import time; print('lemo_ds: predictors: calibrating', flush=True); time.sleep(60)"
    record = product_path.run_case([sys.executable, "-c", script, "--output-dir", str(tmp_path)], 3, rows=[])
    assert record["status"] == "timeout"
    assert record["job_lines"] == ["lemo_ds: predictors: calibrating"]


def test_a_case_cut_while_exiting_after_its_last_step_counts_as_finished(tmp_path):
    """A job that wrote its summary and then outlived the timeout while exiting (a long context's teardown frees tens
    of GiB of pinned host memory) trained: its figures are kept, flagged, and a max-context probe counts it a fit."""
    script = (
        "import json, pathlib, sys, time; out = pathlib.Path(sys.argv[2]); "
        "out.joinpath('metrics.jsonl').write_text(''.join(json.dumps({'step': i, 'step_time_s': 2.0 + i}) + '\\n' "
        "for i in (1, 2, 3))); "
        "out.joinpath('summary.json').write_text(json.dumps({'status': 'done', 'peak_mem_bytes': 3 << 30})); "
        "print('lemo_ds: done: step 3', flush=True); time.sleep(60)"
    )
    rows = [{"flops": 1e12, "tokens": 8, "documents": 1}] * 3
    record = product_path.run_case([sys.executable, "-c", script, "--output-dir", str(tmp_path)], 5, rows=rows)
    assert (record["status"], record["cut_while_exiting"], record["peak_gib"]) == ("ok", True, 3.0)
    assert record["s_per_step"] == 4.5 and record["timed_steps"] == 2
    assert product_path.OUTCOMES[record["status"]] == "fit"
    # a summary that says the job stopped early is no finish
    (tmp_path / "summary.json").write_text(json.dumps({"status": "stopped", "peak_mem_bytes": 1}))
    assert not product_path.finished(tmp_path)


def test_profile_job_memory_peak_refuses_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "profile_job.py"), "--memory-peak",
                             "--seq-len", "256"], capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip
    assert result.returncode != 0 and "--memory-peak needs CUDA" in result.stderr


def test_a_case_killed_by_sigkill_fails_its_length_as_out_of_memory(tmp_path):
    """The kernel's OOM killer ends a job whose host memory ran out with SIGKILL: a max-context probe then fails that
    length (outcome "oom") instead of stopping the search as a crash. Here the process kills itself the same way."""
    script = "import os, signal; print('lemo_ds: loading', flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    record = product_path.run_case([sys.executable, "-c", script, "--output-dir", str(tmp_path)], 60, rows=[])
    assert (record["status"], record["exit"]) == ("killed", -9)
    assert product_path.OUTCOMES[record["status"]] == "oom"
    # The deepspeed launcher's report of a rank killed so (it exits 1 itself)
    assert product_path.failure_status(1, "launch.py:259:main] [...] exits with return code = -9") == "killed"
    assert product_path.failure_status(1, "torch.OutOfMemoryError: CUDA out of memory") == "out of memory"
    assert product_path.failure_status(1, "ValueError: bad config") == "failed"


@pytest.mark.slow
def test_profile_job_profiles_steps_and_the_predictors_calibration(tmp_path):
    """benchmarks/profile_job.py runs launch/train.py's own job: the steps mode and the calibration mode."""
    config = json.loads((REPO / "ds_configs" / "zero3_lemo.json").read_text())
    config["lemo"].update({"scorer": "predictor", "predictor": {"calibration_batches": 1, "calibration_updates": 2}})
    path = tmp_path / "predictor.json"
    path.write_text(json.dumps(config))
    common = [sys.executable, str(REPO / "benchmarks" / "profile_job.py"), "--deepspeed", str(path), "--seq-len",
              "256", "--no-save", "--profile-out", str(tmp_path / "prof")]  # fmt: skip
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    modes = [(["--max-steps", "2", "--skip", "1", "--active", "1"], "job"), (["--calibration"], "job-calibration")]
    for extra, tag in modes:
        out = tmp_path / tag
        result = subprocess.run([*common, *extra, "--output-dir", str(out)], capture_output=True, text=True,
                                timeout=300, env=env, cwd=REPO)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        record = json.loads((tmp_path / "prof" / f"profile-{tag}.json").read_text())
        assert record["profiled_wall_s"] > 0
        assert "by self CPU time" in (tmp_path / "prof" / f"ops-{tag}.txt").read_text()
    phases = json.loads((tmp_path / "prof" / "phases-job-calibration.json").read_text())["phases_s"]
    assert phases["oracle labels"] > 0 and phases["predictor updates"] > 0
    assert phases["calibration"] >= phases["oracle labels"] + phases["predictor updates"]


# ---- the ALST-style baseline: hf_liger_job.py --tiled-mlp --offload-checkpoints ------------------------------------


def test_tiled_mlp_runs_in_tiles_and_gives_the_untiled_gradients():
    """hf_liger_job.tile_mlps: every decoder layer's MLP goes through DeepSpeed's TiledMLP (its output's grad_fn),
    and the loss and every gradient (the input's through the tiles' recompute, the MLP weights') are the untiled
    model's. 700 tokens over hidden 256: 3 tiles, the last one shorter."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from benchmarks import hf_liger_job
    from lemo_ds.training import model as job_model

    source = job_model.resolve_model("tiny-llama")
    plain = job_model.build_model(source, torch.float32, seed=0).train()
    tiled = job_model.build_model(source, torch.float32, seed=0).train()
    assert hf_liger_job.tile_mlps(tiled) == source.config.num_hidden_layers
    ids = torch.randint(0, 256, (1, 700))
    seen = []
    for layer in (m for m in tiled.modules() if isinstance(m, GradientCheckpointingLayer)):
        layer.mlp.register_forward_hook(lambda _m, _i, out: seen.append(type(out.grad_fn).__name__))
    losses = [net(input_ids=ids, labels=ids).loss for net in (plain, tiled)]
    assert seen == ["TiledMLPBackward"] * source.config.num_hidden_layers
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for (name, a), (_, b) in zip(plain.named_parameters(), tiled.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_baseline_steps_16_bit_adapters_on_float32_masters(dtype):
    """hf_liger_job.step_adapters: 16-bit adapters are stepped as DeepSpeed's bf16 optimizer steps them, AdamW and
    clipping on float32 masters, each adapter the rounding of its master; float32 adapters are stepped in place. Both
    against plain torch AdamW + clipping on float32 copies given the same gradients, for three steps (one adapter
    without a gradient)."""
    from benchmarks import hf_liger_job

    torch.manual_seed(0)
    initial = [torch.randn(5, 3) * 0.02, torch.zeros(3, 7), torch.randn(4)]
    grads = [[torch.randn_like(t) * scale for t in initial] for scale in (3.0, 0.5, 1e-3)]
    params = [torch.nn.Parameter(t.to(dtype).clone()) for t in initial]
    masters = [p.detach().float() if p.dtype != torch.float32 else p for p in params]
    optimizer = torch.optim.AdamW(masters, lr=2e-4, betas=hf_liger_job.BETAS, eps=1e-8, weight_decay=0.0)
    reference = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    expected_optimizer = torch.optim.AdamW(reference, lr=2e-4, betas=hf_liger_job.BETAS, eps=1e-8, weight_decay=0.0)
    for step_grads in grads:
        for param, ref, grad in zip(params, reference, step_grads):
            param.grad = None if param is params[2] else grad.to(dtype).clone()  # clipping scales it in place
            ref.grad = None if param is params[2] else grad.to(dtype).float().clone()
        hf_liger_job.step_adapters(params, masters, optimizer)
        torch.nn.utils.clip_grad_norm_(reference, hf_liger_job.CLIP)
        expected_optimizer.step()
        expected_optimizer.zero_grad(set_to_none=True)
        for param, master, ref in zip(params, masters, reference):
            assert param.grad is None and param.dtype == dtype
            torch.testing.assert_close(master, ref.detach(), rtol=0, atol=0)
            torch.testing.assert_close(param.detach(), ref.detach().to(dtype), rtol=0, atol=0)
    assert not torch.equal(params[1].float(), initial[1])  # the zero-initialised adapter moved
    assert torch.equal(params[2], initial[2].to(dtype))  # the one without a gradient did not


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_baseline_cuda_only_settings_are_refused_without_cuda(tmp_path):
    """hf_liger_job.py's settings a CPU run cannot honour stop it before the model is built, naming what to change:
    bf16 adapters (the CPU job is float32 throughout) and --memory-peak (the CUDA allocator's trace)."""
    from benchmarks import hf_liger_job

    with pytest.raises(SystemExit, match="--lora-dtype bfloat16: on a CPU this job runs in float32"):
        hf_liger_job.main(["--lora-dtype", "bfloat16", "--output-dir", str(tmp_path / "job")])
    with pytest.raises(SystemExit, match="--memory-peak records step 2 on CUDA"):
        hf_liger_job.main(["--memory-peak", "--profile-out", str(tmp_path / "prof"), "--max-steps", "2",
                           "--output-dir", str(tmp_path / "job")])  # fmt: skip
    assert not (tmp_path / "prof").exists()


@pytest.mark.slow
def test_alst_baseline_job_trains_the_plain_jobs_losses(tmp_path):
    """The product path's hf-liger-offload case without Liger (CPU): tiled MLP and the checkpoint offload change no
    loss; the offload was handed every layer's checkpointed input (on a CPU it copies none: no accelerator)."""
    common = ["--model", "tiny-llama", "--seq-len", "640", "--max-steps", "2"]  # 3 MLP tiles (hidden 256)
    runs = {}
    for name, extra in {"plain": [], "alst": ["--offload-checkpoints", "--tiled-mlp"]}.items():
        out = tmp_path / name
        result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "hf_liger_job.py"), "--kernels", "torch",
                                 *extra, *common, "--output-dir", str(out)], capture_output=True, text=True,
                                timeout=300, cwd=REPO)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (losses, json.loads((out / "summary.json").read_text()))
    assert runs["alst"][0] == pytest.approx(runs["plain"][0], rel=1e-5)
    summary = runs["alst"][1]
    assert summary["tiled_mlp"] and summary["offload_checkpoints"] and not runs["plain"][1]["tiled_mlp"]
    layers = get_shape("tiny-llama").layers
    assert summary["offload_stats"] == {"marked": layers, "offloaded": 0, "skipped": layers}
    command = product_path.case_command("hf-liger-offload", "tiny-llama", 256, None, 3, tmp_path)
    assert command[1:5] == ["benchmarks/hf_liger_job.py", "--kernels", "liger", "--offload-checkpoints"]
    assert "--tiled-mlp" in command and command[command.index("--lora-dtype") + 1] == "bfloat16"


@pytest.mark.parametrize(
    "call", ["onedoc128k", "maxctx-lemo", "maxctx-dense", "h100-384k-dense", "attention64k", "attention128k",
             "registered640k", "h100-512k-offload-param", "h100-512k-onedoc", "h100-512k-two-layers-per-input",
             "h100-512k-dense-same-memory", "h200-800k", "h200-1m", "h200-800k-launch-blocking", "large-tensors",
             "flash-limit", "onedoc384k", "dense-memory128k", "memory256k", "keep128k 0.6"]
)
def test_each_device_call_derives_valid_configs_and_valid_product_path_commands(tmp_path, call):
    """benchmarks/gpu_calls.sh, dry run: every config it derives passes the "lemo" section's validation and keeps
    one calibration batch; every product_path command it would run names configs that exist or known cases, and
    bounds its time (steps, or a search budget)."""
    import shlex

    from lemo_ds.config import load_ds_config, split_ds_config

    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_calls.sh"), *call.split()], capture_output=True,
                            text=True, timeout=60, cwd=REPO,
                            env={**os.environ, "OUT": str(tmp_path), "GPU_CALLS_DRY_RUN": "1"})  # fmt: skip
    call, *call_args = call.split()
    assert result.returncode == 0, result.stderr
    if call == "memory256k":  # not a product_path search: profile_job.py --memory-peak on the derived config
        (line,) = [shlex.split(line) for line in result.stdout.splitlines() if "profile_job.py" in line]
        steps, skip = (int(line[line.index(flag) + 1]) for flag in ("--max-steps", "--skip"))
        assert "--memory-peak" in line and steps > skip
        lemo, _ = split_ds_config(load_ds_config(line[line.index("--deepspeed") + 1]))
        assert lemo.memory.tiled_mlp and lemo.predictor.calibration_batches == 1
        return
    if call == "dense-memory128k":  # the baseline job's own trace of one step, not a search
        (line,) = [shlex.split(line) for line in result.stdout.splitlines() if "hf_liger_job.py" in line]
        assert {"--memory-peak", "--offload-checkpoints", "--tiled-mlp"} <= set(line)
        assert line[line.index("--profile-out") + 1] == str(tmp_path / call)
        assert int(line[line.index("--max-steps") + 1]) >= 2
        return
    if call == "h200-800k-launch-blocking":  # one step of launch/train.py on h200-800k's memory settings
        (line,) = [shlex.split(line) for line in result.stdout.splitlines() if "launch/train.py" in line]
        assert line[line.index("--max-steps") + 1] == "1" and line[line.index("--seq-len") + 1] == "819200"
        lemo, _ = split_ds_config(load_ds_config(line[line.index("--deepspeed") + 1]))
        assert lemo.memory.layers_per_stored_input == 2 and lemo.memory.pinned_buffers == "registered"
        return
    if call == "large-tensors":  # the past-2**31 tests on the GPU, not a job
        (line,) = [shlex.split(line) for line in result.stdout.splitlines() if "pytest" in line]
        tests = [word for word in line if word.startswith("tests/")]
        assert "tests/test_large_tensors.py" in tests and all((REPO / test).is_file() for test in tests)
        return
    if call == "flash-limit":  # a probe of torch's flash kernel, not a job
        (line,) = [shlex.split(line) for line in result.stdout.splitlines() if "flash_limit.py" in line]
        assert line[line.index("--out") + 1] == str(tmp_path / call)
        return
    commands = [shlex.split(line) for line in result.stdout.splitlines() if "product_path.py" in line]
    assert commands
    for command in commands:
        args = command[command.index("benchmarks/product_path.py") + 1 :]
        configs = args[args.index("--config") + 1].split(",")
        for config in configs:
            if config not in product_path.BASELINES:
                lemo, _ = split_ds_config(load_ds_config(config))
                assert lemo.predictor.calibration_batches == 1 and Path(config).parent == tmp_path / call
                if call == "keep128k":
                    assert lemo.keep_ratio == float(call_args[0])
                if call == "h100-512k-dense-same-memory":  # the config lemo's 512K + 64 ran, every layer dense
                    ran = "max-context-20261207/zero3_lemo-tiled-offload-param-two-layers-per-input.json"
                    lemo_job, ds_job = split_ds_config(load_ds_config(REPO / "benchmarks" / "results" / ran))
                    _, ds = split_ds_config(load_ds_config(config))
                    assert lemo.keep_ratio == 1.0 and lemo.memory == lemo_job.memory
                    assert ds["zero_optimization"] == ds_job["zero_optimization"]
        assert ("--budget-s" if "--maxctx" in args else "--steps") in args


def test_accuracy_device_calls_name_the_reference_and_the_runs(tmp_path):
    """benchmarks/gpu_calls.sh granularity-a|granularity-d, dry run: granularity.sh on reference A with every run, on
    reference D with dense and the runs named after the call (refused without them)."""
    import shlex

    def dry_run(*args):
        return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_calls.sh"), *args], capture_output=True,
                              text=True, timeout=60, cwd=REPO,
                              env={**os.environ, "OUT": str(tmp_path), "GPU_CALLS_DRY_RUN": "1"})  # fmt: skip

    a = dry_run("granularity-a")
    assert a.returncode == 0, a.stderr
    (line,) = [shlex.split(line) for line in a.stdout.splitlines() if "granularity.sh" in line]
    assert line[0] == "REFERENCE=A" and "--only" not in line and "passkey_rows=0" in line
    d = dry_run("granularity-d", "predictor@0.4+attention")
    assert d.returncode == 0, d.stderr
    (line,) = [shlex.split(line) for line in d.stdout.splitlines() if "granularity.sh" in line]
    assert line[0] == "REFERENCE=D" and line[line.index("--only") + 1] == "dense,predictor@0.4+attention"
    refused = dry_run("granularity-d")
    assert refused.returncode != 0 and "needs the run names" in refused.stderr
    for call, reference, passkey_rows in (("keep-a", "A", True), ("keep-d", "D", False)):
        keep = dry_run(call, "0.5,0.6")
        assert keep.returncode == 0, keep.stderr
        (line,) = [shlex.split(line) for line in keep.stdout.splitlines() if "keep_ratio.sh" in line]
        assert line[0] == f"REFERENCE={reference}" and line[line.index(str(tmp_path / call)) + 1] == "0.5,0.6"
        assert ("passkey_rows=0" in line) == passkey_rows
        refused = dry_run(call)
        assert refused.returncode != 0 and "needs the keep ratios" in refused.stderr
