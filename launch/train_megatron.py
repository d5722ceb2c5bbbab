"""Train a small Megatron-core GPT model with LeMo token elimination (lemo_ds.megatron), data parallel.

Run from the repository root:

    # two ranks (CPU ranks over gloo without a GPU, NCCL with GPUs): 20 steps of 256 tokens, lemo on
    torchrun --nproc_per_node 2 launch/train_megatron.py

    # the same through DeepSpeed's launcher
    deepspeed --num_gpus 2 launch/train_megatron.py

    # one process, no launcher; the "lemo" section of a DeepSpeed config, or inline JSON
    python launch/train_megatron.py --lemo '{"keep_ratio": 0.4, "block_size": 32}' --steps 5
    python launch/train_megatron.py --lemo '{"keep_ratio": 0.25, "scorer": "norm", "block_size": 32}'

    # the dense baseline (the stock layer spec everywhere)
    python launch/train_megatron.py --lemo none

The model is Megatron-core's GPTModel built from ``get_lemo_gpt_layer_local_spec`` (Megatron's local spec, no
Transformer Engine; tensor and pipeline parallel size 1), with RoPE and random init, over the byte tokenizer. The
data are lemo_ds.training.data's packed rows (the Python standard library by default, --data for yours): every
packed document is its own attention span (a block-diagonal causal mask, which the sparse layers restrict to their
kept tokens), and no token is trained to predict the first token of the next document. AdamW from torch; the
gradients are averaged over the data-parallel ranks with one all-reduce per step. Rank 0 prints one line per step
and writes OUTPUT_DIR/summary.json. Bad input stops before any collective with one line "lemo_ds: error: ..." on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # a checkout that was not pip-installed: import lemo_ds from here
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lemo_ds.atomic_io import write_text_atomic  # noqa: E402
from lemo_ds.config import LEMO_KEY, LemoConfig, load_ds_config, parse_lemo_config  # noqa: E402
from lemo_ds.errors import LemoError, print_error_line, write_line  # noqa: E402
from lemo_ds.megatron_section import refuse_unhonoured_keys, with_megatron_defaults  # noqa: E402
from lemo_ds.training import data, launch_env  # noqa: E402
from lemo_ds.training.errors import TrainingSetupError  # noqa: E402
from lemo_ds.training.tokenizer import ByteTokenizer  # noqa: E402

DEFAULT_LEMO = '{"keep_ratio": 0.4, "block_size": 32}'


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--lemo", default=DEFAULT_LEMO, help='"lemo" section: inline JSON, a DeepSpeed JSON config path, or "none"')
    add("--block-size", type=int, default=None, help="override lemo.block_size")
    add("--data", default=None, help='text file, .jsonl ("text" field) or folder; default: the Python stdlib')
    add("--seq-len", type=int, default=256, help="tokens per packed row")
    add("--micro-batch", type=int, default=1, help="rows per rank per step")
    add("--steps", type=int, default=20, help="optimizer steps")
    add("--layers", type=int, default=4)
    add("--hidden", type=int, default=128)
    add("--heads", type=int, default=4)
    add("--query-groups", type=int, default=2, help="key/value heads (grouped-query attention)")
    add("--lr", type=float, default=1e-3)
    add("--recompute", action="store_true", help="Megatron's full activation recompute of every layer")
    add("--seed", type=int, default=0)
    add("--output-dir", default="outputs/megatron", help="where summary.json goes")
    add("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed's launcher
    args = parser.parse_args(argv)
    for name in ("seq_len", "micro_batch", "steps", "layers", "hidden", "heads", "query_groups"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def lemo_section(args: argparse.Namespace) -> LemoConfig | None:
    """The validated "lemo" section the flags name (None: dense)."""
    if args.lemo.strip().lower() == "none":
        return None
    if os.path.isfile(args.lemo):
        section = load_ds_config(args.lemo).get(LEMO_KEY)  # validated once, below, with --block-size applied
    else:
        try:
            section = json.loads(args.lemo)
        except json.JSONDecodeError as error:
            raise TrainingSetupError(f"--lemo is neither a file nor JSON: {error}") from None
    if section is None:
        return None
    if args.block_size is not None:
        section = {**section, "block_size": args.block_size}
    lemo = parse_lemo_config(section)
    if lemo.enabled:  # before Megatron is imported; the summary records the rule the layers run
        refuse_unhonoured_keys(lemo)
        lemo = with_megatron_defaults(lemo)
    if lemo.enabled and args.seq_len < lemo.block_size:
        raise TrainingSetupError(f"--seq-len {args.seq_len} is shorter than one lemo block ({lemo.block_size})")
    return lemo


def batch_tensors(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Megatron's inputs from a packed micro-batch: targets are the next tokens (Megatron does not shift), the loss
    mask drops the last position and every position whose next token opens a document, and the attention mask
    [b, 1, s, s] (True = masked out) keeps every document to itself."""
    ids = batch["input_ids"].to(device)  # [b, s]
    positions = batch["position_ids"].to(device)  # [b, s], 0 at every document start
    seq = ids.shape[1]
    targets = torch.roll(ids, -1, dims=1)  # [b, s]
    loss_mask = torch.roll(positions, -1, dims=1) != 0  # [b, s]
    loss_mask[:, -1] = False
    doc = (positions == 0).long().cumsum(1)  # [b, s]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    allowed = causal & (doc[:, :, None] == doc[:, None, :])  # [b, s, s]
    return {"ids": ids, "targets": targets, "loss_mask": loss_mask.float(), "attention_mask": ~allowed[:, None]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        lemo = lemo_section(args)
        files = data.discover_files(args.data)
        tokenizer = ByteTokenizer()
        data.check_corpus(files, tokenizer, args.seq_len, args.data)
    except (LemoError, TrainingSetupError) as error:
        print_error_line(error)
        return 2

    # Megatron-core is imported only now: it takes seconds, and bad flags should not wait for it.
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from lemo_ds.megatron import attach_lemo, get_lemo_gpt_layer_local_spec, megatron_on_cpu

    launch_env.default_single_process_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda" and local_rank >= torch.cuda.device_count():
        write_line(
            f"lemo_ds: error: local rank {local_rank} but {torch.cuda.device_count()} GPU(s); one GPU per rank "
            "(or CUDA_VISIBLE_DEVICES= for CPU ranks)"
        )
        return 2
    launch_env.set_cpu_threads(device.type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    log = print if rank == 0 else (lambda *_: None)
    try:
        with megatron_on_cpu():
            if device.type == "cuda":
                tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
            recompute = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
            config = TransformerConfig(
                num_layers=args.layers,
                hidden_size=args.hidden,
                num_attention_heads=args.heads,
                num_query_groups=args.query_groups,
                ffn_hidden_size=4 * args.hidden,
                normalization="RMSNorm",
                gated_linear_unit=True,
                activation_func=F.silu,
                add_bias_linear=False,
                hidden_dropout=0.0,
                attention_dropout=0.0,
                use_cpu_initialization=True,
                params_dtype=torch.float32,
                **(recompute if args.recompute else {}),
            )
            torch.manual_seed(args.seed)  # the same initial weights on every rank
            spec = get_lemo_gpt_layer_local_spec(lemo, config=config, normalization="RMSNorm")
            model = GPTModel(
                config,
                transformer_layer_spec=spec,
                vocab_size=tokenizer.vocab_size,
                max_sequence_length=args.seq_len,
                position_embedding_type="rope",
            ).to(device)
            controller = attach_lemo(model)
            kinds = ["dense" if not hasattr(layer, "_lemo") else "lemo" for layer in model.decoder.layers]
            log(f"megatron GPT: {args.layers} layers ({', '.join(kinds)}), world {world}, device {device.type}")
            summary = train(args, model, controller, files, tokenizer, device, rank, world, log)
            summary["lemo"] = lemo.model_dump() if lemo is not None else None
            if rank == 0:
                out = Path(args.output_dir)
                out.mkdir(parents=True, exist_ok=True)
                write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
                log(f"wrote {out / 'summary.json'}")
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    return 0


def train(args, model, controller, files, tokenizer, device, rank: int, world: int, log) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    batches = data.rank_batches(
        data.packed_rows(files, tokenizer, args.seq_len, args.seed),
        rank=rank,
        world_size=world,
        micro_batch=args.micro_batch,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    losses, started = [], time.perf_counter()
    model.train()
    for step in range(args.steps):
        tick = time.perf_counter()
        if controller is not None:
            controller.set_step(step)  # the schedule (dense steps, ramp) follows the optimizer step
        inputs = batch_tensors(next(batches), device)
        position_ids = torch.arange(args.seq_len, device=device).expand(args.micro_batch, -1)  # RoPE is relative
        per_token = model(inputs["ids"], position_ids, inputs["attention_mask"], labels=inputs["targets"])  # [b, s]
        mask = inputs["loss_mask"]
        loss = (per_token * mask).sum() / mask.sum().clamp_min(1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Data parallel: one all-reduce of every gradient, flattened, then the mean over ranks.
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]) / world
        reduced = torch.stack([loss.detach()])
        if world > 1:
            dist.all_reduce(flat)
            dist.all_reduce(reduced)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(p)
            offset += g.numel()
        optimizer.step()
        global_loss = float(reduced[0]) / world
        losses.append(global_loss)
        seconds = time.perf_counter() - tick
        kept = controller.stats()["mean_keep_ratio"] if controller is not None else 1.0
        tokens = world * args.micro_batch * args.seq_len
        log(
            f"step {step + 1}/{args.steps}  loss {global_loss:.4f}  kept {kept:.3f}  {seconds:.2f} s  "
            f"{tokens / seconds:.0f} tok/s"
        )
    elapsed = time.perf_counter() - started
    stats = controller.stats() if controller is not None else {"keep_ratio_per_layer": [1.0] * args.layers}
    return {
        "steps": args.steps,
        "world_size": world,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "losses": losses,
        "final_loss": losses[-1],
        "loss_is_finite": all(math.isfinite(x) for x in losses),
        "keep_ratio_per_layer": stats["keep_ratio_per_layer"],
        "tokens_per_second": world * args.micro_batch * args.seq_len * args.steps / elapsed,
        "seconds": elapsed,
    }


if __name__ == "__main__":
    sys.exit(main())
