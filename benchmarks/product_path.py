"""The main job as users run it, on packed and on one-document rows: ``deepspeed launch/train.py`` itself.

Every case is one ``deepspeed --num_gpus 1 launch/train.py --deepspeed CONFIG --model MODEL --seq-len N
--max-steps S --no-save`` in its own process; the figures are that run's summary.json (tokens/s with the first step
left out, rank 0's peak allocated memory), so they include everything the job does (data, ZeRO-3, checkpointing,
the loss). Rows: ``packed`` is the job's default data (the Python standard library: many documents per row),
``one-doc`` is ``--data BOOKS`` (long books: every row is a chunk of one document).

    python benchmarks/product_path.py --model llama-3-8b --seq 65536,131072 --rows packed,one-doc \\
        --config ds_configs/zero3_lemo.json --books .bench_data/gutenberg --steps 3 --out $OUT

Writes ``<out>/product-path-<time>.json`` after every case (machine, commit, versions, each command and its
summary) and prints a Markdown table last.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness.results import REPO_ROOT, device_info, git_state, package_versions  # noqa: E402

GIB = 1024**3


def case_command(config: str, model: str, seq: int, rows: str, books: str | None, steps: int, out: Path) -> list[str]:
    command = ["deepspeed", "--num_gpus", "1", "launch/train.py", "--deepspeed", config, "--model", model,
               "--seq-len", str(seq), "--max-steps", str(steps), "--no-save", "--output-dir", str(out)]  # fmt: skip
    if rows == "one-doc":
        if books is None:
            raise SystemExit("--rows one-doc needs --books (a folder of long texts)")
        command += ["--data", books]
    elif rows != "packed":
        raise SystemExit(f"unknown --rows {rows!r}: packed or one-doc")
    return command


def run_case(command: list[str], timeout: float) -> dict:
    out = Path(command[command.index("--output-dir") + 1])
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "wall_s": time.perf_counter() - started}
    record = {"wall_s": time.perf_counter() - started, "exit": result.returncode}
    summary = out / "summary.json"
    if result.returncode == 0 and summary.exists():
        record["status"] = "ok"
        record["summary"] = json.loads(summary.read_text())
    else:
        tail = (result.stdout + result.stderr)[-3000:]
        record["status"] = "out of memory" if "OutOfMemoryError" in tail or "out of memory" in tail else "failed"
        record["tail"] = tail
    return record


def table(cases: list[dict]) -> str:
    lines = ["| config | rows | tokens | s/step | tokens/s | peak GiB | mean keep | status |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for case in cases:
        summary = case.get("summary") or {}
        tps = summary.get("tokens_per_s")
        peak = summary.get("peak_mem_bytes")
        keep = summary.get("mean_keep_ratio")
        lines.append(
            f"| {Path(case['config']).stem} | {case['rows']} | {case['seq']} | "
            f"{case['seq'] / tps:.2f} | {tps:,.0f} | {peak / GIB:.1f} | {keep:.3f} | ok |"
            if tps else f"| {Path(case['config']).stem} | {case['rows']} | {case['seq']} | | | | | {case['status']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--seq", default="65536", help="comma-separated sequence lengths")
    parser.add_argument("--rows", default="packed,one-doc", help="comma-separated: packed, one-doc")
    parser.add_argument("--config", default="ds_configs/zero3_lemo.json", help="comma-separated DeepSpeed configs")
    parser.add_argument("--books", default=None, help="folder of long texts for one-doc rows")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per case (the first is not timed)")
    parser.add_argument("--case-timeout", type=float, default=600)
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"product-path-{time.strftime('%Y%m%d-%H%M%S')}.json"
    result = {"suite": "product-path", "command": shlex.join([sys.executable, *sys.argv]), "git": git_state(),
              "versions": package_versions(), "device": device_info(), "cases": []}  # fmt: skip
    for seq in (int(s) for s in args.seq.split(",")):
        for config in args.config.split(","):
            for rows in args.rows.split(","):
                with tempfile.TemporaryDirectory() as scratch:
                    command = case_command(config, args.model, seq, rows, args.books, args.steps, Path(scratch))
                    record = run_case(command, args.case_timeout)
                record.update(config=config, rows=rows, seq=seq, model=args.model, command=shlex.join(command))
                result["cases"].append(record)
                path.write_text(json.dumps(result, indent=1))
                print(f"{config} {rows} {seq}: {record['status']} ({record['wall_s']:.0f} s)", flush=True)
    print(table(result["cases"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
