"""The benchmark harness (benchmarks/) on CPU: the smoke suite end to end, the report, out-of-memory as a result,
the chunked loss against Hugging Face's, the FLOPs formula and the longest-context search.

    python -m pytest -q tests/test_benchmarks.py

The runs that need a fresh process (the smoke suite, a run under a real memory cap, the maxctx probes) start
together, as subprocesses, so the whole file stays well under a minute on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # benchmarks/ is a folder of the checkout, not an installed package

from benchmarks import maxctx, report  # noqa: E402
from benchmarks.harness import losses  # noqa: E402
from benchmarks.harness.flops import layer_lora_params, layer_weight_params, step_flops  # noqa: E402
from benchmarks.harness.measure import StepOutcome, TrainingStep, is_oom, measure_configuration, summarize  # noqa: E402
from benchmarks.harness.model import build_model, random_batch  # noqa: E402
from benchmarks.harness.shapes import get_shape  # noqa: E402
from benchmarks.harness.suites import MaxCtxTarget, get_suite  # noqa: E402
from benchmarks.harness.variants import activate, deactivate, dense_variant, get_variant, lemo_variant  # noqa: E402
from lemo_ds.decoder_layer import is_sparse_layer  # noqa: E402

TINY = get_shape("tiny-llama")

# Every key of a variant's record in the result JSON.
RECORD_KEYS = {
    "name", "checkpointing", "loss", "lemo", "liger", "loss_impl", "oom", "oom_phase", "oom_error",
    "oom_inferred_from_seq", "error", "steps", "timing", "step_time_s", "warmup_s", "tokens_per_s",
    "peak_allocated_gib", "peak_allocated_gib_steps", "peak_reserved_gib", "peak_reserved_gib_steps_max", "memory_note",
    "mean_keep_ratio", "keep_ratio_per_layer", "model_flops", "model_flops_frozen", "flops_parts", "mfu",
    "mfu_frozen", "loss_value",
}


def _start_run(args: list[str], out: Path) -> subprocess.Popen:
    # Without TRITON_INTERPRET (set by conftest for the kernel tests) lemo_ds's "auto" kernels are PyTorch on
    # CPU: the interpreter would only slow the harness down, and the kernels have their own tests.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return subprocess.Popen([sys.executable, "benchmarks/run.py", *args, "--out", str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**env, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The smoke suite, and the smoke suite's dense variants under a 1 MiB memory cap (a real CPU OOM)."""
    smoke_dir = tmp_path_factory.mktemp("smoke")
    cap_dir = tmp_path_factory.mktemp("cap")
    processes = {
        "smoke": (_start_run(["--suite", "smoke"], smoke_dir), smoke_dir),
        "cap": (_start_run(["--suite", "smoke", "--variant", "dense,dense+ckpt+chunked-loss", "--steps", "1",
                            "--mem-cap-gib", "0.001", "--no-report"], cap_dir), cap_dir),
    }
    finished = {}
    for name, (process, out_dir) in processes.items():
        output, _ = process.communicate(timeout=300)
        files = sorted(out_dir.glob("*.json"))
        finished[name] = {"rc": process.returncode, "output": output, "dir": out_dir, "files": files}
    return finished


def _single_result(run: dict) -> dict:
    assert run["rc"] == 0, run["output"][-4000:]
    assert len(run["files"]) == 1, run["files"]
    return json.loads(run["files"][0].read_text())


@pytest.mark.slow
def test_smoke_suite_records_every_field(runs):
    result = _single_result(runs["smoke"])
    assert result["status"] == "complete" and result["kind"] == "measure"
    for key in ("command", "environment", "settings", "notes", "configurations"):
        assert key in result
    env = result["environment"]
    for key in ("hostname", "gpu_name", "versions", "git"):
        assert key in env
    for package in ("torch", "transformers", "peft", "triton", "deepspeed", "liger-kernel"):
        assert package in env["versions"]
    assert {"commit", "dirty"} <= set(env["git"])
    assert "benchmarks/run.py --suite smoke" in result["command"]
    assert "6*H*d*T_l^2" in result["notes"]["flops_formula"]

    (config,) = result["configurations"]
    assert config["complete"] and config["seq"] == 256 and config["shape"] == "tiny-llama"
    check = config["model"]["chunked_loss_check"]
    assert check["impl"] == "torch" and check["abs_diff"] < 1e-4
    names = [record["name"] for record in config["variants"]]
    assert names == [v.name for v in get_suite("smoke").variants]
    for record in config["variants"]:
        assert set(record) == RECORD_KEYS, set(record) ^ RECORD_KEYS
        assert not record["oom"] and record["error"] is None, record["error"]
        assert record["steps"] == 2 and len(record["step_time_s"]["values"]) == 2
        assert record["step_time_s"]["p20"] <= record["step_time_s"]["median"] <= record["step_time_s"]["p80"]
        assert record["tokens_per_s"] > 0 and record["model_flops"] > 0
        # CPU: memory is not measured, and the record says so.
        assert record["peak_allocated_gib"] is None and "not measured" in record["memory_note"]
        assert len(record["keep_ratio_per_layer"]) == TINY.layers
        if record["lemo"] is None or record["lemo"].get("keep_ratio") == 1.0:  # dense, or dense + memory stack
            assert record["mean_keep_ratio"] == 1.0
        else:
            assert record["mean_keep_ratio"] < 1.0
            # lemo_ds's "auto" dense layers: the first half and the last layer.
            assert record["keep_ratio_per_layer"][: TINY.layers // 2] == [1.0] * (TINY.layers // 2)
            assert record["keep_ratio_per_layer"][-1] == 1.0
            assert record["model_flops"] < config["variants"][0]["model_flops"]
        expected_impl = {"hf": "hf", "chunked": "torch-chunked-ce"}[record["loss"]]
        assert record["loss_impl"] == expected_impl


@pytest.mark.slow
def test_smoke_suite_prints_the_table_last_and_writes_the_report(runs, tmp_path):
    run = runs["smoke"]
    last_lines = run["output"].strip().splitlines()[-(2 + len(get_suite("smoke").variants)) :]
    assert last_lines[0].startswith("| shape | tokens | variant |")
    assert all(line.startswith("| tiny-llama | 256 |") for line in last_lines[2:])
    stem = run["files"][0].stem
    for suffix in (".md", "-tiny-llama-memory.png", "-tiny-llama-step-time.png"):
        assert (run["dir"] / f"{stem}{suffix}").is_file()

    written = report.write_report(run["files"], tmp_path / "report")
    markdown = (tmp_path / "report" / f"{stem}.md").read_text()
    assert "| tiny-llama | 256 | lemo-oracle+ckpt+chunked-loss |" in markdown
    pngs = [path for path in written if path.suffix == ".png"]
    assert len(pngs) == 2
    for path in pngs:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({path.name})" in markdown


@pytest.mark.slow
def test_real_memory_cap_gives_an_oom_record_and_the_run_goes_on(runs):
    result = _single_result(runs["cap"])
    assert result["settings"]["memory_cap"]["gib"] == 0.001
    dense, chunked = result["configurations"][0]["variants"]
    assert dense["oom"] and dense["oom_phase"] == "warmup"
    assert "can't allocate memory" in dense["oom_error"]
    assert dense["steps"] == 0 and dense["step_time_s"]["median"] is None and dense["mean_keep_ratio"] is None
    # The next variant was still run: it either fitted in what the failed one freed, or ran out itself.
    assert chunked["oom"] or chunked["steps"] == 1


def test_cuda_oom_in_a_step_is_a_result_not_a_crash():
    """An actual torch.cuda.OutOfMemoryError raised by a step: recorded, cleaned up, the other variant goes on."""
    big, small = dense_variant(), lemo_variant("norm")
    calls = {big.name: 0, small.name: 0}
    cleanups = []

    def step(variant, clean_cache):
        calls[variant.name] += 1
        if variant is big and calls[big.name] == 2:  # the warm-up fits, the first measured step does not
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return StepOutcome(0.5, 1.0, 10 * 2**30, 12 * 2**30, [1.0] * 4 + [0.4] * 3 + [1.0])

    rounds = []
    runs = measure_configuration(step, lambda: cleanups.append(1), [big, small], warmup=1, steps=3,
                                 log=lambda _: None, after_round=lambda r: rounds.append(1))
    assert calls == {big.name: 2, small.name: 4}  # no retry after the OOM
    assert len(cleanups) == 1 and len(rounds) == 3
    assert runs[big.name].oom and runs[big.name].oom_phase == "step"
    assert runs[big.name].oom_error.startswith("OutOfMemoryError: CUDA out of memory")
    record = summarize(runs[big.name], TINY, 256, 8, 989e12, "hf", "cuda-events", cuda=True)
    assert set(record) == RECORD_KEYS and record["oom"] and record["steps"] == 0 and record["mfu"] is None
    ok = summarize(runs[small.name], TINY, 256, 8, 989e12, "hf", "cuda-events", cuda=True)
    assert ok["steps"] == 3 and ok["peak_allocated_gib"] == 10.0 and ok["peak_reserved_gib"] == 12.0
    assert ok["mean_keep_ratio"] == pytest.approx((5 + 3 * 0.4) / 8) and ok["mfu"] > 0

    # A variant known to run out of memory at a shorter sequence is recorded without running.
    calls = {big.name: 0, small.name: 0}
    runs = measure_configuration(step, lambda: None, [big, small], 1, 1, log=lambda _: None,
                                 inferred_oom={big.name: 128})
    assert calls[big.name] == 0 and runs[big.name].oom_inferred_from_seq == 128


def test_switching_variants_on_one_model_leaves_nothing_behind():
    bench = build_model(TINY, 256, torch.device("cpu"), torch.float32)
    embeddings = bench.causal_lm.get_input_embeddings()
    layers = bench.decoder.layers
    for name in ("dense+ckpt", "lemo-norm", "lemo-oracle+ckpt+chunked-loss", "dense+ckpt", "dense") * 2:
        variant = get_variant(name)
        activate(bench, variant)
        assert layers[0].gradient_checkpointing == variant.checkpointing
        # The input-grad hook is there only with checkpointing, and never more than one.
        assert len(embeddings._forward_hooks) == int(variant.checkpointing)
        assert is_sparse_layer(layers[5]) == variant.is_lemo
    deactivate(bench)
    assert not embeddings._forward_hooks and not layers[0].gradient_checkpointing
    assert len({type(layer) for layer in layers}) == 1


def test_packed_rows_turn_document_attention_on_once_per_activation(monkeypatch):
    import lemo_ds

    bench = build_model(TINY, 256, torch.device("cpu"), torch.float32)
    step = TrainingStep(bench, random_batch(TINY.vocab, 256, bench.device, documents=4), chunked_impl="torch")
    calls = []
    enable = lemo_ds.enable_document_attention
    monkeypatch.setattr(lemo_ds, "enable_document_attention", lambda model: calls.append(1) or enable(model))
    base = bench.causal_lm
    for name in ("dense", "dense", "lemo-norm", "lemo-norm", "dense"):
        step(get_variant(name))
        assert "_lemo_attention" in base.__dict__  # dense and lemo variants alike attend within documents
    assert len(calls) == 3  # at each switch of variant, not at each step
    deactivate(bench)
    assert "_lemo_attention" not in base.__dict__  # the plain model again


def test_errors_other_than_oom_are_not_taken_for_oom():
    assert is_oom(torch.cuda.OutOfMemoryError("x")) and is_oom(MemoryError())
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert is_oom(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"))
    assert not is_oom(RuntimeError("shape mismatch")) and not is_oom(ValueError("x"))


@pytest.mark.parametrize("documents", [1, 7])
def test_chunked_loss_matches_hf_loss_and_gradients(documents):
    bench = build_model(TINY, 300, torch.device("cpu"), torch.float64)
    batch = random_batch(TINY.vocab, 300, bench.device, documents=documents)
    labels = batch.labels  # [1, 300]
    if documents > 1:  # a packed row: positions restart at each of its documents, whose first tokens are no targets
        assert int((batch.position_ids == 0).sum()) == documents and int((labels == -100).sum()) == documents - 1
    trainable = [p for p in bench.model.parameters() if p.requires_grad]
    with torch.no_grad():  # LoRA B starts at zero; make the adapters matter
        for param in trainable:
            param.normal_(0.0, 0.1)

    def loss_and_grads(compute):
        bench.model.zero_grad(set_to_none=True)
        loss = compute()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainable]

    hf_loss, hf_grads = loss_and_grads(lambda: bench.model(**batch.inputs(), labels=labels).loss)
    hidden = lambda: losses.final_hidden_states(bench.model, bench.decoder, batch.inputs())  # noqa: E731
    chunk_loss, chunk_grads = loss_and_grads(
        lambda: losses.chunked_loss(hidden(), bench.lm_head_weight, labels, "torch", chunk_tokens=128))
    # HF computes the cross-entropy in float32 (logits.float()), and so does the chunked loss: the same math,
    # so the same loss; gradients differ only by float32 rounding (softmax vs log_softmax's backward).
    torch.testing.assert_close(chunk_loss, hf_loss, rtol=1e-6, atol=1e-7)
    for ours, theirs in zip(chunk_grads, hf_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6 * theirs.abs().max().item())

    # The LM head trained too (full fine-tuning): its gradient matches as well.
    weight = bench.lm_head_weight.detach().clone().requires_grad_(True)  # [V, h]
    states = hidden().detach()  # [1, s, h]
    reference = torch.nn.functional.cross_entropy((states[0, :-1] @ weight.t()).float(), labels[0, 1:],
                                                  ignore_index=-100)
    (expected,) = torch.autograd.grad(reference, weight)
    (got,) = torch.autograd.grad(losses.chunked_loss(states, weight, labels, "torch", chunk_tokens=77), weight)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


def test_flops_count_the_tokens_each_layer_processed():
    seq, rank = 1024, 8
    dense = step_flops(TINY, seq, [1.0] * TINY.layers, rank)
    per_layer = (6 * layer_weight_params(TINY) + 6 * layer_lora_params(TINY, rank)) * seq
    per_layer += 6 * TINY.heads * TINY.head_dim * seq**2
    assert dense["model_flops"] == TINY.layers * per_layer + 6 * TINY.hidden * TINY.vocab * seq
    sparse = step_flops(TINY, seq, [1.0] * 7 + [0.5], rank)  # one layer at half the tokens
    saved = dense["model_flops"] - sparse["model_flops"]
    half = seq // 2
    expected = (6 * layer_weight_params(TINY) + 6 * layer_lora_params(TINY, rank)) * half
    expected += 6 * TINY.heads * TINY.head_dim * (seq**2 - half**2)  # attention: quadratic in kept tokens
    assert saved == expected
    assert dense["model_flops_frozen"] < dense["model_flops"]


# ---- longest context --------------------------------------------------------------------------------------

def test_maxctx_search_finds_the_boundary_at_the_granularity(tmp_path, monkeypatch):
    limit = 233 * 1024  # the longest length that "fits" in this fake
    probed = []

    def fake_probe(shape, variant, seq, settings, timeout_s, documents=1):
        probed.append(seq)
        return {"seq": seq, "outcome": "fit" if seq <= limit else "oom", "wall_s": 0.0}

    monkeypatch.setattr(maxctx, "run_probe", fake_probe)
    status = maxctx.main(["--shape", "tiny-llama", "--variant", "dense", "--start", str(224 * 1024),
                          "--out", str(tmp_path), "--no-report"])
    assert status == 0
    (path,) = tmp_path.glob("maxctx-*.json")
    result = json.loads(path.read_text())
    (search,) = result["searches"]
    assert search["complete"] and search["max_fit_seq"] == 232 * 1024 and search["min_fail_seq"] == 236 * 1024
    assert len(search["probes"]) == len(probed) <= 8 and all(seq % 4096 == 0 for seq in probed)

    # Resume: the earlier probes count, nothing is probed twice.
    probed.clear()
    assert maxctx.main(["--resume", str(path), "--out", str(tmp_path / "again"), "--no-report"]) == 0
    assert probed == []

    # Nothing fits: halving down to the granularity.
    limit = 0
    probed.clear()
    maxctx.main(["--shape", "tiny-llama", "--variant", "dense", "--start", "16384", "--out", str(tmp_path / "n"),
                 "--no-report"])
    assert probed == [16384, 8192, 4096]


@pytest.mark.slow
def test_maxctx_probes_run_in_fresh_processes_with_real_oom_and_timeouts():
    settings = maxctx.ProbeSettings(dtype=None, chunked_impl="auto", mem_cap_gib=0.075, timeout_s=120)
    with ThreadPoolExecutor(3) as pool:
        fit = pool.submit(maxctx.run_probe, "tiny-llama", "dense", 1024, settings, 120)
        oom = pool.submit(maxctx.run_probe, "tiny-llama", "dense", 16384, settings, 120)
        slow = pool.submit(maxctx.run_probe, "tiny-llama", "dense", 1024, settings, 0.5)
    fit, oom, slow = fit.result(), oom.result(), slow.result()
    assert fit["outcome"] == "fit" and fit["step_s"] > 0 and fit["mean_keep_ratio"] == 1.0, fit
    assert oom["outcome"] == "oom" and "can't allocate memory" in oom["error"], oom
    assert slow["outcome"] == "timeout", slow


def test_suites_are_declared_as_asked():
    paper, long, found = get_suite("paper"), get_suite("long"), get_suite("foundation")
    assert {c.shape for c in paper.configs} == {"llama2-7b", "llama3-8b"}
    assert sorted({c.seq for c in paper.configs}) == [4096, 8192, 16384]
    assert [v.name for v in paper.variants] == ["dense", "lemo-norm", "lemo-oracle"]
    assert [c.seq for c in long.configs] == [32768, 65536, 131072]
    assert all(v.checkpointing for v in long.variants + found.variants)
    assert all(v.lemo["keep_ratio"] == 0.4 for v in found.variants if v.lemo)
    targets = get_suite("maxctx").maxctx
    assert all(isinstance(t, MaxCtxTarget) and t.granularity == 4096 for t in targets)


# ---- benchmarks/memory_peak.py: replay of the allocator trace ------------------------------------------------


def test_memory_peak_replay_finds_the_peak_and_what_was_alive():
    from benchmarks.memory_peak import frame_key, replay

    def alloc(addr, size, where):
        return {"action": "alloc", "addr": addr, "size": size, "frames": [{"filename": f"/x/lemo_ds/{where}.py",
                                                                           "line": 1, "name": where}]}

    trace = [alloc(1, 100, "a"), alloc(2, 50, "b"), {"action": "free_requested", "addr": 1, "size": 100},
             {"action": "free_completed", "addr": 1, "size": 100}, alloc(3, 120, "c"), alloc(4, 10, "d"),
             {"action": "free_completed", "addr": 3, "size": 120}, alloc(5, 20, "e")]
    peak, live = replay(trace)
    # 100+50=150, then 50, 170 (b + c), 180 (+ d), 60, 80: the peak is b, c and d.
    assert peak == 180 and sorted(live) == [2, 3, 4]
    assert frame_key(live[3]["frames"], 2) == "lemo_ds/c.py:1 (c)"
    assert frame_key([{"filename": "/usr/lib/python3/threading.py", "line": 3, "name": "run"}], 2) == \
        "(no Python frame)"


def test_memory_peak_refuses_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    done = subprocess.run([sys.executable, "benchmarks/memory_peak.py", "--seq", "64", "--variant", "dense",
                           "--out", "/tmp/unused"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode != 0 and "needs CUDA" in done.stderr


def test_lemo_overrides_merge_into_sub_sections_and_leave_dense_variants_alone():
    from benchmarks.harness.variants import get_variant, parse_lemo_overrides, with_lemo_overrides

    overrides = parse_lemo_overrides(["kernels=torch", "memory.compact_saves=false", "keep_ratio=0.5"])
    assert overrides == {"kernels": "torch", "memory": {"compact_saves": False}, "keep_ratio": 0.5}
    stack = get_variant("lemo-oracle+ckpt+stack")
    changed = with_lemo_overrides(stack, overrides, tag="[x]")
    assert changed.name == "lemo-oracle+ckpt+stack[x]" and changed.lemo["kernels"] == "torch"
    assert changed.lemo["memory"] == {**stack.lemo["memory"], "compact_saves": False}  # other memory keys kept
    assert stack.lemo["memory"]["compact_saves"] is True  # the registered variant is not changed
    dense = get_variant("dense+ckpt")
    assert with_lemo_overrides(dense, overrides) is dense
    with pytest.raises(SystemExit, match="--lemo-set"):
        parse_lemo_overrides(["no_value"])
