"""LeMo's oracle block scores: the fused Triton kernel, its launcher, a chunked torch path and the torch spec.

For query token i and key token j (positions in one sample), the pair score is the head-average of the positive
parts of the scaled query-key products, over the pairs the layer's attention allows::

    a(i, j) = mean_h relu(q_i^h . k_j^h * d^-0.5)   if allowed(i, j), else 0
    T(I, J) = max over i in query block I, j in key block J of a(i, j)      (blocks of B tokens, the last partial)
    S(J)    = sum over query blocks I of T(I, J)

``S`` [b, n_blocks] is the block score of token elimination; ``T`` [b, n_blocks, n_blocks] (``return_tiles``) is the
block-pair matrix the score predictors are trained on. Grouped-query attention: query head h reads key head h // G.

Masking: ``allowed(i, j)`` is always causal (``j <= i``) and comes from one input, ``allowed`` (see
:func:`allowed_pairs`, the one predicate):

- ``doc_ids`` [b or 1, s], the common case: the document index of every token (packed documents), -1 for padding;
  ``allowed(i, j) = j <= i and doc_ids[i] == doc_ids[j] and doc_ids[j] >= 0``, so a padding key is never attended
  and a padding query contributes nothing. :func:`doc_ids_from_position_ids` derives them from position ids that
  restart at 0 per document.
- a mask [b or 1, 1, s, s], where the model's own mask is unavoidable (sliding window, a custom mask): bool
  (True = attend) or additive float (0 = attend), ANDed with causality.
- None: plain causal attention.

Public API::

    oracle_scores(query, key, block_size=64, allowed=None, return_tiles=False, backend="auto", chunk_tokens=512)
        -> scores [b, n] float32, or (scores, tiles [b, n, n] float32) with return_tiles
    oracle_scores_ref(query, key, block_size, allowed=None, return_tiles=False)   # plain torch; the semantic spec
    oracle_scores_torch(query, key, block_size, allowed=None, return_tiles=False, chunk_tokens=512)  # chunked
    allowed_pairs(allowed, rows, keys, batch, device) -> [b, rows, keys] bool
    doc_ids_from_position_ids(position_ids, padding_mask=None) -> doc_ids [b, s] int32

Shapes: ``query`` [b, H, s, d], ``key`` [b, KV, s, d] with H = KV * G, any strides, float32 / bfloat16 / float16.
No gradients: the scores select tokens, they are not trained through, so everything runs under ``torch.no_grad``
and the outputs never require grad (hence no autograd function).

Backends. The Triton kernel takes doc ids or nothing, and needs d and B powers of two, d >= 16 and 16 <= B <= 128
(``tl.dot`` tiles); with ``backend="auto"`` other shapes take the chunked torch path (O(chunk x s) memory, chunk a
few blocks), which is also the path on CPU without the Triton interpreter, and the path of every mask whatever the
backend. The kernel accumulates q.k in fp32 from the input dtype (exact products); the torch path rounds each q.k
to the input dtype as torch's matmul does, so in bf16 the two differ by bf16 rounding of the logits (~0.4%
relative), in fp32 by summation order only.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dispatch import BACKENDS, resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # torch-only installs keep the torch path (dispatch.triton_usable says False)
    triton = None

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_KERNEL_BLOCK = 128  # a B x B fp32 tile per program; 256 x 256 would need 256 registers per thread at 8 warps


@dataclass(frozen=True)
class OracleKernelConfig:
    """Tiling of the Triton kernel (all powers of two).

    m_sub: query blocks per query tile (BLOCK_M = m_sub * B rows, one accumulator tile per loop step).
    n_sub: key blocks per program (BLOCK_N = n_sub * B keys, fixed for the program's lifetime).
    heads_per_step: query heads of one KV group per step of the head loop; their K tile is loaded once per step.
    chunk: query tiles per program (grid axis 1 splits the causal column of query tiles into chunks of this many).
    """

    m_sub: int = 1
    n_sub: int = 2
    heads_per_step: int = 2
    chunk: int = 0  # 0: chosen from the shape and the GPU's SM count (see _pick_chunk)
    num_warps: int = 8
    num_stages: int = 3


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _allowed_pairs_tile(rows, cols, doc_rows, doc_cols, S, HAS_DOC: tl.constexpr):
        """[BM, BN] bool, :func:`allowed_pairs` for doc ids inside the kernel: causal (which also keeps keys inside
        the sequence), query inside the sequence, and with doc ids: same document, key not padding (a padding query
        then matches no key)."""
        allowed = (cols[None, :] <= rows[:, None]) & (rows < S)[:, None]
        if HAS_DOC:
            allowed = allowed & (doc_rows[:, None] == doc_cols[None, :]) & (doc_cols >= 0)[None, :]
        return allowed

    @triton.jit
    def _oracle_scores_kernel(
        q_ptr,  # [b, H, s, d]
        k_ptr,  # [b, KV, s, d]
        doc_ptr,  # [b or 1, s] int32 (batch stride 0 when shared); unused unless HAS_DOC
        partial_ptr,  # [b, n_chunks, n_blocks] fp32, contiguous: this chunk's sum of T(I, J) over its query blocks
        tiles_ptr,  # [b, n_blocks, n_blocks] fp32, contiguous, zero-filled; unused unless STORE_TILES
        S,  # sequence length
        N_BLOCKS,  # ceil(S / BLOCK)
        N_CHUNKS,
        scale,  # d^-0.5 / H: applied to the tile maxima (max commutes with a positive scale, exactly in floats)
        q_sb,
        q_sh,
        q_ss,
        q_sd,
        k_sb,
        k_sh,
        k_ss,
        k_sd,
        doc_sb,
        doc_ss,
        NUM_HEADS: tl.constexpr,
        GROUP: tl.constexpr,  # query heads per key head (GQA ratio)
        HEAD_DIM: tl.constexpr,
        BLOCK: tl.constexpr,  # B, the scoring block
        M_SUB: tl.constexpr,
        N_SUB: tl.constexpr,
        HEADS_PER_STEP: tl.constexpr,
        CHUNK: tl.constexpr,
        HAS_DOC: tl.constexpr,
        STORE_TILES: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,  # load bf16 tiles as fp32: Triton's CPU interpreter multiplies bf16 as raw uint16 bits
    ):
        # Grid: (key tiles, query chunks, batch). A program owns BLOCK_N keys (N_SUB key blocks) and walks down
        # their column over CHUNK query tiles of BLOCK_M rows, so the column sum S(J) over those rows is added in
        # registers, in a fixed order: deterministic, no atomics, no [n, n] buffer unless the tiles are asked for.
        # Chunks (grid axis 1) give short sequences enough programs; their partial sums are added by the launcher.
        # Chunks are aligned on absolute query tiles, so programs running side by side (consecutive key tiles of
        # one chunk) stream the same query tiles and share them in L2.
        # Loop bounds are constexpr: Triton's CPU interpreter (numpy >= 2) cannot iterate over runtime bounds, so
        # tiles outside the causal range are skipped by an `if` instead (a scalar test per skipped tile).
        BLOCK_M: tl.constexpr = M_SUB * BLOCK
        BLOCK_N: tl.constexpr = N_SUB * BLOCK
        pid_n = tl.program_id(0)
        # Last chunk first: programs are dispatched in grid order, and the last chunks are full columns while the
        # first ones are short triangles, so the short programs fill the tail (longest first).
        chunk = N_CHUNKS - 1 - tl.program_id(1)
        bi = tl.program_id(2).to(tl.int64)

        # 64-bit offsets along heads and tokens: s * H * d passes 2**31 from s = 512K at H * d = 4096, whichever of
        # the two is the outer dimension. tl.cast also takes a stride that Triton specialised to the constant 1.
        q_sh, q_ss = tl.cast(q_sh, tl.int64), tl.cast(q_ss, tl.int64)
        k_sh, k_ss = tl.cast(k_sh, tl.int64), tl.cast(k_ss, tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] key positions
        dims = tl.arange(0, HEAD_DIM)  # [d]
        k_tile = k_ptr + bi * k_sb + cols[:, None] * k_ss + dims[None, :] * k_sd  # [BN, d] pointers
        k_mask = (cols < S)[:, None]
        if HAS_DOC:
            doc_cols = tl.load(doc_ptr + bi * doc_sb + cols * doc_ss, mask=cols < S, other=-1)  # [BN]
        else:
            doc_cols = cols  # placeholder, never compared

        col_sum = tl.zeros([N_SUB], dtype=tl.float32)  # sum over this chunk's query blocks of T(I, J), per J
        first_m = (pid_n * BLOCK_N) // BLOCK_M  # first query tile holding a query at or after this program's keys
        m_start = chunk * CHUNK
        if m_start + CHUNK > first_m:  # else every tile of the chunk lies above the diagonal: nothing to do
            for step in range(0, CHUNK):
                m = m_start + step
                rows = m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] query positions
                if HAS_DOC:
                    doc_rows = tl.load(doc_ptr + bi * doc_sb + rows * doc_ss, mask=rows < S, other=-1)  # [BM]
                else:
                    doc_rows = rows
                live = (m >= first_m) & (m * BLOCK_M < S)
                if HAS_DOC:
                    # Packed documents leave most off-diagonal tiles without one allowed pair: skip their heads.
                    any_allowed = tl.max(_allowed_pairs_tile(rows, cols, doc_rows, doc_cols, S, HAS_DOC).to(tl.int32))
                    live = live & (any_allowed > 0)
                if live:
                    q_tile = q_ptr + bi * q_sb + rows[:, None] * q_ss + dims[None, :] * q_sd  # [BM, d] pointers
                    q_mask = (rows < S)[:, None]
                    # The head sum of relu(q.k) for the whole tile stays in registers (fp32) across the head loop.
                    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                    for hs in range(0, NUM_HEADS // HEADS_PER_STEP):
                        h0 = hs * HEADS_PER_STEP  # HEADS_PER_STEP divides GROUP: one key head per step
                        k = tl.load(k_tile + (h0 // GROUP) * k_sh, mask=k_mask, other=0.0)  # [BN, d]
                        if UPCAST:
                            k = k.to(tl.float32)
                        kt = tl.trans(k)  # [d, BN]
                        for u in tl.static_range(HEADS_PER_STEP):
                            q = tl.load(q_tile + (h0 + u) * q_sh, mask=q_mask, other=0.0)  # [BM, d]
                            if UPCAST:
                                q = q.to(tl.float32)
                            acc += tl.maximum(tl.dot(q, kt, input_precision=INPUT_PRECISION), 0.0)
                    allowed = _allowed_pairs_tile(rows, cols, doc_rows, doc_cols, S, HAS_DOC)
                    acc = tl.where(allowed, acc, 0.0)  # masked pairs score 0; every allowed score is >= 0
                    # Tile maxima: rows within each query block first, then keys within each key block.
                    tile = tl.max(tl.reshape(acc, [M_SUB, BLOCK, BLOCK_N]), axis=1)  # [M_SUB, BN]
                    tile = tl.max(tl.reshape(tile, [M_SUB, N_SUB, BLOCK]), axis=2) * scale  # [M_SUB, N_SUB]
                    col_sum += tl.sum(tile, axis=0)
                    if STORE_TILES:
                        blk_i = m * M_SUB + tl.arange(0, M_SUB)  # [M_SUB] query block indices I
                        blk_j = pid_n * N_SUB + tl.arange(0, N_SUB)  # [N_SUB] key block indices J
                        offs = bi * N_BLOCKS * N_BLOCKS + blk_i[:, None] * N_BLOCKS + blk_j[None, :]
                        ok = (blk_i < N_BLOCKS)[:, None] & (blk_j < N_BLOCKS)[None, :]
                        tl.store(tiles_ptr + offs, tile, mask=ok)

        bj = pid_n * N_SUB + tl.arange(0, N_SUB)  # [N_SUB]
        tl.store(partial_ptr + (bi * N_CHUNKS + chunk) * N_BLOCKS + bj, col_sum, mask=bj < N_BLOCKS)


def kernel_supports(query: torch.Tensor, key: torch.Tensor, block_size: int) -> str | None:
    """None when the Triton kernel can take these shapes and dtypes, else why not (a sentence)."""
    d = query.shape[-1]
    if d < 16 or d & (d - 1):
        return f"head dim {d} is not a power of two >= 16 (tl.dot tiles)"
    if block_size < 16 or block_size > _MAX_KERNEL_BLOCK or block_size & (block_size - 1):
        return f"block size {block_size} is not a power of two in [16, {_MAX_KERNEL_BLOCK}]"
    if query.dtype not in _KERNEL_DTYPES:
        return f"dtype {query.dtype} is not one of {', '.join(map(str, _KERNEL_DTYPES))}"
    return None


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _smem_budget(device: torch.device) -> int:
    """Shared memory one program may use, in bytes (a little under the per-block opt-in maximum)."""
    if device.type != "cuda":
        return 220 * 1024  # the interpreter ignores it; mirror Hopper so CPU tests run the GPU's default tiling
    major, minor = torch.cuda.get_device_capability(device)
    if major in (9, 10):  # H100/H200, B200: 227 KiB
        return 220 * 1024
    if (major, minor) == (8, 0):  # A100: 163 KiB
        return 160 * 1024
    return 96 * 1024  # consumer parts (sm_86/89/120: 99-100 KiB) and unknown ones


def default_config(
    block_size: int, group: int, head_dim: int, elem_size: int = 2, device: torch.device | None = None
) -> OracleKernelConfig:
    """The tiling used unless one is passed (``chunk`` left to _pick_chunk). Reasoned, not measured: tune on the GPU
    with benchmarks/kernels/bench_oracle_scores.py --sweep. Checked by compiling for sm_90 (no GPU at hand):
    at B = 64, d = 128, G = 4, bf16 it takes 192 KiB of shared memory and 192 registers, no spills.

    - BLOCK_M = 64 query rows, BLOCK_N = 128 keys (at B = 64: m_sub 1, n_sub 2). Each head step reads its Q tiles
      and one K tile (from L2 mostly: programs running side by side share the Q tiles); a wider key side means
      fewer Q reads per flop, and Q dominates (every head reads its own, G heads share a K). With
      heads_per_step 2 the kernel reads about as many bytes as FlashAttention-2's forward at the same shape
      (~1 MiB per 64 x 128 tile at H = 32, KV = 8, d = 128) for half its flops.
    - heads_per_step 2 (G even): a K tile serves two heads; more heads per step cost shared memory per stage.
    - num_warps 8: two warpgroups split the 64 x 128 accumulator (wgmma M = 64 per warpgroup, so N splits); the
      accumulator and one dot result are then 64 registers per thread.
    - num_stages 3: the next-but-one head step's loads are in flight during a step. With one program per SM
      (shared memory allows no second one) 2 stages leave nothing to overlap: the compiled loop issues the next
      loads after the dots and waits for them at once. Reduced (stages, then heads per step) to fit the GPU's
      shared memory: (heads_per_step * BLOCK_M + BLOCK_N) * d * elem_size bytes per stage.
    """
    m_sub = max(1, 64 // block_size)
    n_sub = max(1, 128 // block_size)
    block_m, block_n = m_sub * block_size, n_sub * block_size
    budget = _smem_budget(device if device is not None else torch.device("cpu"))
    for heads_per_step, num_stages in ((2, 3), (1, 3), (2, 2), (1, 2), (1, 1)):
        if group % heads_per_step:
            continue
        if num_stages * (heads_per_step * block_m + block_n) * head_dim * elem_size <= budget:
            break
    return OracleKernelConfig(m_sub=m_sub, n_sub=n_sub, heads_per_step=heads_per_step, num_stages=num_stages)


def _pick_chunk(n_key_tiles: int, n_query_tiles: int, batch: int, device: torch.device) -> int:
    """Query tiles per program (a power of two: it is a constexpr, so this bounds recompilations to ~log2(s)).

    About 8 programs with work per SM: fine enough that the longest program (a full chunk) is short next to the
    whole, coarse enough that empty programs (above the diagonal) and partial sums stay few. On CPU (interpreter)
    one chunk: there is no parallelism to gain and each program costs Python time.
    """
    if device.type != "cuda":
        return triton.next_power_of_2(n_query_tiles)
    work = batch * n_key_tiles * n_query_tiles / 2  # live (key tile, query tile) pairs, about half of all
    target_programs = 8 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    chunk = max(1, int(work // target_programs))
    chunk = 1 << (chunk.bit_length() - 1)  # round down to a power of two
    return min(chunk, triton.next_power_of_2(n_query_tiles))


def _oracle_scores_launch(
    query: torch.Tensor,  # [b, H, s, d]
    key: torch.Tensor,  # [b, KV, s, d]
    block_size: int,
    doc_ids: torch.Tensor | None,  # [b or 1, s] integer
    return_tiles: bool,
    config: OracleKernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    reason = kernel_supports(query, key, block_size)
    if reason is not None:
        raise ValueError(f"oracle_scores: the Triton kernel cannot run: {reason}; use backend='auto' or 'torch'")
    if doc_ids is not None and doc_ids.dim() != 2:
        raise ValueError("oracle_scores: the Triton kernel takes doc_ids [b or 1, s] only; a mask takes the torch path")
    b, heads, s, d = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    n = triton.cdiv(s, block_size)
    cfg = config or default_config(block_size, group, d, query.element_size(), query.device)
    if group % cfg.heads_per_step:
        raise ValueError(f"heads_per_step={cfg.heads_per_step} must divide the GQA group size {group}")
    tiles = torch.zeros((b, n, n), dtype=torch.float32, device=query.device) if return_tiles else None  # [b, n, n]
    if b * n == 0:
        return torch.zeros((b, n), dtype=torch.float32, device=query.device), tiles
    block_m, block_n = cfg.m_sub * block_size, cfg.n_sub * block_size
    n_key_tiles, n_query_tiles = triton.cdiv(s, block_n), triton.cdiv(s, block_m)
    chunk = cfg.chunk or _pick_chunk(n_key_tiles, n_query_tiles, b, query.device)
    n_chunks = triton.cdiv(n_query_tiles, chunk)
    partial = torch.empty((b, n_chunks, n), dtype=torch.float32, device=query.device)  # [b, n_chunks, n]
    if doc_ids is not None:
        doc = doc_ids.to(torch.int32)  # [b or 1, s]: int32 halves the loads; a copy only if the dtype differs
        doc_strides = (0 if doc.shape[0] == 1 else doc.stride(0), doc.stride(1))
    else:
        doc, doc_strides = partial, (0, 0)  # placeholder pointer, never dereferenced (HAS_DOC is False)

    # Exact either way: bf16 products are exact in fp32, and the GPU's bf16 dot accumulates in fp32 too.
    upcast = query.device.type == "cpu" and query.dtype == torch.bfloat16
    grid = (n_key_tiles, n_chunks, b)
    _oracle_scores_kernel[grid](
        query,
        key,
        doc,
        partial,
        tiles if tiles is not None else partial,
        s,
        n,
        n_chunks,
        d**-0.5 / heads,
        *query.stride(),
        *key.stride(),
        *doc_strides,
        NUM_HEADS=heads,
        GROUP=group,
        HEAD_DIM=d,
        BLOCK=block_size,
        M_SUB=cfg.m_sub,
        N_SUB=cfg.n_sub,
        HEADS_PER_STEP=cfg.heads_per_step,
        CHUNK=chunk,
        HAS_DOC=doc_ids is not None,
        STORE_TILES=return_tiles,
        # fp32 inputs: exact fp32 products (tf32 would round the inputs to 10 mantissa bits); ignored for 16-bit.
        INPUT_PRECISION="ieee" if query.dtype == torch.float32 or upcast else "tf32",
        UPCAST=upcast,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    # Chunks' partial column sums, added in a fixed order (deterministic).
    scores = partial[:, 0] if n_chunks == 1 else partial.sum(1)  # [b, n]
    return scores, tiles


# ----------------------------------------------------------------------------------------------------------------
# Torch paths
# ----------------------------------------------------------------------------------------------------------------


def _is_mask(allowed: torch.Tensor | None) -> bool:
    """True for a 4D mask, False for document ids [b, s] or None (see :func:`allowed_pairs`)."""
    return allowed is not None and allowed.dim() == 4


def _check_inputs(query, key, block_size, allowed) -> None:
    for name, t in (("query", query), ("key", key)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a [b, heads, s, d] tensor, got {shape}")
    b, heads, s, d = query.shape
    if key.shape[0] != b or key.shape[2:] != query.shape[2:]:
        raise ValueError(f"key {tuple(key.shape)} must be [b, KV, s, d] for query {tuple(query.shape)}")
    if key.shape[1] == 0 or heads % key.shape[1]:
        raise ValueError(f"query heads ({heads}) must be a multiple of key heads ({key.shape[1]})")
    if key.dtype != query.dtype or key.device != query.device:
        raise ValueError(f"query ({query.dtype}, {query.device}) and key ({key.dtype}, {key.device}) must match")
    if not query.is_floating_point():
        raise TypeError(f"query and key must be floating point, got {query.dtype}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if allowed is None:
        return
    if not isinstance(allowed, torch.Tensor) or allowed.dim() not in (2, 4):
        raise ValueError(
            f"allowed must be doc_ids [b or 1, {s}] or a mask [b or 1, 1, {s}, {s}], "
            f"got {getattr(allowed, 'shape', type(allowed))}"
        )
    if allowed.shape[0] not in (1, b):
        raise ValueError(f"allowed has batch size {allowed.shape[0]}, query has {b}")
    if allowed.device != query.device:
        raise ValueError(f"allowed is on {allowed.device} but query is on {query.device}")
    if allowed.dim() == 2:
        if allowed.shape[1] != s:
            raise ValueError(f"doc_ids must be [b or 1, {s}], got {tuple(allowed.shape)}")
        if allowed.is_floating_point() or allowed.dtype == torch.bool:
            raise TypeError(f"doc_ids must be an integer tensor, got {allowed.dtype}")
    else:
        # Keys past s (a mask sized for a longer key range) are never read.
        if allowed.shape[1] != 1 or allowed.shape[2] != s or allowed.shape[3] < s:
            raise ValueError(f"a mask must be [b or 1, 1, {s}, {s}], got {tuple(allowed.shape)}")
        if not (allowed.dtype == torch.bool or allowed.is_floating_point()):
            raise TypeError(f"a mask must be bool (True = attend) or additive float (0 = attend), got {allowed.dtype}")


def allowed_pairs(
    allowed: torch.Tensor | None,  # doc_ids [b or 1, s] integer, or a mask [b or 1, 1, s, s] bool/additive, or None
    rows: slice,
    keys: int,
    batch: int,
    device: torch.device,
) -> torch.Tensor:
    """Which (query, key) pairs attend, for query rows ``rows`` and keys ``0..keys-1``: [b, rows, keys] bool.

    Always causal (j <= i): the oracle scores causal attention, and the chunked path skips the keys after a chunk's
    last row. Then, from whichever input there is:

    - doc_ids [b or 1, s]: same document, and the key is not padding (-1); a padding query then matches no key.
      The Triton kernel applies the same test in-kernel (``_allowed_pairs_tile``).
    - a mask [b or 1, 1, s, s] (the model's own: sliding window, custom): True, or an additive 0, attends.
    - None: causal only.
    """
    i = torch.arange(rows.start, rows.stop, device=device)[:, None]  # [cq, 1]
    causal = torch.arange(keys, device=device)[None, :] <= i  # [cq, keys]
    if allowed is None:
        return causal.expand(batch, -1, -1)
    if _is_mask(allowed):
        block = allowed[:, 0, rows, :keys]  # [b or 1, cq, keys]
        attend = block if block.dtype == torch.bool else block == 0
        return (causal & attend).expand(batch, -1, -1)
    doc_q = allowed[:, rows, None]  # [b or 1, cq, 1]
    doc_k = allowed[:, None, :keys]  # [b or 1, 1, keys]
    return (causal & (doc_q == doc_k) & (doc_k >= 0)).expand(batch, -1, -1)


def _tile_max(pair: torch.Tensor, block: int) -> torch.Tensor:
    """[b, r, c] -> [b, ceil(r / B), ceil(c / B)]: max over B x B tiles (pairs are >= 0, so zero padding is neutral)."""
    b, r, c = pair.shape
    qb, kb = math.ceil(r / block), math.ceil(c / block)
    pair = F.pad(pair, (0, kb * block - c, 0, qb * block - r))
    return pair.view(b, qb, block, kb, block).amax(dim=(2, 4))


def oracle_scores_ref(
    query: torch.Tensor,  # [b, H, s, d]
    key: torch.Tensor,  # [b, KV, s, d]
    block_size: int,
    allowed: torch.Tensor | None = None,  # doc_ids [b or 1, s] or mask [b or 1, 1, s, s] (see allowed_pairs)
    return_tiles: bool = False,
):
    """Plain-torch spec: materialises the [b, s, s] pair matrix in fp32 from the inputs (small shapes only).

    Returns scores [b, n] float32, or (scores, tiles [b, n, n]) with ``return_tiles``.
    """
    _check_inputs(query, key, block_size, allowed)
    with torch.no_grad():
        b, heads, s, d = query.shape
        k = key.float().repeat_interleave(heads // key.shape[1], dim=1)  # [b, H, s, d]
        pair = (query.float() @ k.transpose(-1, -2) * d**-0.5).clamp_min(0).mean(1)  # [b, s, s]
        pair = pair.masked_fill(~allowed_pairs(allowed, slice(0, s), s, b, query.device), 0.0)
        tiles = _tile_max(pair, block_size)  # [b, n, n]
        scores = tiles.sum(1)  # [b, n]
    return (scores, tiles) if return_tiles else scores


def oracle_scores_torch(
    query: torch.Tensor,  # [b, H, s, d]
    key: torch.Tensor,  # [b, KV, s, d]
    block_size: int,
    allowed: torch.Tensor | None = None,  # doc_ids [b or 1, s] or mask [b or 1, 1, s, s] (see allowed_pairs)
    return_tiles: bool = False,
    chunk_tokens: int = 512,
):
    """Chunked torch path: query rows in chunks of whole blocks (``chunk_tokens`` rounded up), and within a chunk one
    KV head group at a time, so the working memory is O(chunk x s x G), never O(s^2); keys after the chunk's last
    row are skipped (causal). Each q.k is rounded to the input dtype by the matmul; heads are summed in fp32."""
    _check_inputs(query, key, block_size, allowed)
    b, heads, s, d = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    n = math.ceil(s / block_size)
    chunk = max(1, math.ceil(chunk_tokens / block_size)) * block_size  # rounded up, as config's oracle_chunk_tokens
    with torch.no_grad():
        scores = torch.zeros(b, n, dtype=torch.float32, device=query.device)  # [b, n]
        tiles_all = torch.zeros(b, n, n, dtype=torch.float32, device=query.device) if return_tiles else None
        for start in range(0, s, chunk):
            stop = min(start + chunk, s)
            pair = torch.zeros(b, stop - start, stop, dtype=torch.float32, device=query.device)  # [b, cq, keys]
            for g in range(kv_heads):
                q = query[:, g * group : (g + 1) * group, start:stop]  # [b, G, cq, d]
                logits = torch.matmul(q, key[:, g, :stop].transpose(-1, -2)[:, None])  # [b, G, cq, keys]
                pair += logits.clamp_min_(0).sum(1, dtype=torch.float32)
            pair.mul_(d**-0.5 / heads)
            pair.masked_fill_(~allowed_pairs(allowed, slice(start, stop), stop, b, query.device), 0.0)
            tiles = _tile_max(pair, block_size)  # [b, qb, kb]
            scores[:, : tiles.shape[2]] += tiles.sum(1)
            if tiles_all is not None:
                q0 = start // block_size
                tiles_all[:, q0 : q0 + tiles.shape[1], : tiles.shape[2]] = tiles
    return (scores, tiles_all) if return_tiles else scores


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def doc_ids_from_position_ids(
    position_ids: torch.Tensor,  # [b, s] (or [s]): position ids that restart at 0 at every document
    padding_mask: torch.Tensor | None = None,  # [b, s]: nonzero/True = a real token, 0/False = padding
) -> torch.Tensor:
    """doc_ids [b, s] int32 for :func:`oracle_scores`: the document index of every token, -1 on padding.

    A document starts wherever the position id is 0, and at the first token whatever its position (a sequence
    that continues a document). ``padding_mask`` follows Hugging Face's 2D ``attention_mask`` convention.
    """
    pos = position_ids if position_ids.dim() == 2 else position_ids[None]
    starts = pos == 0  # [b, s]
    starts[:, :1] = True
    doc = starts.to(torch.int32).cumsum(1, dtype=torch.int32) - 1  # [b, s]
    if padding_mask is not None:
        doc = doc.masked_fill(~padding_mask.bool(), -1)
    return doc


def oracle_scores(
    query: torch.Tensor,  # [b, H, s, d]
    key: torch.Tensor,  # [b, KV, s, d]
    block_size: int = 64,
    allowed: torch.Tensor | None = None,  # doc_ids [b or 1, s] or mask [b or 1, 1, s, s] (see allowed_pairs)
    return_tiles: bool = False,
    backend: str = "auto",
    chunk_tokens: int = 512,
):
    """LeMo's oracle block scores (see the module docstring), without gradients.

    Args:
        query: queries after RoPE [b, H, s, d]; key: keys after RoPE [b, KV, s, d], H a multiple of KV.
        block_size: B, tokens per block; the last block may be partial.
        allowed: which pairs attend besides causality: document ids [b or 1, s] (integer, -1 = padding), or the
            model's own mask [b or 1, 1, s, s] (bool True = attend, or additive float 0 = attend), or None.
        return_tiles: also return the tile maxima T [b, n, n] (zero above the diagonal).
        backend: "auto" (Triton where usable and the shapes suit it, else torch), "triton" (raises when it cannot
            run) or "torch" (the chunked torch path). A mask always takes the chunked torch path (see below).
        chunk_tokens: query rows per chunk of the torch path (rounded up to whole blocks).

    Returns:
        scores [b, n] float32, or (scores, tiles [b, n, n] float32) with ``return_tiles``.
    """
    _check_inputs(query, key, block_size, allowed)
    if _is_mask(allowed):
        # The kernel tests a [BM, BN] tile from two doc-id vectors; a general mask (sliding window, custom) would be
        # an [s, s] read it does not do. So a mask takes the chunked torch path, which reads it as it is, whatever
        # the backend: there is no kernel to ask for, and dropping the mask would score the wrong pairs.
        if backend not in BACKENDS:
            resolve_backend(backend)  # raises its error for an unknown backend name
        return oracle_scores_torch(query, key, block_size, allowed, return_tiles, chunk_tokens)
    use = resolve_backend(backend, query, key, allowed)
    if use == "triton":
        reason = kernel_supports(query, key, block_size)
        if reason is not None:
            if backend == "triton":
                raise ValueError(f"oracle_scores: backend='triton' cannot run: {reason}; use 'auto' or 'torch'")
            use = "torch"
    if use == "torch":
        return oracle_scores_torch(query, key, block_size, allowed, return_tiles, chunk_tokens)
    with torch.no_grad():
        scores, tiles = _oracle_scores_launch(query, key, block_size, allowed, return_tiles)
    return (scores, tiles) if return_tiles else scores
