"""The accuracy result: JSON, a Markdown table and a plot (held-out perplexity vs keep ratio, one line per
scorer, dense as a horizontal line)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _dense_ppl(document: dict[str, Any]) -> float | None:
    """The plain dense run's perplexity (runs named "dense+<mode>" are dense under other fine-tuning settings)."""
    return next((r.get("eval_ppl") for r in document["runs"] if r["name"] == "dense" and r["ok"]), None)


# Results written before recipe.rope_scaling existed used position interpolation.
_SCALING = {"linear": "RoPE position interpolation", "yarn": "RoPE YaRN"}


def markdown(document: dict[str, Any]) -> str:
    recipe, ref = document["recipe"], document["reference"]
    long_seq = recipe["short_seq"] * recipe["extension"]
    dense = _dense_ppl(document)
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
    return "\n".join(lines) + "\n"


def plot(document: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    lines = sorted({(r["scorer"], r.get("mode", "")) for r in document["runs"] if r["scorer"] != "dense" and r["ok"]})
    for scorer, mode in lines:
        points = sorted((r["keep_ratio"], r["eval_ppl"]) for r in document["runs"]
                        if (r["scorer"], r.get("mode", "")) == (scorer, mode) and r["ok"])  # fmt: skip
        label = f"lemo, {scorer}" + (f" + {mode}" if mode else "")
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", linestyle="-" if not mode else ":",
                  label=label)  # fmt: skip
    dense = _dense_ppl(document)
    if dense is not None:
        axis.axhline(dense, color="black", linestyle="--", label="dense")
    recipe = document["recipe"]
    axis.set_xlabel("keep ratio of the sparse layers")
    axis.set_ylabel(f"held-out perplexity at {recipe['short_seq'] * recipe['extension']} tokens")
    axis.set_title("Context extension with token elimination")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


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
