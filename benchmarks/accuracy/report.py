"""The accuracy result: JSON, Markdown tables and a plot: held-out perplexity vs keep ratio (one line per scorer,
dense as a horizontal line) and, with the passkey evaluation, retrieval accuracy vs needle depth (one line per run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def dense_ppl(document: dict[str, Any]) -> float | None:
    """The plain dense run's perplexity (runs named "dense+<mode>" are dense under other fine-tuning settings)."""
    return next((r.get("eval_ppl") for r in document["runs"] if r["name"] == "dense" and r["ok"]), None)


# Results written before recipe.rope_scaling existed used position interpolation.
_SCALING = {"linear": "RoPE position interpolation", "yarn": "RoPE YaRN"}


def markdown(document: dict[str, Any]) -> str:
    recipe, ref = document["recipe"], document["reference"]
    long_seq = recipe["short_seq"] * recipe["extension"]
    dense = dense_ppl(document)
    scaling = _SCALING[recipe.get("rope_scaling", "linear")]
    lines = [
        f"Held-out perplexity at {long_seq} tokens (dense evaluation) after {recipe['finetune_steps']} LoRA steps "
        f"(r={recipe['lora_r']}) of {recipe['extension']}x context extension ({scaling}); reference model at "
        f"{recipe['short_seq']}: {ref['reference_short_ppl']:.3f}, extended model before fine-tuning: "
        f"{ref['extended_long_ppl_before_finetune']:.3f}. Learning rate {recipe['finetune_lr']:g}, "
        f"{recipe.get('lr_schedule', 'constant')} schedule; fine-tuning books: "
        f"{recipe['finetune_books'] if recipe['finetune_books'] is not None else 'every train book'}.",
        "",
        "| run | scorer | keep | held-out ppl | vs dense | predictor recall | final train loss | tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(document["runs"], key=lambda r: (r["scorer"] != "dense", r.get("mode", ""), r["scorer"],
                                                    r["keep_ratio"] or 1))  # fmt: skip
    for run in order:
        if not run["ok"]:
            lines.append(f"| {run['name']} | {run['scorer']} | {run['keep_ratio']} | failed | | | | |")
            continue
        delta = "" if dense is None else f"{100 * (run['eval_ppl'] / dense - 1):+.2f}%"
        recall = "" if run.get("predictor_recall") is None else f"{run['predictor_recall']:.3f}"
        keep = "1.0" if run["keep_ratio"] is None else f"{run['keep_ratio']:g}"
        lines.append(
            f"| {run['name']} | {run['scorer']} | {keep} | {run['eval_ppl']:.3f} | {delta} | {recall} | "
            f"{run['final_loss']:.3f} | {run['tokens_per_s']:,.0f} |"
        )
    return "\n".join(lines + passkey_table(document, order)) + "\n"


def _has_passkey(document: dict[str, Any]) -> bool:
    return any(run.get("passkey_by_depth") for run in document["runs"])


def passkey_table(document: dict[str, Any], order: list[dict]) -> list[str]:
    """The passkey accuracy by needle depth of every run (empty without the passkey evaluation)."""
    if not _has_passkey(document):
        return []
    recipe = document["recipe"]
    depths = sorted({depth for run in document["runs"] for depth in run.get("passkey_by_depth") or {}}, key=float)
    before = document["reference"].get("extended_passkey_before_finetune")
    short = document["reference"].get("reference_passkey_short")
    lines = [
        "",
        f"Passkey retrieval at {recipe['short_seq'] * recipe['extension']} tokens (dense evaluation, teacher-forced: a "
        f"row is right when every answer token is the argmax): accuracy by needle depth, "
        f"{recipe['passkey_rows']} held-out rows per depth; {100 * recipe['passkey_rate']:g}% of the fine-tuning rows "
        "are passkey documents."
        + (f" The reference model at {recipe['short_seq']} tokens ({100 * recipe['pretrain_passkey_rate']:g}% of its "
           f"pretraining rows are passkey documents, {100 * recipe.get('pretrain_induction_rate', 0.0):g}% one "
           f"repeated segment of {recipe.get('pretrain_induction_source', 'random')} tokens): "
           f"{short['passkey_accuracy']:.2f}." if short else "")
        + (f" The extended model before fine-tuning: {before['passkey_accuracy']:.2f}." if before else ""),
        "",
        "| run | " + " | ".join(f"depth {depth}" for depth in depths) + " | all | answer log-likelihood |",
        "|---|" + "---|" * (len(depths) + 2),
    ]
    for run in order:
        by_depth = run.get("passkey_by_depth")
        if not run["ok"] or not by_depth:
            continue
        cells = [f"{by_depth[d]['accuracy']:.2f}" if d in by_depth else "" for d in depths]
        lines.append(f"| {run['name']} | {' | '.join(cells)} | {run['passkey_accuracy']:.2f} | "
                     f"{run['passkey_answer_loglik']:.3f} |")  # fmt: skip
    return lines


def plot(document: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    passkey = _has_passkey(document)
    figure, axes = plt.subplots(1, 2 if passkey else 1, figsize=(12.8 if passkey else 6.4, 4.2), squeeze=False)
    axis = axes[0, 0]
    lines = sorted({(r["scorer"], r.get("mode", "")) for r in document["runs"] if r["scorer"] != "dense" and r["ok"]})
    for scorer, mode in lines:
        points = sorted((r["keep_ratio"], r["eval_ppl"]) for r in document["runs"]
                        if (r["scorer"], r.get("mode", "")) == (scorer, mode) and r["ok"])  # fmt: skip
        label = f"lemo, {scorer}" + (f" + {mode}" if mode else "")
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", linestyle="-" if not mode else ":",
                  label=label)  # fmt: skip
    dense = dense_ppl(document)
    if dense is not None:
        axis.axhline(dense, color="black", linestyle="--", label="dense")
    recipe = document["recipe"]
    axis.set_xlabel("keep ratio of the sparse layers")
    axis.set_ylabel(f"held-out perplexity at {recipe['short_seq'] * recipe['extension']} tokens")
    axis.set_title("Context extension with token elimination")
    axis.legend()
    axis.grid(alpha=0.3)
    if passkey:
        passkey_panel(document, axes[0, 1])
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def passkey_panel(document: dict[str, Any], axis) -> None:
    """Passkey accuracy vs needle depth, one line per run (dense in black)."""
    for run in document["runs"]:
        by_depth = run.get("passkey_by_depth")
        if not run["ok"] or not by_depth:
            continue
        depths = sorted(by_depth, key=float)
        style = {"color": "black", "linestyle": "--"} if run["scorer"] == "dense" else {}
        axis.plot([float(d) for d in depths], [by_depth[d]["accuracy"] for d in depths], marker="o",
                  label=run["name"], **style)  # fmt: skip
    recipe = document["recipe"]
    axis.set_xlabel("needle depth (share of the haystack before it)")
    axis.set_ylabel("passkey accuracy")
    axis.set_ylim(-0.05, 1.05)
    axis.set_title(f"Passkey retrieval at {recipe['short_seq'] * recipe['extension']} tokens")
    axis.legend(fontsize="small")
    axis.grid(alpha=0.3)


def write(document: dict[str, Any], out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stem}.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=1))
    tmp.replace(json_path)
    md_path = out / f"{stem}.md"
    md_path.write_text(markdown(document))
    paths = [json_path, md_path]
    png = plot(document, out / f"{stem}.png")
    if png is not None:
        paths.append(png)
    return paths
