"""The longest context of the main job itself (benchmarks/product_path.py --maxctx): benchmarks/maxctx.py's search with
a probe runner of its own, the product path's cases as probes, and one real search on CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # benchmarks/ is a folder of the checkout, not an installed package

from benchmarks import maxctx, product_path  # noqa: E402

K16 = 16384


def threshold_runner(limit: int, probed: list[int]):
    def runner(seq: int, timeout_s: float) -> dict:
        probed.append(seq)
        return {"seq": seq, "outcome": "fit" if seq <= limit else "oom", "wall_s": 0.0}

    return runner


def new_record(start: int = 16 * K16, granularity: int = K16, max_seq: int = 64 * K16) -> dict:
    return {"config": "fake", "start": start, "granularity": granularity, "max_seq": max_seq, "probes": []}


def test_search_takes_any_probe_runner():
    probed: list[int] = []
    written = []
    record = maxctx.search(new_record(), threshold_runner(400_000, probed), 600, None,
                           lambda r: written.append(r["max_fit_seq"]), "fake")  # fmt: skip
    # x1.25 to the granularity until a length fails (16 -> 20 -> 25 granules), then halving the gap to one granule.
    assert probed == [k * K16 for k in (16, 20, 25, 22, 23, 24)]
    assert record["max_fit_seq"] == 24 * K16 and record["min_fail_seq"] == 25 * K16
    assert record["complete"] and record["stop_reason"] == "bounds met" and not record["non_monotonic"]
    assert [p["seq"] for p in record["probes"]] == probed and len(written) == len(probed) + 1

    # Everything fits: growth stops at --max-seq, the search is complete.
    probed.clear()
    record = maxctx.search(new_record(max_seq=30 * K16), threshold_runner(10**9, probed), 600, None, lambda r: None, "")
    assert probed == [k * K16 for k in (16, 20, 25)]
    assert record["complete"] and record["stop_reason"] == f"reached --max-seq {30 * K16}"

    # Resumed: the earlier probes count, the search goes on from them.
    probed.clear()
    earlier = new_record()
    earlier["probes"] = [{"seq": 16 * K16, "outcome": "fit"}, {"seq": 25 * K16, "outcome": "timeout"}]
    record = maxctx.search(earlier, threshold_runner(400_000, probed), 600, None, lambda r: None, "")
    assert probed == [k * K16 for k in (20, 22, 23, 24)] and record["max_fit_seq"] == 24 * K16


def test_search_stops_on_a_crash_and_on_the_budget(monkeypatch):
    def crash(seq: int, timeout_s: float) -> dict:
        return {"seq": seq, "outcome": "error", "wall_s": 0.0}

    record = maxctx.search(new_record(), crash, 600, None, lambda r: None, "")
    assert not record["complete"] and "crashed" in record["stop_reason"] and len(record["probes"]) == 1

    # A probe cut short by the deadline (not by the per-probe limit) says nothing; then no probe starts.
    now = [1000.0]
    monkeypatch.setattr(maxctx, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def slow(seq: int, timeout_s: float) -> dict:
        assert timeout_s == 60  # what is left of the budget, under the per-probe limit
        now[0] += timeout_s
        return {"seq": seq, "outcome": "timeout", "wall_s": timeout_s}

    record = maxctx.search(new_record(), slow, 600, now[0] + 60, lambda r: None, "")
    assert [p["outcome"] for p in record["probes"]] == ["budget"]
    assert record["stop_reason"] == "budget spent" and not record["complete"] and record["max_fit_seq"] is None


def test_a_case_is_a_probe(monkeypatch, tmp_path):
    """probe_case: the case's command with the memory planner's check off, its status as a probe's outcome."""
    commands = []

    def fake_case(command, timeout, rows):
        commands.append(command)
        seq = int(command[command.index("--seq-len") + 1])
        if seq > 2048:
            return {"status": "out of memory", "wall_s": 1.0, "exit": 1, "job_lines": [], "tail": "OutOfMemoryError"}
        return {"status": "ok", "wall_s": 2.0, "exit": 0, "job_lines": [], "summary": {"peak_mem_bytes": 3 << 30},
                "steps": rows, "s_per_step": 0.5, "tflops_per_s": 1.0, "timed_steps": 1, "peak_gib": 3.0}  # fmt: skip

    monkeypatch.setattr(product_path, "run_case", fake_case)
    monkeypatch.setattr(product_path, "row_figures", lambda model, data, seq, steps: [{"tokens": seq}] * steps)
    fit = product_path.probe_case("ds_configs/zero3_lemo.json", "tiny-llama", None, 2048, 2, 60)
    assert fit["outcome"] == "fit" and fit["s_per_step"] == 0.5 and fit["peak_allocated_gib"] == 3.0
    assert "--memory-check off" in fit["command"] and fit["steps"] == [{"tokens": 2048}] * 2
    oom = product_path.probe_case("hf-liger", "tiny-llama", None, 4096, 2, 60)
    assert oom["outcome"] == "oom" and "--memory-check" not in oom["command"]  # the baseline job has no planner
    assert set(product_path.OUTCOMES.values()) == {"fit", "oom", "timeout", "error"}

    # The command line: one search per (config, rows), one JSON, resumable.
    monkeypatch.setattr(product_path, "child_device_info", lambda: {"cuda_available": False})
    out = tmp_path / "out"
    common = ["--maxctx", "--model", "tiny-llama", "--rows", "stdlib", "--config", "hf,ds_configs/zero3_lemo.json",
              "--start", "1024", "--granularity", "512", "--max-seq", "8192", "--out", str(out)]  # fmt: skip
    assert product_path.main(common) == 0
    (path,) = out.glob("product-maxctx-*.json")
    result = json.loads(path.read_text())
    assert result["status"] == "complete" and result["git"] and result["versions"] and result["device"]
    assert [(s["config"], s["rows"]) for s in result["searches"]] == [("hf", "stdlib"),
                                                                      ("ds_configs/zero3_lemo.json", "stdlib")]
    for search in result["searches"]:
        assert (search["max_fit_seq"], search["min_fail_seq"], search["stop_reason"]) == (2048, 2560, "bounds met")
        assert [p["seq"] for p in search["probes"]] == [1024, 1536, 2048, 2560]
    commands.clear()
    assert product_path.main([*common, "--resume", str(path), "--out", str(tmp_path / "again")]) == 0
    assert commands == []  # every probe came from the earlier result


@pytest.mark.slow
def test_the_main_jobs_longest_context_on_cpu(tmp_path, monkeypatch):
    """One real probe: launch/train.py (tiny preset, stdlib rows) at 256 tokens; --max-seq ends the search."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the job's kernels in PyTorch: the interpreter only slows them
    status = product_path.main(["--maxctx", "--model", "tiny-llama", "--rows", "stdlib", "--config",
                                "ds_configs/zero3_lemo.json", "--start", "256", "--granularity", "256", "--max-seq",
                                "256", "--case-timeout", "300", "--out", str(tmp_path)])  # fmt: skip
    (path,) = tmp_path.glob("product-maxctx-*.json")
    result = json.loads(path.read_text())
    (search,) = result["searches"]
    assert status == 0, [probe.get("error") for probe in search["probes"]]
    assert search["stop_reason"] == "reached --max-seq 256" and search["complete"]
    (probe,) = search["probes"]
    assert probe["outcome"] == "fit", probe.get("error")
    assert probe["s_per_step"] > 0 and probe["timed_steps"] == 1 and probe["peak_allocated_gib"] > 0
    assert "--memory-check off" in probe["command"] and [s["tokens"] for s in probe["steps"]] == [256, 256]
    assert search["max_fit_seq"] == 256 and search["min_fail_seq"] is None
