"""The main job as users run it, against what they would run instead, on the same rows.

Every case is one process: ``deepspeed --num_gpus 1 launch/train.py --deepspeed CONFIG ...`` for a DeepSpeed config,
or, for the case named ``hf-liger``, ``python benchmarks/hf_liger_job.py`` (Hugging Face + Liger-Kernel + activation
checkpointing + packing, no DeepSpeed: what a user runs instead; ``hf`` is the same without Liger, on any device;
``hf-liger-offload`` adds ALST's single-GPU memory features, offloaded layer inputs and tiled MLP: the dense stack for
the longest context).
Both read ``--data`` through lemo_ds.training.data with the same seed, so step i of every case trains on the same
row i. Kinds of rows (``--rows``):

- ``packed``: the books of ``--books`` cut into documents of ``--doc-bytes`` bytes (4 KB: 16-17 documents per 64K
  row), written to a JSONL file that the jobs read;
- ``one-doc``: the three longest books whole (each row is a chunk of one book, unless it straddles two);
- ``stdlib``: the main job's own default data (the Python standard library: documents of every size).

Figures come from each job's metrics.jsonl (every step's time) and summary.json (peak allocated memory): s/step is
the median over the steps after the first (warm-up), and TFLOP/s is each step's row FLOPs (``harness.flops.row_flops``:
the dense job's work on that row, attention counted per document) over that step's time, median, so that rows of
different documents compare and a sparse job reads as dense-equivalent throughput.

    python benchmarks/product_path.py --model llama-3-8b --seq 65536,131072 --rows packed,one-doc \\
        --config hf-liger,ds_configs/zero3_lemo.json,ds_configs/zero3_dense_stack.json --books BOOKS --out $OUT

Writes ``<out>/product-path-<time>.json`` after every case (machine, commit, versions, each command, its summary and
per-step figures) and prints a Markdown table last, each case's speed and memory also relative to ``hf-liger``.
``python benchmarks/product_path.py --plot RESULT.json [...] --out PNG`` draws s/step and peak memory of results.

The longest context of each job, on each kind of rows (``--maxctx``):

    python benchmarks/product_path.py --maxctx --model llama-3-8b --rows packed \\
        --config hf-liger-offload,ds_configs/zero3_lemo.json --books BOOKS --start 262144 --max-seq 1048576 \\
        --granularity 16384 --budget-s 540 --out $OUT
    python benchmarks/product_path.py --maxctx ...the same flags... --resume $OUT/product-maxctx-<time>.json

searches, per (job, rows), the longest ``--seq-len`` the job trains at on this GPU, with benchmarks/maxctx.py's
search (``maxctx.search``: from ``--start``, grow x1.25 to the ``--granularity`` until a length fails or passes
``--max-seq``, then bisect). Each probe is one case above, a fresh process on the same rows: the job at that length
for ``--steps`` steps (default 2 here: the first is warm-up, the second gives the step time), with launch/train.py's
``--memory-check off`` so that the GPU decides, not the memory planner. A case that runs out of memory fails the
length, as does one the kernel kills (SIGKILL: the host's memory ran out); one cut by ``--case-timeout`` (seconds
per probe) fails it too (too slow to train there); one that fails otherwise stops the search. ``--budget-s`` (default
540, 0: none) stops starting probes after that many seconds, as in benchmarks/maxctx.py (a command on the GPU machine
gets at most 10 minutes): the result then says
``"complete": false`` and the same command with ``--resume FILE`` goes on from its probes. Writes
``<out>/product-maxctx-<time>.json`` after every probe (machine, commit, versions; per search every probe with its
command, s/step and peak memory, the longest fitting and the shortest failing length, why it stopped) and prints a
Markdown table last.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import maxctx  # noqa: E402
from benchmarks.harness.flops import row_flops  # noqa: E402
from benchmarks.harness.results import REPO_ROOT, device_info, git_state, package_versions  # noqa: E402
from benchmarks.harness.shapes import ModelShape  # noqa: E402
from lemo_ds.training import launch_env  # noqa: E402

GIB = 1024**3
BASELINE = "hf-liger"
# case name -> hf_liger_job.py's arguments. hf: without Liger (any device); -amp: the forward under bf16 autocast, as
# the Trainer runs it with bf16=True (the adapters stay fp32, their matmuls run in bf16).
BASELINES = {
    BASELINE: ["--kernels", "liger"],
    f"{BASELINE}-amp": ["--kernels", "liger", "--autocast"],
    "hf": ["--kernels", "torch"],
    # ALST's single-GPU memory features on top (hf_liger_job.py): the dense stack for the longest context, its
    # adapters in bf16 as DeepSpeed's bf16 mode holds them (ALST's stack runs on DeepSpeed; so does the main job)
    f"{BASELINE}-offload": ["--kernels", "liger", "--offload-checkpoints", "--tiled-mlp", "--lora-dtype", "bfloat16"],
}
ROW_KINDS = ("packed", "one-doc", "stdlib")
ONE_DOC_BOOKS = 3


def prepare_rows(kind: str, books: str | None, doc_bytes: int, scratch: Path) -> str | None:
    """The ``--data`` of a kind of rows (None: the job's default, the stdlib)."""
    if kind == "stdlib":
        return None
    if kind not in ROW_KINDS:
        raise SystemExit(f"unknown --rows {kind!r}: {', '.join(ROW_KINDS)}")
    if books is None:
        raise SystemExit(f"--rows {kind} needs --books (a folder of long .txt books)")
    texts = sorted(Path(books).glob("*.txt"), key=lambda p: (-p.stat().st_size, p.name))
    if not texts:
        raise SystemExit(f"--books {books}: no .txt files")
    if kind == "one-doc":
        folder = scratch / "one-doc"
        folder.mkdir(exist_ok=True)
        for book in texts[:ONE_DOC_BOOKS]:
            (folder / book.name).write_bytes(book.read_bytes())
        return str(folder)
    path = scratch / f"docs-{doc_bytes}.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for book in sorted(texts):
            text = book.read_text(encoding="utf-8", errors="replace")
            raw = text.encode("utf-8")
            for start in range(0, len(raw) - doc_bytes + 1, doc_bytes):
                piece = raw[start : start + doc_bytes].decode("utf-8", errors="ignore")
                handle.write(json.dumps({"text": piece}) + "\n")
    return str(path)


def case_command(config: str, model: str, seq: int, data: str | None, steps: int, out: Path,
                 memory_check: bool = True) -> list[str]:
    """The case's command; ``memory_check=False``: launch/train.py's memory planner does not stop the job (the
    baseline job has no planner)."""
    common = ["--model", model, "--seq-len", str(seq), "--max-steps", str(steps), "--output-dir", str(out)]
    common += ["--data", data] if data is not None else []
    if config in BASELINES:
        return [sys.executable, "benchmarks/hf_liger_job.py", *BASELINES[config], *common]
    checks = [] if memory_check else ["--memory-check", "off"]
    # A port of its own: two cases at once (two test workers, or a job already on the machine) would both take the
    # launcher's default 29500, and the second fails to start.
    launcher = [deepspeed_launcher(), "--num_gpus", "1", "--master_port", str(launch_env.free_port())]
    return [*launcher, "launch/train.py", "--deepspeed", config, "--no-save", *checks, *common]


def deepspeed_launcher() -> str:
    """``deepspeed`` from PATH, else the one installed beside this interpreter (a virtual environment that was not
    activated)."""
    beside = Path(sys.executable).with_name("deepspeed")
    return "deepspeed" if shutil.which("deepspeed") or not beside.exists() else str(beside)


def row_figures(model: str, data: str | None, seq: int, steps: int, seed: int = 0) -> list[dict]:
    """Each step's row (the jobs' rows, rebuilt here on the host): its documents and its FLOPs."""
    import numpy as np

    from lemo_ds.training import data as job_data
    from lemo_ds.training import model as job_model
    from lemo_ds.training.tokenizer import ByteTokenizer, load_hf_tokenizer

    source = job_model.resolve_model(model)
    tokenizer = ByteTokenizer() if source.kind == "preset" else load_hf_tokenizer(model)
    shape = ModelShape.from_config(source.config, model)
    rows = job_data.packed_rows(job_data.discover_files(data), tokenizer, seq, seed)
    figures = []
    for _, row in zip(range(steps), rows):
        starts = np.flatnonzero(row.position_ids == 0).tolist() + [seq]
        lengths = [b - a for a, b in zip(starts, starts[1:])]
        figures.append(row_flops(shape, lengths, lora_rank=8))
    return figures


def job_lines(output: str) -> list[str]:
    """The job's own lines (lemo_ds's log: the predictors' calibration time, warnings), not DeepSpeed's."""
    return [line for line in output.splitlines() if line.startswith("lemo_ds")]


def run_case(command: list[str], timeout: float, rows: list[dict]) -> dict:
    out = Path(command[command.index("--output-dir") + 1])
    started = time.perf_counter()
    # Its own session, so that a timeout ends the whole group: the DeepSpeed launcher and the ranks it started (which
    # would otherwise go on holding the GPU).
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        # What the job printed before the cut says where it was (loading, calibrating, which step).
        output = stdout + stderr
        record = {"wall_s": time.perf_counter() - started, "job_lines": job_lines(output), "tail": output[-3000:]}
        if finished(out):  # cut while exiting (freeing tens of GiB of pinned host memory takes a while): it trained
            return {**record, **finished_record(out, rows), "cut_while_exiting": True}
        return {**record, "status": "timeout"}
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    record = {"wall_s": time.perf_counter() - started, "exit": result.returncode}
    record["job_lines"] = job_lines(result.stdout + result.stderr)
    if result.returncode == 0 and finished(out):
        record.update(finished_record(out, rows))
    else:
        tail = (result.stdout + result.stderr)[-3000:]
        record["status"] = failure_status(result.returncode, tail)
        record["tail"] = tail
    return record


def finished(out: Path) -> bool:
    """The job in ``out`` trained all its steps: summary.json is written then (launch/train.py's says "status":
    "done", or "stopped" at a stop; hf_liger_job.py writes one only at the end)."""
    summary = out / "summary.json"
    return summary.exists() and json.loads(summary.read_text()).get("status", "done") == "done"


def finished_record(out: Path, rows: list[dict]) -> dict:
    """A finished job's figures: its summary, its steps beside their rows' figures, the median over the steps after
    the first (s/step, TFLOP/s) and its peak."""
    record = {"status": "ok", "summary": json.loads((out / "summary.json").read_text())}
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = [(s["step_time_s"], rows[s["step"] - 1]) for s in steps[1:] if s["step"] <= len(rows)]
    record["steps"] = [{"step": s["step"], "step_time_s": s["step_time_s"], **rows[s["step"] - 1]}
                       for s in steps if s["step"] <= len(rows)]  # fmt: skip
    if timed:
        record["s_per_step"] = statistics.median(t for t, _ in timed)
        record["tflops_per_s"] = statistics.median(row["flops"] / t / 1e12 for t, row in timed)
        record["timed_steps"] = len(timed)
    record["peak_gib"] = record["summary"]["peak_mem_bytes"] / GIB
    return record


def failure_status(returncode: int, tail: str) -> str:
    """What stopped a case that did not finish: "out of memory" (the GPU's, or pinned host memory, which CUDA reports
    the same way), "killed" (SIGKILL, which nothing here sends before the timeout: the kernel's OOM killer, the host's
    memory spent), or "failed" (anything else: a bug to read in the tail). The deepspeed launcher reports its rank's
    SIGKILL as "exits with return code = -9" and exits 1 itself."""
    if "OutOfMemoryError" in tail or "out of memory" in tail:
        return "out of memory"
    if returncode == -signal.SIGKILL or f"exits with return code = {-signal.SIGKILL}" in tail:
        return "killed"
    return "failed"


def label(config: str) -> str:
    return config if config in BASELINES else Path(config).stem


def table(cases: list[dict]) -> str:
    names = {case["config"] for case in cases}
    reference = BASELINE if BASELINE in names else next((name for name in BASELINES if name in names), None)
    lines = [f"| job | rows | tokens | s/step | TFLOP/s | peak GiB | speed vs {reference} | memory vs {reference} "
             "| status |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    baselines = {(c["rows"], c["seq"]): c for c in cases if c["config"] == reference and c.get("s_per_step")}
    for case in cases:
        base = baselines.get((case["rows"], case["seq"]))
        if case.get("s_per_step"):
            speed = f"{base['s_per_step'] / case['s_per_step']:.2f}x" if base else ""
            memory = f"{case['peak_gib'] / base['peak_gib']:.2f}x" if base else ""
            figures = f"{case['s_per_step']:.2f} | {case['tflops_per_s']:.1f} | {case['peak_gib']:.2f}"
            lines.append(f"| {label(case['config'])} | {case['rows']} | {case['seq']} | {figures} | {speed} | {memory} "
                         "| ok |")  # fmt: skip
        else:
            lines.append(f"| {label(case['config'])} | {case['rows']} | {case['seq']} | | | | | | {case['status']} |")
    return "\n".join(lines)


def plot(results: list[Path], out: Path) -> None:
    """Two panels, s/step and peak GiB, one group of bars per (rows, tokens), one bar per job, from result files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [case for path in results for case in json.loads(path.read_text())["cases"] if case.get("s_per_step")]
    groups = sorted({(case["rows"], case["seq"]) for case in cases}, key=lambda g: (g[1], g[0]))
    jobs = list(dict.fromkeys(label(case["config"]) for case in cases))
    width = 0.8 / max(len(jobs), 1)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key, title in ((axes[0], "s_per_step", "seconds per step (lower is better)"),
                             (axes[1], "peak_gib", "peak GPU memory, GiB (lower is better)")):  # fmt: skip
        for j, job in enumerate(jobs):
            values = [next((c[key] for c in cases if label(c["config"]) == job and (c["rows"], c["seq"]) == g), 0)
                      for g in groups]  # fmt: skip
            axis.bar([i + j * width for i in range(len(groups))], values, width, label=job)
        axis.set_xticks([i + width * (len(jobs) - 1) / 2 for i in range(len(groups))])
        axis.set_xticklabels([f"{rows}\n{seq // 1024}K" for rows, seq in groups])
        axis.set_title(title)
    axes[1].legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=120)


# ---- the longest context of each job (--maxctx) ------------------------------------------------------------------

# run_case's status -> the outcome of a maxctx probe
# A killed probe fails its length as an out-of-memory one does: the host's memory, not the GPU's, ran out.
OUTCOMES = {"ok": "fit", "out of memory": "oom", "killed": "oom", "timeout": "timeout", "failed": "error"}


def probe_case(config: str, model: str, data: str | None, seq: int, steps: int, timeout: float) -> dict:
    """One probe of maxctx.search on the product path: the case at ``seq`` tokens, ``steps`` steps, on its rows rebuilt
    for that length, the memory planner's check off."""
    rows = row_figures(model, data, seq, steps)
    with tempfile.TemporaryDirectory() as job_dir:
        command = case_command(config, model, seq, data, steps, Path(job_dir), memory_check=False)
        case = run_case(command, timeout, rows)
    probe = {"seq": seq, "outcome": OUTCOMES[case["status"]], "wall_s": round(case["wall_s"], 2),
             "command": shlex.join(command)}  # fmt: skip
    if case["status"] == "ok":
        probe["peak_allocated_gib"] = round(case["peak_gib"], 3)
        probe.update({key: case[key] for key in ("s_per_step", "tflops_per_s", "timed_steps") if key in case})
        probe.update(steps=case["steps"], summary=case["summary"])
        if case.get("cut_while_exiting"):
            probe["cut_while_exiting"] = True
    else:
        probe.update(exit=case.get("exit"), error=case["tail"])
        if case["status"] == "timeout":
            probe["timeout_s"] = round(timeout, 1)
    probe["job_lines"] = case["job_lines"]
    return probe


def child_device_info() -> dict:
    """device_info() from a process of its own: the parent of the probes leaves the GPU alone (a CUDA context here
    would take memory from every probe)."""
    code = "import json, sys; from benchmarks.harness.results import device_info; print(json.dumps(device_info()))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})  # fmt: skip
    return json.loads(result.stdout.splitlines()[-1]) if result.returncode == 0 else {"error": result.stderr[-500:]}


def maxctx_table(searches: list[dict]) -> str:
    lines = ["| job | rows | longest fitting | s/step there | peak GiB there | shortest failing | probes | stop |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for record in searches:
        fit = record.get("max_fit_seq")
        best = next((p for p in record["probes"] if fit and p["seq"] == fit and p["outcome"] == "fit"), {})
        step = f"{best['s_per_step']:.2f}" if best.get("s_per_step") else ""
        peak = f"{best['peak_allocated_gib']:.2f}" if best.get("peak_allocated_gib") else ""
        lines.append(f"| {label(record['config'])} | {record['rows']} | {fit or ''} | {step} | {peak} "
                     f"| {record.get('min_fail_seq') or ''} | {len(record['probes'])} | {record.get('stop_reason')} |")
    return "\n".join(lines)


def run_maxctx(args: argparse.Namespace) -> int:
    """The searches of --maxctx, one per (rows, config); 0 when every one is complete, else 3 (as maxctx.py)."""
    steps = args.steps or 2
    previous = json.loads(Path(args.resume).read_text()) if args.resume else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"product-maxctx-{time.strftime('%Y%m%d-%H%M%S')}.json"
    result = {"suite": "product-path-maxctx", "command": shlex.join([sys.executable, *sys.argv]), "git": git_state(),
              "versions": package_versions(), "device": child_device_info(),
              "settings": {"model": args.model, "start": args.start, "granularity": args.granularity,
                           "max_seq": args.max_seq, "steps": steps, "probe_timeout_s": args.case_timeout,
                           "budget_s": args.budget_s, "growth": maxctx.GROWTH, "books": args.books,
                           "doc_bytes": args.doc_bytes, "memory_check": "off",
                           "resumed_from": str(args.resume) if args.resume else None},
              "notes": {"probe": "the case (launch/train.py or benchmarks/hf_liger_job.py) at that --seq-len for "
                                 "`steps` steps in a fresh process; s_per_step: the steps after the first, median"},
              "searches": []}  # fmt: skip
    deadline = time.perf_counter() + args.budget_s if args.budget_s else None
    status = 0
    with tempfile.TemporaryDirectory() as scratch_dir:
        for kind in args.rows.split(","):
            data = prepare_rows(kind, args.books, args.doc_bytes, Path(scratch_dir))  # the same for every length
            for config in args.config.split(","):
                identity = {"config": config, "rows": kind, "model": args.model, "doc_bytes": args.doc_bytes}
                earlier = maxctx.earlier_probes(previous, lambda s, ident=identity: ident.items() <= s.items())
                record = {**identity, "start": args.start, "granularity": args.granularity, "max_seq": args.max_seq,
                          "steps": steps, "probes": earlier}  # fmt: skip
                result["searches"].append(record)
                maxctx.log(f"maxctx {label(config)} / {kind}: start {args.start}, granularity {args.granularity}"
                           + (f", {len(earlier)} earlier probe(s)" if earlier else ""))

                def runner(seq: int, timeout: float, config: str = config, data: str | None = data) -> dict:
                    return probe_case(config, args.model, data, seq, steps, timeout)

                def on_probe(_record: dict) -> None:
                    path.write_text(json.dumps(result, indent=1))

                maxctx.search(record, runner, args.case_timeout, deadline, on_probe, f"{label(config)}/{kind}")
                status |= 0 if record["complete"] else 3
                maxctx.log(f"  {label(config)} / {kind}: longest fitting {record['max_fit_seq']}, shortest failing "
                           f"{record['min_fail_seq']} ({record['stop_reason']})")
    result["status"] = "complete" if status == 0 else "incomplete"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    print(maxctx_table(result["searches"]))
    return status


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--plot":
        files = [Path(a) for a in argv[1:] if a != "--out"]
        out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else Path("product-path.png")
        plot([f for f in files if f != out], out)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--seq", default="65536", help="comma-separated sequence lengths")
    parser.add_argument("--rows", default="packed,one-doc", help=f"comma-separated: {', '.join(ROW_KINDS)}")
    parser.add_argument("--config", default=f"{BASELINE},ds_configs/zero3_lemo.json",
                        help=f"comma-separated DeepSpeed configs, or {', '.join(BASELINES)}")
    parser.add_argument("--books", default=None, help="folder of long .txt books (packed and one-doc rows)")
    parser.add_argument("--doc-bytes", type=int, default=4096, help="document size of packed rows")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per case; the first is warm-up, not timed (default 6, --maxctx: 2)")
    parser.add_argument("--case-timeout", type=float, default=600, help="seconds per case (--maxctx: per probe)")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    search = parser.add_argument_group("--maxctx: the longest context of each job (see above)")
    search.add_argument("--maxctx", action="store_true", help="search the longest --seq-len (--seq is not used)")
    search.add_argument("--start", type=int, default=65536, help="first length probed")
    search.add_argument("--granularity", type=int, default=4096)
    search.add_argument("--max-seq", type=int, default=maxctx.DEFAULT_MAX_SEQ, help="stop growing past this length")
    search.add_argument("--budget-s", type=float, default=540.0,
                        help="stop starting probes after this many seconds (0: no limit)")
    search.add_argument("--resume", default=None, help="an earlier --maxctx result whose probes count")
    args = parser.parse_args(argv)
    if args.maxctx:
        return run_maxctx(args)
    args.steps = args.steps or 6

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"product-path-{time.strftime('%Y%m%d-%H%M%S')}.json"
    result = {"suite": "product-path", "command": shlex.join([sys.executable, *sys.argv]), "git": git_state(),
              "versions": package_versions(), "device": device_info(), "cases": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        for seq in (int(s) for s in args.seq.split(",")):
            for kind in args.rows.split(","):
                data = prepare_rows(kind, args.books, args.doc_bytes, scratch)
                rows = row_figures(args.model, data, seq, args.steps)
                for config in args.config.split(","):
                    with tempfile.TemporaryDirectory() as job_dir:
                        command = case_command(config, args.model, seq, data, args.steps, Path(job_dir))
                        record = run_case(command, args.case_timeout, rows)
                    record.update(config=config, rows=kind, seq=seq, model=args.model, command=shlex.join(command))
                    result["cases"].append(record)
                    path.write_text(json.dumps(result, indent=1))
                    print(f"{label(config)} {kind} {seq}: {record['status']} ({record['wall_s']:.0f} s)", flush=True)
    print(table(result["cases"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
