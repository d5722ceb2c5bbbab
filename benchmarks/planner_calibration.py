"""Calibrate and check the planner's memory model (lemo_ds/plan/memory.py) against the committed GPU measurements.

    PYTHONPATH=. python benchmarks/planner_calibration.py [--out benchmarks/results/planner-calibration.json]

Every case below is a committed result file (read here, measured peak taken from it) and the configuration that
case ran, written out by hand from the file's command, the config at the file's commit and the results README
(the result files name configs by path only). The model's fitted constants: A_H and CONSTANT_BYTES, a least-squares
fit on the cases marked "fit", then TILED_FULL_LENGTH_H_FUSED on those marked "fit tiled"; lemo_ds/plan/memory.py
holds copies of them (the planner does not read this file). Out-of-memory probes have no peak: the check is that
the planner predicts they do not fit.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lemo_ds.plan import memory  # noqa: E402
from lemo_ds.plan.memory import GIB, Setup, Shape  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
LLAMA3 = Shape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256)
LEMO_RATIOS = tuple([1.0] * 16 + [0.4] * 15 + [1.0])  # keep 0.4 in layers 16..30 ("dense_layers": "auto")
DENSE_RATIOS = tuple([1.0] * 32)
H100_GIB, H200_GIB, H200_HOST_GIB = 79.18, 139.8, 125.0  # the result files' device; the H200 machine's RAM

# The configurations (Setup keywords) of the cases.
# lora_float32: peft's float32 adapters, which launch/train.py held under ZeRO-3 until 50ffd31 (and the harness, a
# plain get_peft_model, holds); since 50ffd31 the main job's adapters are bf16.
MAIN_JOB = dict(liger_loss=True, fused_ops=True, offload_checkpoints=True)  # zero3_lemo.json since 50ffd31
MAIN_JOB_TILED = dict(MAIN_JOB, tiled_mlp=True)  # + memory.tiled_mlp (the max-context configs)
MAIN_JOB_TILED_ONE_CALL = dict(MAIN_JOB_TILED, attention_pieces=False)  # before lemo_ds.attention_pieces (ae52247)
# + ZeRO-3's parameter offload and memory.layers_per_stored_input 2 (gpu_calls.sh h100-512k-two-layers-per-input)
MAIN_JOB_TILED_OFFLOAD_PARAM = dict(MAIN_JOB_TILED, offload_params="cpu", layers_per_stored_input=2)
MAIN_JOB_FLOAT32_LORA = dict(MAIN_JOB, lora_float32=True)  # zero3_lemo.json as of 2026-12-06, before 50ffd31
MAIN_JOB_NO_OFFLOAD = dict(MAIN_JOB_FLOAT32_LORA, offload_checkpoints=False)
BEFORE_FUSED = dict(liger_loss=True, fused_ops=False, offload_checkpoints=False, lora_float32=True)  # on 2026-12-02
HARNESS_OFFLOAD = dict(  # benchmarks/harness/variants.py: lemo-oracle+ckpt+offload (MEMORY_OFFLOAD)
    liger_loss=False, fused_ops=False, compact_saves=True, tiled_mlp=True, tiled_mlp_tokens=2048,
    offload_checkpoints=True, zero_stage=0, lora_float32=True,
)  # fmt: skip
HARNESS_STACK = {**HARNESS_OFFLOAD, "offload_checkpoints": False}
HARNESS_DENSE_LIGER = dict(  # dense+ckpt+chunked-loss: Hugging Face layers, Liger loss, every input stored
    liger_loss=True, fused_ops=False, sparse_checkpointing=False, zero_stage=0, lora_float32=True,
)  # fmt: skip
RECOMMENDED_RATIOS = tuple([1.0] * 16 + [0.4] * 16)  # "dense_layers": "first_half" (zero3_lemo.json since 7e73dd7)
KEEP06_RATIOS = tuple([1.0] * 16 + [0.6] * 16)  # the same at keep 0.6 (zero3_lemo.json since 2026-12-07)


def product_path_peak(name: str, index: int) -> float | None:
    case = json.loads((RESULTS / name).read_text())["cases"][index]
    if case["status"] != "ok":
        return None
    return case.get("peak_gib") or case["summary"]["peak_mem_bytes"] / GIB


def maxctx_probe(name: str, seq: int) -> float | None:
    path = RESULTS / name
    if path.suffix == ".log":
        probes = [json.loads(line.split("MAXCTX_PROBE", 1)[1]) for line in path.read_text().splitlines()
                  if "MAXCTX_PROBE" in line]  # fmt: skip
    else:
        probes = [p for s in json.loads(path.read_text())["searches"] for p in s["probes"]]
    probe = next(p for p in probes if p["seq"] == seq)
    return probe.get("peak_allocated_gib") if probe["outcome"] == "fit" else None


def maxctx_probe_cut_while_exiting(name: str, seq: int) -> float:
    """The peak of a probe that trained its steps (its "lemo_ds: done" line) but was cut by the call's budget while
    exiting, before product_path read its summary (recorded "budget"; product_path now counts such a probe as a fit):
    the last "cuda peak N GiB" of the job's progress bar, which the file keeps in the probe's error tail."""
    searches = json.loads((RESULTS / name).read_text())["searches"]
    probe = next(p for s in searches for p in s["probes"] if p["seq"] == seq)
    assert any(line.startswith("lemo_ds: done:") for line in probe["job_lines"]), "the job did not finish"
    return float(re.findall(r"cuda peak ([0-9.]+)GiB", probe["error"])[-1])


def memory_long_peak(name: str, seq: int, variant: str) -> float:
    for config in json.loads((RESULTS / name).read_text())["configurations"]:
        for v in config["variants"]:
            if config["seq"] == seq and v["name"] == variant:
                return v["peak_allocated_gib"]
    raise KeyError(variant)


LC = "longest-context-20261207/"
MC = "max-context-20261207/"
KR = "keep-ratio-20261207/"
FH = "faster-than-hf-liger-20261206/"
FH7 = "faster-than-hf-liger-20261207/"
PR = "packed-rows-20261202/"
MS = "memory-stack-fixes-20261122/"
# (case, source file, measured GiB or None for out of memory, seq, ratios, setup keywords, device GiB, role)
CASES = [
    (
        "main job zero3_lemo 64K packed, H100 (bf16 adapters)",
        FH7 + "h100-64k-packed.json",
        product_path_peak(FH7 + "h100-64k-packed.json", 2),
        65536,
        RECOMMENDED_RATIOS,
        MAIN_JOB,
        H100_GIB,
        "fit",
    ),
    (
        "main job zero3_lemo (calibrated on 1 micro-batch) 128K packed, H100 (bf16 adapters)",
        FH7 + "h100-128k-packed.json",
        product_path_peak(FH7 + "h100-128k-packed.json", 1),
        131072,
        RECOMMENDED_RATIOS,
        MAIN_JOB,
        H100_GIB,
        "fit",
    ),
    (
        "main job zero3_lemo (calibrated on 1 micro-batch) 64K one-document rows, H100 (bf16 adapters)",
        FH7 + "h100-64k-one-doc-lemo.json",
        product_path_peak(FH7 + "h100-64k-one-doc-lemo.json", 0),
        65536,
        RECOMMENDED_RATIOS,
        MAIN_JOB,
        H100_GIB,
        "check",
    ),
    (
        "main job zero3_lemo (calibrated on 1 micro-batch) 128K one-document rows, H100 (bf16 adapters)",
        FH7 + "h100-128k-one-doc.json",
        product_path_peak(FH7 + "h100-128k-one-doc.json", 1),
        131072,
        RECOMMENDED_RATIOS,
        MAIN_JOB,
        H100_GIB,
        "check",
    ),
    (
        "main job zero3_lemo at keep 0.6 (calibrated on 1 micro-batch) 128K packed, H100",
        KR + "product-path-128k-packed.json",
        product_path_peak(KR + "product-path-128k-packed.json", 0),
        131072,
        KEEP06_RATIOS,
        MAIN_JOB,
        H100_GIB,
        "check",
    ),
    (
        "main job zero3_lemo at keep 0.6 (calibrated on 1 micro-batch) 128K one-document rows, H100",
        KR + "product-path-128k-one-doc.json",
        product_path_peak(KR + "product-path-128k-one-doc.json", 0),
        131072,
        KEEP06_RATIOS,
        MAIN_JOB,
        H100_GIB,
        "check",
    ),
    (
        "main job + tiled MLP, max-context probe 256K packed, H100",
        LC + "h100-lemo-tiled-packed-512k-256k.json",
        maxctx_probe(LC + "h100-lemo-tiled-packed-512k-256k.json", 262144),
        262144,
        RECOMMENDED_RATIOS,
        MAIN_JOB_TILED,
        H100_GIB,
        "fit tiled",
    ),
    (
        "main job + tiled MLP, max-context probe 384K packed, H100 (cut while exiting)",
        LC + "h100-lemo-tiled-packed-384k.json",
        maxctx_probe_cut_while_exiting(LC + "h100-lemo-tiled-packed-384k.json", 393216),
        393216,
        RECOMMENDED_RATIOS,
        MAIN_JOB_TILED,
        H100_GIB,
        "fit tiled",
    ),
    (
        "main job + tiled MLP, max-context probe 512K packed, H100",
        LC + "h100-lemo-tiled-packed-512k-256k.json",
        maxctx_probe(LC + "h100-lemo-tiled-packed-512k-256k.json", 524288),
        524288,
        RECOMMENDED_RATIOS,
        MAIN_JOB_TILED_ONE_CALL,
        H100_GIB,
        "oom",
    ),
    (
        "main job + tiled MLP + parameter offload + 2 layers per stored input, max-context probe 256K packed, H100",
        MC + "h100-512k-packed-pieces-of-2pow31.json",
        maxctx_probe(MC + "h100-512k-packed-pieces-of-2pow31.json", 262144),
        262144,
        RECOMMENDED_RATIOS,
        MAIN_JOB_TILED_OFFLOAD_PARAM,
        H100_GIB,
        "check",
    ),
    (
        "main job + tiled MLP + parameter offload + 2 layers per stored input, 512K + 64 packed, H100",
        MC + "h100-512k-packed.json",
        maxctx_probe(MC + "h100-512k-packed.json", 524352),
        524352,
        RECOMMENDED_RATIOS,
        MAIN_JOB_TILED_OFFLOAD_PARAM,
        H100_GIB,
        "check",
    ),
    (
        "zero3_dense_stack 64K packed, H100 (bf16 adapters)",
        FH7 + "h100-64k-packed-dense-stack.json",
        product_path_peak(FH7 + "h100-64k-packed-dense-stack.json", 1),
        65536,
        DENSE_RATIOS,
        MAIN_JOB,
        H100_GIB,
        "check",
    ),
    (
        "main job zero3_lemo 64K packed, H100",
        FH + "h100-64k-packed.json",
        product_path_peak(FH + "h100-64k-packed.json", 1),
        65536,
        LEMO_RATIOS,
        MAIN_JOB_FLOAT32_LORA,
        H100_GIB,
        "check",
    ),
    (
        "main job zero3_lemo 128K packed, H100",
        FH + "h100-128k-packed.json",
        product_path_peak(FH + "h100-128k-packed.json", 1),
        131072,
        LEMO_RATIOS,
        MAIN_JOB_FLOAT32_LORA,
        H100_GIB,
        "check",
    ),
    (
        "main job, predictor scorer, 64K packed, H100",
        FH + "h100-64k-packed-predictor-and-dense-stack.json",
        product_path_peak(FH + "h100-64k-packed-predictor-and-dense-stack.json", 1),
        65536,
        LEMO_RATIOS,
        MAIN_JOB_FLOAT32_LORA,
        H100_GIB,
        "check",
    ),
    (
        "main job, recommended settings (zero3_lemo.json since 7e73dd7), 64K packed, H100",
        FH + "h100-64k-packed-autocast-and-recommended.json",
        product_path_peak(FH + "h100-64k-packed-autocast-and-recommended.json", 3),
        65536,
        RECOMMENDED_RATIOS,
        MAIN_JOB_FLOAT32_LORA,
        H100_GIB,
        "check",
    ),
    (
        "main job, recommended settings, 128K packed, H100",
        FH + "h100-128k-packed-autocast-and-recommended.json",
        product_path_peak(FH + "h100-128k-packed-autocast-and-recommended.json", 1),
        131072,
        RECOMMENDED_RATIOS,
        MAIN_JOB_FLOAT32_LORA,
        H100_GIB,
        "check",
    ),
    (
        "zero3_dense_stack 64K packed, H100",
        FH + "h100-64k-packed-predictor-and-dense-stack.json",
        product_path_peak(FH + "h100-64k-packed-predictor-and-dense-stack.json", 2),
        65536,
        DENSE_RATIOS,
        MAIN_JOB_FLOAT32_LORA,
        H100_GIB,
        "check",
    ),
    (
        "main job, offload off, 128K packed, H200",
        FH + "h200-explore-128k-packed-offload.json",
        product_path_peak(FH + "h200-explore-128k-packed-offload.json", 0),
        131072,
        LEMO_RATIOS,
        MAIN_JOB_NO_OFFLOAD,
        H200_GIB,
        "check",
    ),
    (
        "main job, offload on, 128K packed, H200",
        FH + "h200-explore-128k-packed-offload.json",
        product_path_peak(FH + "h200-explore-128k-packed-offload.json", 1),
        131072,
        LEMO_RATIOS,
        MAIN_JOB_FLOAT32_LORA,
        H200_GIB,
        "check",
    ),
    (
        "main job, offload off, 64K packed, H200 (before the fetch fix)",
        FH + "h200-explore-64k-packed-oracle-unfixed.json",
        product_path_peak(FH + "h200-explore-64k-packed-oracle-unfixed.json", 1),
        65536,
        LEMO_RATIOS,
        MAIN_JOB_NO_OFFLOAD,
        H200_GIB,
        "check",
    ),
    (
        "zero3_lemo (before fused kernels) 64K packed, H200",
        PR + "product-path-20261202-213614.json",
        product_path_peak(PR + "product-path-20261202-213614.json", 0),
        65536,
        LEMO_RATIOS,
        BEFORE_FUSED,
        H200_GIB,
        "check",
    ),
    (
        "zero3_dense_stack (before fused kernels) 64K packed, H200",
        PR + "product-path-20261202-213614.json",
        product_path_peak(PR + "product-path-20261202-213614.json", 1),
        65536,
        DENSE_RATIOS,
        BEFORE_FUSED,
        H200_GIB,
        "check",
    ),
    (
        "zero3_lemo (before fused kernels) 128K packed, H200",
        PR + "product-path-20261202-082253.json",
        product_path_peak(PR + "product-path-20261202-082253.json", 0),
        131072,
        LEMO_RATIOS,
        BEFORE_FUSED,
        H200_GIB,
        "check",
    ),
    (
        "zero3_dense_stack (before fused kernels) 128K packed, H200",
        PR + "product-path-20261202-082649.json",
        product_path_peak(PR + "product-path-20261202-082649.json", 2),
        131072,
        DENSE_RATIOS,
        BEFORE_FUSED,
        H200_GIB,
        "check",
    ),
    (
        "zero3_dense (plain DeepSpeed, Hugging Face loss) 64K packed, H200",
        PR + "product-path-20261202-082431.json",
        product_path_peak(PR + "product-path-20261202-082431.json", 0),
        65536,
        DENSE_RATIOS,
        dict(BEFORE_FUSED, segment_loss=False, liger_loss=False, sparse_checkpointing=False),
        H200_GIB,
        "oom",
    ),
    (
        "harness lemo-oracle+ckpt+stack 128K",
        MS + "after/memory-long-20261122-044636.json",
        memory_long_peak(MS + "after/memory-long-20261122-044636.json", 131072, "lemo-oracle+ckpt+stack"),
        131072,
        LEMO_RATIOS,
        HARNESS_STACK,
        H200_GIB,
        "check",
    ),
    (
        "harness lemo-oracle+ckpt+offload 128K",
        MS + "after/memory-long-20261122-044636.json",
        memory_long_peak(MS + "after/memory-long-20261122-044636.json", 131072, "lemo-oracle+ckpt+offload"),
        131072,
        LEMO_RATIOS,
        HARNESS_OFFLOAD,
        H200_GIB,
        "check",
    ),
    (
        "harness max context lemo-oracle+ckpt+offload 464K, one document",
        MS + "maxctx/lemo-probes.log",
        maxctx_probe(MS + "maxctx/lemo-probes.log", 475136),
        475136,
        LEMO_RATIOS,
        HARNESS_OFFLOAD,
        H200_GIB,
        "check",
    ),
    (
        "harness max context lemo-oracle+ckpt+offload 464K, packed",
        PR + "maxctx-packed-20261202-083626.json",
        maxctx_probe(PR + "maxctx-packed-20261202-083626.json", 475136),
        475136,
        LEMO_RATIOS,
        HARNESS_OFFLOAD,
        H200_GIB,
        "check",
    ),
    (
        "harness max context lemo-oracle+ckpt+offload 528K, packed",
        PR + "maxctx-20261202-084201.json",
        maxctx_probe(PR + "maxctx-20261202-084201.json", 540672),
        540672,
        LEMO_RATIOS,
        dict(HARNESS_OFFLOAD, attention_pieces=False),  # one attention call: before lemo_ds.attention_pieces
        H200_GIB,
        "oom",
    ),
    (
        "harness max context lemo-oracle+ckpt+offload 576K, packed",
        PR + "maxctx-20261202-083938.json",
        maxctx_probe(PR + "maxctx-20261202-083938.json", 589824),
        589824,
        LEMO_RATIOS,
        dict(HARNESS_OFFLOAD, attention_pieces=False),  # one attention call: before lemo_ds.attention_pieces
        H200_GIB,
        "oom",
    ),
    (
        "harness max context dense+ckpt+chunked-loss 232K",
        MS + "maxctx/dense-probes.log",
        maxctx_probe(MS + "maxctx/dense-probes.log", 237568),
        237568,
        DENSE_RATIOS,
        HARNESS_DENSE_LIGER,
        H200_GIB,
        "oom",
    ),
]


def predict(case) -> memory.Prediction:
    _, _, _, seq, ratios, setup, _, _ = case
    return memory.predict(LLAMA3, Setup(seq_len=seq, keep_ratios=ratios, **setup))


def fit_constants() -> tuple[float, float]:
    """Least squares of measured - prediction(A_H=0, CONSTANT=0) on a x (A_H's bytes) + c over the "fit" cases."""
    saved = memory.A_H, memory.CONSTANT_BYTES
    rows = []
    for case in (c for c in CASES if c[7] == "fit"):
        memory.A_H, memory.CONSTANT_BYTES = 0.0, 0.0
        base = predict(case).device_bytes
        memory.A_H = 1.0
        per_a = predict(case).device_bytes - base
        rows.append((per_a, case[2] * GIB - base))
    memory.A_H, memory.CONSTANT_BYTES = saved
    n = len(rows)
    mx, my = sum(r[0] for r in rows) / n, sum(r[1] for r in rows) / n
    sxx = sum((r[0] - mx) ** 2 for r in rows)
    a = sum((r[0] - mx) * (r[1] - my) for r in rows) / sxx if sxx else my / mx
    return a, my - a * mx


def fit_fused_tiled() -> float:
    """TILED_FULL_LENGTH_H_FUSED: the mean over the "fit tiled" cases of (measured - prediction with it 0) in units
    of its bytes (h x b per token of a dense layer), A_H and CONSTANT_BYTES as they are."""
    saved = memory.TILED_FULL_LENGTH_H_FUSED
    units = []
    for case in (c for c in CASES if c[7] == "fit tiled"):
        memory.TILED_FULL_LENGTH_H_FUSED = 0.0
        base = predict(case).device_bytes
        memory.TILED_FULL_LENGTH_H_FUSED = 1.0
        units.append((case[2] * GIB - base) / (predict(case).device_bytes - base))
    memory.TILED_FULL_LENGTH_H_FUSED = saved
    return sum(units) / len(units)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(RESULTS / "planner-calibration.json"))
    args = parser.parse_args()
    a_h, constant = fit_constants()
    tiled = fit_fused_tiled()
    print(f"fit: A_H = {a_h:.3f} elements of h per token, CONSTANT = {constant / GIB:.3f} GiB, "
          f"TILED_FULL_LENGTH_H_FUSED = {tiled:.3f} (lemo_ds/plan/memory.py has A_H = {memory.A_H}, CONSTANT_BYTES = "
          f"{memory.CONSTANT_BYTES}, TILED_FULL_LENGTH_H_FUSED = {memory.TILED_FULL_LENGTH_H_FUSED})")  # fmt: skip
    rows = []
    for case in CASES:
        name, source, measured, seq, _, setup, gpu_gib, role = case
        p = predict(case)
        fits = memory.fits(p, int(gpu_gib * GIB), int(H200_HOST_GIB * GIB))
        row = {"case": name, "source": f"benchmarks/results/{source}", "role": role, "seq_len": seq,
               "keep_ratios": list(case[4]),
               "setup": setup, "gpu_gib": gpu_gib, "predicted_gib": round(p.device_bytes / GIB, 2),
               "predicted_host_gib": round(p.host_bytes / GIB, 2), "predicted_fits": fits,
               "terms_gib": {k: round(v / GIB, 2) for k, v in p.terms.items()}}  # fmt: skip
        if measured is None:
            row.update(measured="out of memory", ok=not fits)
            print(f"{name}: out of memory; predicted {row['predicted_gib']} GiB device, "
                  f"{row['predicted_host_gib']} GiB host -> {'OOM predicted' if not fits else 'MISSED'}")  # fmt: skip
        else:
            error = p.device_bytes / GIB / measured - 1
            row.update(measured_gib=round(measured, 2), error=round(error, 4), ok=abs(error) <= 0.10 and fits)
            print(f"{name}: predicted {row['predicted_gib']} GiB, measured {measured:.2f} GiB, error {error:+.1%}")
        rows.append(row)
    out = {"command": "PYTHONPATH=. python benchmarks/planner_calibration.py",
           "fit": {"A_H": round(a_h, 3), "CONSTANT_BYTES": round(constant),
                   "on": [c[0] for c in CASES if c[7] == "fit"],
                   "TILED_FULL_LENGTH_H_FUSED": round(tiled, 3),
                   "TILED_FULL_LENGTH_H_FUSED on": [c[0] for c in CASES if c[7] == "fit tiled"]},
           "model_constants_used": {"A_H": memory.A_H, "CONSTANT_BYTES": memory.CONSTANT_BYTES,
                                    "TILED_FULL_LENGTH_H_FUSED": memory.TILED_FULL_LENGTH_H_FUSED},
           "tolerance": 0.10, "cases": rows}  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}: {sum(r['ok'] for r in rows)} of {len(rows)} cases within 10% / OOM predicted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
