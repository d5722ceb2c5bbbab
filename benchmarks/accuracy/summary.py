"""The README's accuracy summary from several accuracy results (one per reference model or extension method): one
perplexity table and one retrieval table (a row per result, a column per run), and one plot of each.

    python benchmarks/accuracy/summary.py --out benchmarks/results/accuracy-summary \\
        --result "12 layers, PI=benchmarks/results/accuracy-.../accuracy-full-....json" \\
        --result "12 layers, YaRN=benchmarks/results/accuracy-.../accuracy-full-....json"

Writes ``<out>.md``, ``<out>-perplexity.png`` and ``<out>-passkey.png``. Runs compare only within one result (one
reference model, one fine-tuning recipe).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.accuracy.report import dense_ppl  # noqa: E402

# Column order: dense first, then the nested mode's scorers, then anything else in the order met.
_FIRST = ("dense", "predictor@0.4+nested", "oracle@0.4+nested", "random@0.4+nested")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--result", action="append", required=True, metavar="LABEL=PATH",
                        help="an accuracy result JSON and the label of its row; repeatable")  # fmt: skip
    parser.add_argument("--out", required=True, help="output stem: <out>.md, <out>-perplexity.png, <out>-passkey.png")
    parser.add_argument("--runs", default=None, help="comma-separated run names to show (default: every run)")
    parser.add_argument("--passkey-metric", choices=("loglik", "accuracy"), default="loglik",
                        help="what the passkey plot shows: the answer's log-likelihood per token (ranks runs even "
                             "when none retrieves) or the accuracy with binomial standard errors")  # fmt: skip
    return parser.parse_args(argv)


def load(pairs: list[str]) -> list[tuple[str, dict]]:
    results = []
    for pair in pairs:
        label, sep, path = pair.partition("=")
        if not sep or not Path(path).is_file():
            raise SystemExit(f"--result {pair!r}: expected LABEL=PATH of an accuracy result JSON")
        results.append((label, json.loads(Path(path).read_text())))
    return results


def columns(results: list[tuple[str, dict]], only: list[str] | None = None) -> list[str]:
    names = [run["name"] for _, document in results for run in document["runs"] if run["ok"]]
    if only is not None:
        return [name for name in only if name in names]
    seen = [name for name in _FIRST if name in names]
    return seen + [name for name in dict.fromkeys(names) if name not in seen]


def _run(document: dict, name: str) -> dict | None:
    return next((run for run in document["runs"] if run["name"] == name and run["ok"]), None)


def perplexity_gaps(document: dict, names: list[str]) -> dict[str, float]:
    """{run: held-out perplexity vs the result's dense run, in percent} (dense itself: 0)."""
    dense = dense_ppl(document)
    runs = {name: _run(document, name) for name in names}
    return {name: 100 * (run["eval_ppl"] / dense - 1) for name, run in runs.items() if run and dense}


def passkey_metric(document: dict, names: list[str], key: str = "passkey_accuracy") -> dict[str, float]:
    """{run: its passkey ``key``} ("passkey_accuracy" or "passkey_answer_loglik") for the runs that evaluated it."""
    runs = {name: _run(document, name) for name in names}
    return {name: run[key] for name, run in runs.items() if run and run.get(key) is not None}


def answer_loglik(document: dict, names: list[str]) -> dict[str, float]:
    return passkey_metric(document, names, "passkey_answer_loglik")


def accuracy_error(document: dict, names: list[str]) -> dict[str, float]:
    """{run: the binomial standard error of its passkey accuracy, sqrt(p (1 - p) / rows)}."""
    runs = {name: _run(document, name) for name in names}
    return {name: (run["passkey_accuracy"] * (1 - run["passkey_accuracy"]) / run["passkey_rows"]) ** 0.5
            for name, run in runs.items() if run and run.get("passkey_rows")}  # fmt: skip


def markdown(results: list[tuple[str, dict]], names: list[str]) -> str:
    head = "| reference | " + " | ".join(names) + " |\n|---|" + "---|" * len(names)
    ppl_rows, key_rows = [], []
    for label, document in results:
        gaps, keys, logliks = perplexity_gaps(document, names), passkey_metric(document, names), answer_loglik(
            document, names)
        dense = dense_ppl(document)
        cells = [(f"{dense:.2f}" if name == "dense" and dense else f"{gaps[name]:+.2f}%") if name in gaps else ""
                 for name in names]  # fmt: skip
        ppl_rows.append(f"| {label} | " + " | ".join(cells) + " |")
        if keys:  # results from before the passkey evaluation have no row here
            key_rows.append(f"| {label} | " + " | ".join(f"{keys[n]:.2f} ({logliks[n]:.2f})" if n in keys else ""
                                                          for n in names) + " |")  # fmt: skip
    return "\n".join([
        "Held-out perplexity at the extended context (dense: the perplexity; others: vs dense):", "", head, *ppl_rows,
        "", "Passkey retrieval at the extended context, every depth: accuracy (answer log-likelihood per token):", "",
        head, *key_rows, "",
    ])  # fmt: skip


def plot_bars(results: list[tuple[str, dict]], names: list[str], values, ylabel: str, title: str,
              path: Path, errors=None) -> Path | None:  # fmt: skip
    """Grouped bars, a group per result; ``errors`` (like ``values``) adds error bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [(label, values(document, names)) for label, document in results]
    spread = {label: errors(document, names) for label, document in results} if errors else None
    rows = [(label, row) for label, row in rows if row]  # a result without these figures gets no group
    labels, table = [label for label, _ in rows], [row for _, row in rows]
    shown = [name for name in names if any(name in row for row in table)]
    width = 0.8 / max(len(shown), 1)
    figure, axis = plt.subplots(figsize=(max(6.4, 1.9 * len(labels) + 3), 4.6))
    for index, name in enumerate(shown):
        xs = [i + (index - (len(shown) - 1) / 2) * width for i in range(len(labels))]
        axis.bar(xs, [row.get(name, float("nan")) for row in table], width, label=name,
                 color="black" if name == "dense" else None,
                 yerr=[spread[label].get(name, 0.0) for label in labels] if spread else None, capsize=2)  # fmt: skip
    axis.set_xticks(range(len(labels)), [label.replace(", ", ",\n") for label in labels], fontsize="small")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.axhline(0, color="grey", linewidth=0.8)
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never on them
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = load(args.result)
    names = columns(results, args.runs.split(",") if args.runs else None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown(results, names))

    def gaps_without_dense(document: dict, names: list[str]) -> dict[str, float]:
        return {k: v for k, v in perplexity_gaps(document, names).items() if k != "dense"}

    plot_bars(results, names, gaps_without_dense, "held-out perplexity vs dense (%)",
              "Perplexity cost of elimination", out.with_name(out.name + "-perplexity.png"))  # fmt: skip
    # The answer's log-likelihood ranks the runs even when none retrieves; the accuracy once the reference does.
    values, ylabel, errors = {
        "loglik": (answer_loglik, "passkey answer log-likelihood per token", None),
        "accuracy": (passkey_metric, "passkey accuracy (± one standard error)", accuracy_error),
    }[args.passkey_metric]
    plot_bars(results, names, values, ylabel, "Passkey retrieval (dense evaluation)",
              out.with_name(out.name + "-passkey.png"), errors=errors)  # fmt: skip
    print(markdown(results, names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
