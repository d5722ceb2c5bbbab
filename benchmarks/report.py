"""Markdown tables and PNG plots from result files of benchmarks/run.py and benchmarks/maxctx.py.

    python benchmarks/report.py benchmarks/results/paper-20261122-101500.json --out benchmarks/results
    python benchmarks/report.py A.json B.json --out DIR --name combined

For measured suites, per model shape: ``<name>-<shape>-memory.png`` (peak allocated memory vs sequence length)
and ``<name>-<shape>-step-time.png`` (median step time vs sequence length, p20-p80 as error bars), one line per
variant; a variant that ran out of memory at a length gets an ``x`` at the top of the axis there, labelled
"OOM". With several files the records are merged (a later file wins for the same shape, length and variant).
For maxctx results: a table of the searches and one of every probe, and ``<name>-maxctx.png``. ``<name>.md``
holds the tables and links the plots. ``<name>`` defaults to the stem of the (first) result file.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.harness import results  # noqa: E402

# shape -> variant -> seq -> record
Records = dict[str, dict[str, dict[int, dict[str, Any]]]]


def collect(documents: list[dict[str, Any]]) -> Records:
    merged: Records = defaultdict(lambda: defaultdict(dict))
    for document in documents:
        for config in document.get("configurations", []):
            for record in config.get("variants", []):
                merged[config["shape"]][record["name"]][config["seq"]] = record
    return merged


def _figure_for(variants: dict[str, dict[int, dict[str, Any]]], metric, ylabel: str, title: str, path: Path,
                capacity: float | None = None, errors=None) -> Path:
    figure, axis = plt.subplots(figsize=(7, 5.2))
    seqs = sorted({seq for by_seq in variants.values() for seq in by_seq})
    oom_points: list[tuple[int, str]] = []
    values_seen: list[float] = []
    for index, (name, by_seq) in enumerate(variants.items()):
        color = f"C{index % 10}"
        xs, ys, lows, highs = [], [], [], []
        for seq in sorted(by_seq):
            record = by_seq[seq]
            if record.get("oom"):
                oom_points.append((seq, color))
                continue
            value = metric(record)
            if value is None:
                continue
            xs.append(seq)
            ys.append(value)
            if errors is not None:
                low, high = errors(record)
                lows.append(value - low if low is not None else 0.0)
                highs.append(high - value if high is not None else 0.0)
        values_seen += ys
        if xs and errors is not None:
            axis.errorbar(xs, ys, yerr=[lows, highs], marker="o", color=color, label=name, capsize=3)
        elif xs:
            axis.plot(xs, ys, marker="o", color=color, label=name)
        else:
            axis.plot([], [], marker="o", color=color, label=name)  # in the legend even with no point
    # Headroom above the data for the OOM markers, which sit inside the axes at the top.
    top = max(values_seen + ([capacity] if capacity else []), default=1.0) * 1.3
    axis.set_ylim(0, top)
    if capacity:
        axis.axhline(capacity, color="gray", linestyle="--", linewidth=1)
        axis.annotate("GPU memory", (1.0, capacity), xycoords=("axes fraction", "data"), xytext=(-4, 3),
                      textcoords="offset points", ha="right", va="bottom", fontsize=8, color="gray")
    stacked: dict[int, int] = defaultdict(int)  # several variants out of memory at one length: stack them
    for seq, color in oom_points:
        height = top * (0.95 - 0.05 * stacked[seq])
        stacked[seq] += 1
        axis.plot([seq], [height], marker="x", markersize=10, mew=2.5, color=color, linestyle="none")
        axis.annotate("OOM", (seq, height), textcoords="offset points", xytext=(8, -3), fontsize=8, color=color)
    if oom_points:
        axis.plot([], [], marker="x", color="black", linestyle="none", mew=2, label="out of memory (OOM)")
    if not values_seen:
        axis.text(0.5, 0.5, "not measured (CPU run)" if not oom_points else "no figures", ha="center",
                  transform=axis.transAxes, color="gray")
    if seqs:
        axis.set_xscale("log", base=2)
        axis.set_xticks(seqs, [results.seq_label(seq) for seq in seqs])
        axis.minorticks_off()
        axis.set_xlim(seqs[0] / 1.25, seqs[-1] * 1.4)  # room for the "OOM" labels right of the markers
    axis.set_xlabel("sequence length (tokens, batch 1)")
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_measure(records: Records, out_dir: Path, name: str, capacity: float | None) -> list[Path]:
    written = []
    for shape, variants in records.items():
        written.append(_figure_for(
            variants, lambda r: r.get("peak_allocated_gib"), "peak allocated memory (GiB)",
            f"{shape}: peak memory per training step (LoRA r=8)", out_dir / f"{name}-{shape}-memory.png",
            capacity=capacity))
        written.append(_figure_for(
            variants, lambda r: r["step_time_s"]["median"], "step time (s, median; bars p20-p80)",
            f"{shape}: training step time (fwd+bwd+AdamW on LoRA)", out_dir / f"{name}-{shape}-step-time.png",
            errors=lambda r: (r["step_time_s"]["p20"], r["step_time_s"]["p80"])))
    return written


def plot_maxctx(document: dict[str, Any], out_dir: Path, name: str) -> Path:
    searches = document.get("searches", [])
    figure, axis = plt.subplots(figsize=(7, 0.6 + 0.6 * max(1, len(searches))))
    labels = [f"{s['variant']} ({s['shape']})" for s in searches]
    values = [(s.get("max_fit_seq") or 0) / 1024 for s in searches]
    axis.barh(labels, values, color=[f"C{i}" for i in range(len(searches))])
    for index, search in enumerate(searches):
        text = results.seq_label(search["max_fit_seq"]) if search.get("max_fit_seq") else "none"
        axis.text(values[index], index, f" {text}" + ("" if search.get("complete") else " (incomplete)"),
                  va="center", fontsize=8)
    axis.set_xlabel("longest context whose training step fits (K tokens)")
    axis.set_xlim(0, max(values + [1]) * 1.3)
    figure.tight_layout()
    path = out_dir / f"{name}-maxctx.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def environment_lines(document: dict[str, Any]) -> list[str]:
    env = document.get("environment", {})
    device = document.get("device", env)  # maxctx: the probes' device
    versions = env.get("versions", {})
    git = env.get("git", {})
    return [
        f"- suite `{document.get('suite')}` ({document.get('status')}), {document.get('started')}",
        f"- command: `{document.get('command')}`",
        f"- host {env.get('hostname')}, GPU {device.get('gpu_name') or 'none (CPU)'}, "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
        f"- git {git.get('commit')}{' (dirty)' if git.get('dirty') else ''}",
    ]


def probes_table(document: dict[str, Any]) -> str:
    lines = ["| variant | tokens | outcome | peak alloc GiB | step s | wall s |", "|---|---|---|---|---|---|"]
    for search in document.get("searches", []):
        for probe in search.get("probes", []):
            lines.append(f"| {search['variant']} | {results.seq_label(probe['seq'])} | {probe['outcome']} | "
                         f"{probe.get('peak_allocated_gib', '')} | {probe.get('step_s', '')} | "
                         f"{probe.get('wall_s', '')} |")
    return "\n".join(lines)


def write_report(paths: list[Path], out_dir: Path, name: str | None = None) -> list[Path]:
    """Write <name>.md and the PNGs into ``out_dir``; returns the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    documents = [results.load(path) for path in paths]
    name = name or Path(paths[0]).stem
    written: list[Path] = []
    sections = [f"# Benchmark report: {name}", ""]
    measured = [d for d in documents if d.get("kind") != "maxctx"]
    if measured:
        capacity = max((d.get("environment", {}).get("gpu_total_memory_gib") or 0 for d in measured), default=0)
        for path in plot_measure(collect(measured), out_dir, name, capacity or None):
            written.append(path)
            sections.append(f"![{path.stem}]({path.name})")
        sections.append("")
    for document in documents:
        sections += environment_lines(document) + [""]
        sections += [results.markdown_table(document), ""]
        if document.get("kind") == "maxctx":
            sections += [probes_table(document), ""]
            path = plot_maxctx(document, out_dir, name)
            written.append(path)
            sections += [f"![{path.stem}]({path.name})", ""]
    markdown = out_dir / f"{name}.md"
    markdown.write_text("\n".join(sections), encoding="utf-8")
    return [markdown, *written]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="result JSON files")
    parser.add_argument("--out", type=Path, required=True, help="folder for the Markdown and the PNGs")
    parser.add_argument("--name", default=None, help="file name stem (default: the first result's)")
    args = parser.parse_args(argv)
    for path in write_report(args.results, args.out, args.name):
        print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
