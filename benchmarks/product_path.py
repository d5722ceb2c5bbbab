"""The main job as users run it, against what they would run instead, on the same rows.

Every case is one process: ``deepspeed --num_gpus 1 launch/train.py --deepspeed CONFIG ...`` for a DeepSpeed config,
or, for the case named ``hf-liger``, ``python benchmarks/hf_liger_job.py`` (Hugging Face + Liger-Kernel + activation
checkpointing + packing, no DeepSpeed: what a user runs instead; ``hf`` is the same without Liger, on any device).
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
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness.flops import row_flops  # noqa: E402
from benchmarks.harness.results import REPO_ROOT, device_info, git_state, package_versions  # noqa: E402
from benchmarks.harness.shapes import ModelShape  # noqa: E402

GIB = 1024**3
BASELINE = "hf-liger"
# case name -> hf_liger_job.py's arguments. hf: without Liger (any device); -amp: the forward under bf16 autocast, as
# the Trainer runs it with bf16=True (the adapters stay fp32, their matmuls run in bf16).
BASELINES = {
    BASELINE: ["--kernels", "liger"],
    f"{BASELINE}-amp": ["--kernels", "liger", "--autocast"],
    "hf": ["--kernels", "torch"],
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


def case_command(config: str, model: str, seq: int, data: str | None, steps: int, out: Path) -> list[str]:
    common = ["--model", model, "--seq-len", str(seq), "--max-steps", str(steps), "--output-dir", str(out)]
    common += ["--data", data] if data is not None else []
    if config in BASELINES:
        return [sys.executable, "benchmarks/hf_liger_job.py", *BASELINES[config], *common]
    return [deepspeed_launcher(), "--num_gpus", "1", "launch/train.py", "--deepspeed", config, "--no-save", *common]


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


def _text(output: str | bytes | None) -> str:
    """A subprocess's output as text: TimeoutExpired carries bytes even where the run asked for text."""
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def job_lines(output: str) -> list[str]:
    """The job's own lines (lemo_ds's log: the predictors' calibration time, warnings), not DeepSpeed's."""
    return [line for line in output.splitlines() if line.startswith("lemo_ds")]


def run_case(command: list[str], timeout: float, rows: list[dict]) -> dict:
    out = Path(command[command.index("--output-dir") + 1])
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as timeout_error:
        # What the job printed before the cut says where it was (loading, calibrating, which step).
        output = _text(timeout_error.stdout) + _text(timeout_error.stderr)
        return {"status": "timeout", "wall_s": time.perf_counter() - started, "job_lines": job_lines(output),
                "tail": output[-3000:]}  # fmt: skip
    record = {"wall_s": time.perf_counter() - started, "exit": result.returncode}
    record["job_lines"] = job_lines(result.stdout + result.stderr)
    summary = out / "summary.json"
    if result.returncode == 0 and summary.exists():
        record["status"] = "ok"
        record["summary"] = json.loads(summary.read_text())
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        timed = [(s["step_time_s"], rows[s["step"] - 1]) for s in steps[1:] if s["step"] <= len(rows)]
        record["steps"] = [{"step": s["step"], "step_time_s": s["step_time_s"], **rows[s["step"] - 1]}
                           for s in steps if s["step"] <= len(rows)]  # fmt: skip
        if timed:
            record["s_per_step"] = statistics.median(t for t, _ in timed)
            record["tflops_per_s"] = statistics.median(row["flops"] / t / 1e12 for t, row in timed)
            record["timed_steps"] = len(timed)
        record["peak_gib"] = record["summary"]["peak_mem_bytes"] / GIB
    else:
        tail = (result.stdout + result.stderr)[-3000:]
        record["status"] = "out of memory" if "OutOfMemoryError" in tail or "out of memory" in tail else "failed"
        record["tail"] = tail
    return record


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
                        help=f"comma-separated DeepSpeed configs, or {BASELINE}")
    parser.add_argument("--books", default=None, help="folder of long .txt books (packed and one-doc rows)")
    parser.add_argument("--doc-bytes", type=int, default=4096, help="document size of packed rows")
    parser.add_argument("--steps", type=int, default=6, help="steps per case; the first is warm-up, not timed")
    parser.add_argument("--case-timeout", type=float, default=600)
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)

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
