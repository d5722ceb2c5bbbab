"""How long one predictor update takes (the unit of the predictors' calibration), at the Llama-3-8B width.

One sparse layer's calibration on one micro-batch is ``PredictorTrainer.observe``: the recall on the batch, then
``calibration_updates`` optimizer steps of the layer's predictor on it. This times that call on random layer inputs
[1, s, 4096] (bf16) with labels of packed documents, for the predictor as it is (``current``) and, in the same
process, with the two operations it replaced (``indexing``: the pair bias gathered by tensor indexing and the loss
taken over a boolean selection of the allowed pairs), whose backward kernels took 93% of a calibration at 128K
tokens (benchmarks/results/faster-than-hf-liger-20261206/calibration-128k).

    python benchmarks/predictor_update_speed.py --seq 65536,131072 --out DIR

Writes DIR/predictor-update-speed.json (machine, commit, command, ms per update per case).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lemo_ds.predictors import trainer as trainer_module
from lemo_ds.predictors.labels import OracleLabels
from lemo_ds.predictors.loss import normalized_tiles
from lemo_ds.predictors.module import LayerPredictor, PredictorBank, PredictorDesign, distance_bucket
from lemo_ds.predictors.trainer import PredictorTrainer, SelectionRule

REPO = Path(__file__).resolve().parents[1]
HIDDEN, BLOCK, LAYER = 4096, 64, 16


def indexed_pair_bias(self: LayerPredictor, n: int, device: torch.device) -> torch.Tensor:
    """The former pair bias: [n, n] gathered from the distance table by tensor indexing."""
    idx = torch.arange(n, device=device)
    table = self.dist_bias[distance_bucket(idx, self.design.distance_buckets)]  # [n]
    return table[(idx[:, None] - idx[None, :]).clamp_min(0)]


def selected_loss(pred_tiles, pred_scores, labels, choose, forced, rank_weight=0.0):
    """The former loss: SmoothL1 over a boolean selection of the allowed pairs."""
    target, allowed = normalized_tiles(labels)
    loss = F.smooth_l1_loss(pred_tiles[allowed], target[allowed])
    return loss, {"loss": float(loss.detach())}


@contextlib.contextmanager
def formulation(name: str):
    """``current``: the code as it is; ``indexing``: the two replaced operations patched back in."""
    if name == "current":
        yield
        return
    saved = LayerPredictor.pair_bias, trainer_module.predictor_loss
    LayerPredictor.pair_bias, trainer_module.predictor_loss = indexed_pair_bias, selected_loss
    try:
        yield
    finally:
        LayerPredictor.pair_bias, trainer_module.predictor_loss = saved


def packed_labels(seq: int, document: int, device: torch.device, gen: torch.Generator) -> OracleLabels:
    """Random oracle tiles of a row of ``document``-token documents (zero outside each document's causal pairs)."""
    n = -(-seq // BLOCK)
    first = (torch.arange(n) * BLOCK // document * document) // BLOCK  # [n] each block's document's first block
    lo_block = first[None].to(device)  # [1, n]
    idx = torch.arange(n, device=device)
    allowed = (idx[None, :] <= idx[:, None]) & (idx[None, None, :] >= lo_block[:, :, None])  # [1, n, n]
    tiles = torch.rand(1, n, n, generator=gen).to(device) * allowed
    return OracleLabels(tiles.sum(1), tiles, lo_block)


def time_observe(seq: int, updates: int, repeats: int, device: torch.device) -> float:
    """Median seconds of one observe call (recall + ``updates`` steps) after a warm-up call."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, seq, HIDDEN, generator=gen).to(device, torch.bfloat16)  # [1, s, h]
    labels = packed_labels(seq, 1024, device, gen)
    bank = PredictorBank(HIDDEN, PredictorDesign(), [LAYER]).to(device)
    trainer = PredictorTrainer(bank, SelectionRule(BLOCK, {LAYER: 0.4}, window=8))
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        trainer.observe(LAYER, hidden, labels, updates)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return sorted(times[1:])[len(times[1:]) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", default="65536,131072", help="comma-separated tokens per row")
    parser.add_argument("--updates", type=int, default=20, help="optimizer steps per observe (calibration_updates)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--formulations", default="current,indexing")
    parser.add_argument("--out", default="outputs/predictor-update-speed")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = []
    for seq in (int(value) for value in args.seq.split(",")):
        for name in args.formulations.split(","):
            with formulation(name):
                seconds = time_observe(seq, args.updates, args.repeats, device)
            cases.append({"seq": seq, "formulation": name, "observe_s": seconds,
                          "ms_per_update": 1e3 * seconds / (args.updates + 1)})  # fmt: skip
            print(f"{seq:>7} {name:<9} {seconds:8.3f} s per observe, {cases[-1]['ms_per_update']:7.2f} ms per update")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    record = {
        "machine": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "commit": commit or None,
        "command": "python benchmarks/predictor_update_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__,
        "updates": args.updates,
        "note": "ms_per_update: observe_s / (updates + 1), the recall pass counted as one",
        "cases": cases,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictor-update-speed.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
