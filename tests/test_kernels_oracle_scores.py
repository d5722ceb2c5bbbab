"""lemo_ds.kernels.oracle_scores: the fused Triton kernel and the chunked torch path against the torch reference,
and the mask route (a model's 4D mask, chunked torch path) against the document-id route and the reference.

On a machine with CUDA the tensors live on the GPU and the kernel is compiled; elsewhere it runs in Triton's CPU
interpreter (TRITON_INTERPRET=1, set below before lemo_ds.kernels is imported). Shapes are small: the interpreter
runs every program in Python.
"""

import importlib
import itertools
import os

import pytest
import torch
from kernel_checks import fail_unless_interpreted

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    # Before lemo_ds.kernels is imported: Triton reads it when a kernel is decorated, at module import.
    os.environ["TRITON_INTERPRET"] = "1"

oracle_mod = importlib.import_module("lemo_ds.kernels.oracle_scores")
oracle_scores, oracle_scores_ref = oracle_mod.oracle_scores, oracle_mod.oracle_scores_ref
oracle_scores_torch, doc_ids_from_position_ids = oracle_mod.oracle_scores_torch, oracle_mod.doc_ids_from_position_ids
Config = oracle_mod.OracleKernelConfig

# (b, H, KV, s, d, B): seq shorter than a block, seq not a multiple of the block, GQA ratios 1 / 2 / 4, batch 1..3,
# blocks of 16 and 32, head dims 16 and 32.
SHAPES = [
    (1, 2, 2, 11, 16, 16),
    (2, 4, 2, 37, 16, 16),
    (3, 4, 1, 45, 32, 16),
    (2, 4, 1, 70, 16, 32),
    (1, 2, 1, 20, 32, 32),
]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]
# Kernel vs reference: both take exact products of the inputs and sum in fp32, in different orders.
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 1e-4, "rtol": 1e-4}}
# Paths that round q.k to bf16 (torch matmul in bf16): ~2**-8 relative per logit.
BF16_LOGITS = {"atol": 2e-2, "rtol": 2e-2}


@pytest.fixture(autouse=True, scope="module")
def _kernels_interpreted():
    fail_unless_interpreted(oracle_mod._oracle_scores_kernel)


def make_qk(b, heads, kv, s, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    # [b, s, H, d] transposed to [b, H, s, d], as Hugging Face attention hands them over (non-contiguous).
    q = torch.randn(b, s, heads, d, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    k = torch.randn(b, s, kv, d, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    return q, k


def packed_doc_ids(b, s, block):
    """[b, s] int32: sample 0 packs documents that start mid-block and ends in padding; sample 1 is one document
    with padding at the end; sample 2 packs documents of one block and a bit."""
    rows = []
    for bi in range(b):
        if bi % 3 == 0:
            lengths, pad = [block // 2 + 3, block + 5], max(0, s // 5)
        elif bi % 3 == 1:
            lengths, pad = [], max(1, s // 4)
        else:
            lengths, pad = [block + 1] * 3, 0
        doc = torch.full((s,), -1, dtype=torch.int32)
        start, idx = 0, 0
        for length in [*lengths, s]:  # the last document takes what is left before the padding
            stop = min(start + length, s - pad)
            doc[start:stop] = idx
            start, idx = stop, idx + 1
            if start >= s - pad:
                break
        rows.append(doc)
    return torch.stack(rows).to(DEVICE)


def mask_from_doc_ids(doc_ids):
    """[b, 1, s, s] bool, the model's view of the same masking: causal, same document, key not padding."""
    s = doc_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal & same & (doc_ids >= 0)[:, None, :])[:, None]


def assert_close(actual, expected, tol):
    torch.testing.assert_close(actual, expected, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("docs", [False, True], ids=["causal", "docs"])
@pytest.mark.parametrize("b, heads, kv, s, d, block", SHAPES, ids=SHAPE_IDS)
def test_kernel_matches_reference(b, heads, kv, s, d, block, docs, dtype):
    q, k = make_qk(b, heads, kv, s, d, dtype, seed=s * 7 + d)
    doc_ids = packed_doc_ids(b, s, block) if docs else None
    scores, tiles = oracle_scores(q, k, block, doc_ids, return_tiles=True, backend="triton")
    ref_scores, ref_tiles = oracle_scores_ref(q, k, block, doc_ids, return_tiles=True)
    n = -(-s // block)
    assert scores.shape == (b, n) and tiles.shape == (b, n, n)
    assert scores.dtype == tiles.dtype == torch.float32
    assert_close(tiles, ref_tiles, TOL[dtype])
    assert_close(scores, ref_scores, TOL[dtype])
    assert torch.equal(tiles.triu(1), torch.zeros_like(tiles))  # no key block after the query block
    # Without return_tiles: the same scores (the same kernel minus the stores).
    assert_close(oracle_scores(q, k, block, doc_ids, backend="triton"), scores, {"atol": 0, "rtol": 0})


# Tilings the GPU may use: several blocks per tile on either side, K shared by up to G heads, chunked query columns.
CONFIGS = [
    Config(m_sub=1, n_sub=1, heads_per_step=1, chunk=1, num_warps=4),
    Config(m_sub=2, n_sub=1, heads_per_step=2, chunk=1),
    Config(m_sub=1, n_sub=2, heads_per_step=4, chunk=2),
    Config(m_sub=2, n_sub=4, heads_per_step=1, chunk=1),
    Config(m_sub=4, n_sub=2, heads_per_step=2, chunk=2),
]


@pytest.mark.parametrize("config", CONFIGS, ids=[f"m{c.m_sub}n{c.n_sub}h{c.heads_per_step}c{c.chunk}" for c in CONFIGS])
@pytest.mark.parametrize("docs", [False, True], ids=["causal", "docs"])
def test_kernel_tilings(config, docs):
    b, heads, kv, s, d, block = 2, 8, 2, 75, 16, 16
    q, k = make_qk(b, heads, kv, s, d, torch.float32, seed=11)
    doc_ids = packed_doc_ids(b, s, block) if docs else None
    with torch.no_grad():
        scores, tiles = oracle_mod._oracle_scores_launch(q, k, block, doc_ids, True, config)
    ref_scores, ref_tiles = oracle_scores_ref(q, k, block, doc_ids, return_tiles=True)
    assert_close(tiles, ref_tiles, TOL[torch.float32])
    assert_close(scores, ref_scores, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("docs", [False, True], ids=["causal", "docs"])
def test_mask_route_agrees_with_doc_ids(docs, dtype):
    """The mask route (the OracleScorer's for a model with a mask tensor) given the 4D bool mask built from doc_ids
    scores what the document-id route scores, kernel and torch path, and what the reference scores from the mask."""
    b, heads, kv, s, d, block = 3, 4, 2, 53, 16, 16
    q, k = make_qk(b, heads, kv, s, d, dtype, seed=5)
    doc_ids = packed_doc_ids(b, s, block) if docs else None
    mask = mask_from_doc_ids(doc_ids) if docs else torch.ones(1, 1, s, s, dtype=torch.bool, device=DEVICE)
    kernel, kernel_tiles = oracle_scores(q, k, block, doc_ids, return_tiles=True, backend="triton")
    torch_path = oracle_scores(q, k, block, doc_ids, backend="torch")
    # backend="triton" too: the kernel takes no mask, so a mask takes the chunked torch path whatever the backend.
    scorer, scorer_tiles = oracle_scores(q, k, block, mask, return_tiles=True, backend="triton", chunk_tokens=32)
    scorer_ref = oracle_scores_ref(q, k, block, mask)  # fp32 from the inputs, as the kernel
    assert_close(kernel, scorer_ref, TOL[dtype])
    tol = TOL[dtype] if dtype == torch.float32 else BF16_LOGITS
    assert_close(kernel, scorer, tol)
    assert_close(kernel_tiles, scorer_tiles, tol)
    assert_close(torch_path, scorer, tol)
    if dtype == torch.float32:  # the same chunked path either way: the same pairs, the same numbers
        assert_close(oracle_scores(q, k, block, doc_ids, backend="torch", chunk_tokens=32), scorer, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [5, 16, 23])
def test_sliding_window_mask_is_honoured(window, dtype):
    """A sliding-window mask (query i attends keys i - window < j <= i), bool and additive, batch-shared and per
    sample: the dispatcher (chunked torch path, several chunk sizes) matches the reference, which it must not match
    without the mask."""
    b, heads, kv, s, d, block = 2, 4, 2, 70, 16, 16
    q, k = make_qk(b, heads, kv, s, d, dtype, seed=window)
    i = torch.arange(s, device=DEVICE)
    window_mask = ((i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window))[None, None]  # [1, 1, s, s]
    additive = torch.zeros(window_mask.shape, device=DEVICE).masked_fill(~window_mask, torch.finfo(torch.float32).min)
    ref_scores, ref_tiles = oracle_scores_ref(q, k, block, window_mask, return_tiles=True)
    causal = oracle_scores_ref(q, k, block)
    assert not torch.allclose(ref_scores, causal, atol=1e-3, rtol=1e-3)  # the window changes the scores
    tol = TOL[dtype] if dtype == torch.float32 else BF16_LOGITS
    for mask in (window_mask, additive, window_mask.expand(b, 1, s, s)):
        for chunk_tokens in (1, 48, 10_000):
            scores, tiles = oracle_scores(q, k, block, mask, return_tiles=True, chunk_tokens=chunk_tokens)
            assert_close(tiles, ref_tiles, tol)
            assert_close(scores, ref_scores, tol)
    # Tiles wholly outside the window are zero (block 16: a query block reaches at most 1 + ceil(window / 16) back).
    reach = 1 + -(-window // block)
    n = ref_tiles.shape[1]
    far = torch.ones(n, n, dtype=torch.bool, device=DEVICE).tril(-reach)
    assert ref_tiles[:, far].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("b, heads, kv, s, d, block", SHAPES[1:4], ids=SHAPE_IDS[1:4])
def test_torch_chunked_matches_reference(b, heads, kv, s, d, block, dtype):
    q, k = make_qk(b, heads, kv, s, d, dtype, seed=3)
    doc_ids = packed_doc_ids(b, s, block)
    ref_scores, ref_tiles = oracle_scores_ref(q, k, block, doc_ids, return_tiles=True)
    tol = TOL[dtype] if dtype == torch.float32 else BF16_LOGITS
    for chunk_tokens in (1, block * 2, 10_000):  # one block per chunk, a few blocks, everything at once
        scores, tiles = oracle_scores_torch(q, k, block, doc_ids, True, chunk_tokens=chunk_tokens)
        assert_close(tiles, ref_tiles, tol)
        assert_close(scores, ref_scores, tol)


def test_doc_ids_broadcast_and_dtypes():
    """doc_ids [1, s] shared by the batch, and int64 doc ids, give what the per-sample int32 ones give."""
    b, heads, kv, s, d, block = 2, 4, 2, 40, 16, 16
    q, k = make_qk(b, heads, kv, s, d, torch.float32, seed=8)
    shared = packed_doc_ids(1, s, block)  # [1, s]
    expected = oracle_scores_ref(q, k, block, shared.expand(b, s))
    for doc in (shared, shared.long(), shared.expand(b, s).contiguous()):
        for backend in ("triton", "torch"):
            assert_close(oracle_scores(q, k, block, doc, backend=backend), expected, TOL[torch.float32])


def test_doc_ids_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [5, 6, 7, 0, 1, 2, 0, 1, 2]])
    pad = torch.tensor([[1] * 9, [1] * 7 + [0] * 2])
    assert doc_ids_from_position_ids(pos).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 0, 0, 1, 1, 1, 2, 2, 2]]
    doc = doc_ids_from_position_ids(pos, pad)
    assert doc.dtype == torch.int32
    assert doc.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 0, 0, 1, 1, 1, 2, -1, -1]]
    assert doc_ids_from_position_ids(torch.arange(4)).tolist() == [[0, 0, 0, 0]]  # [s] -> [1, s]


def test_padding_query_and_key_contribute_nothing():
    """A padding query's row adds nothing; a padding key's column scores 0; an all-padding sample scores 0."""
    b, heads, kv, s, d, block = 2, 2, 1, 32, 16, 16
    q, k = make_qk(b, heads, kv, s, d, torch.float32, seed=9)
    doc = torch.zeros(b, s, dtype=torch.int32, device=DEVICE)
    doc[0, 16:] = -1  # second block of sample 0 is padding
    doc[1] = -1
    scores, tiles = oracle_scores(q, k, block, doc, return_tiles=True, backend="triton")
    assert scores[0, 1] == 0 and tiles[0, 1].eq(0).all()
    assert scores[1].eq(0).all()
    alone = oracle_scores(q[:1, :, :16], k[:1, :, :16], block, backend="triton")  # the unpadded first block
    assert_close(scores[0, :1], alone[0], TOL[torch.float32])


def test_auto_falls_back_for_unsupported_shapes():
    """Head dim 24 or block 48 (not powers of two): auto takes the torch path; an explicit triton request raises."""
    for d, block in ((24, 16), (16, 48), (8, 16)):
        q, k = make_qk(2, 4, 2, 50, d, torch.float32, seed=d + block)
        assert_close(oracle_scores(q, k, block), oracle_scores_ref(q, k, block), TOL[torch.float32])
        with pytest.raises(ValueError, match="power of two"):
            oracle_scores(q, k, block, backend="triton")


def test_no_gradients_and_empty():
    q, k = make_qk(1, 2, 1, 20, 16, torch.float32, seed=1)
    q.requires_grad_()
    for backend in ("triton", "torch"):
        scores = oracle_scores(q, k, 16, backend=backend)
        assert not scores.requires_grad
        empty = oracle_scores(q[:, :, :0], k[:, :, :0], 16, backend=backend)
        assert empty.shape == (1, 0)


def test_input_errors():
    q, k = make_qk(2, 4, 2, 20, 16, torch.float32, seed=2)
    with pytest.raises(ValueError, match=r"\[b, heads, s, d\]"):
        oracle_scores(q[0], k)
    with pytest.raises(ValueError, match="multiple of key heads"):
        oracle_scores(q[:, :3], k)
    with pytest.raises(ValueError, match="must be \\[b, KV, s, d\\]"):
        oracle_scores(q, k[:, :, :10])
    with pytest.raises(ValueError, match="must match"):
        oracle_scores(q, k.double())
    with pytest.raises(ValueError, match="doc_ids must be"):
        oracle_scores(q, k, 16, torch.zeros(2, 19, dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match="integer"):
        oracle_scores(q, k, 16, torch.zeros(2, 20, device=DEVICE))
    with pytest.raises(ValueError, match="heads_per_step"):
        oracle_mod._oracle_scores_launch(q, k, 16, None, False, Config(heads_per_step=4))
    mask = torch.ones(2, 1, 20, 20, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="a mask must be"):
        oracle_scores(q, k, 16, mask[:, :, :19])
    with pytest.raises(TypeError, match="bool"):
        oracle_scores(q, k, 16, mask.int())
    with pytest.raises(ValueError, match="allowed must be"):
        oracle_scores(q, k, 16, mask[0])
    with pytest.raises(ValueError, match="unknown kernel backend"):
        oracle_scores(q, k, 16, mask, backend="cuda")
    with pytest.raises(ValueError, match="doc_ids"):
        oracle_mod._oracle_scores_launch(q, k, 16, mask, False)


def test_chunk_choice(monkeypatch):
    """On a GPU (here: a pretend H200 with 132 SMs) the query column is split so that there are ~8 programs with
    work per SM, in powers of two (a constexpr: few recompilations); on CPU one chunk."""
    monkeypatch.setattr(oracle_mod, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    # Llama-3-8B at B = 64 with the default 64 x 128 tiles: (key tiles, query tiles) at 8K, 32K, 64K.
    assert oracle_mod._pick_chunk(64, 128, 1, cuda) == 2
    assert oracle_mod._pick_chunk(256, 512, 1, cuda) == 32
    assert oracle_mod._pick_chunk(512, 1024, 1, cuda) == 128
    assert oracle_mod._pick_chunk(1, 1, 1, cuda) == 1
    assert oracle_mod._pick_chunk(3, 5, 1, torch.device("cpu")) == 8


def test_default_config_fits_shared_memory(monkeypatch):
    """heads_per_step divides G and the pipelined operands fit the GPU's shared memory, for every capability."""
    for capability, budget in (((9, 0), 220 * 1024), ((8, 0), 160 * 1024), ((8, 9), 96 * 1024)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        for block, group, d, elem in itertools.product((16, 32, 64, 128), (1, 2, 3, 4, 7, 8), (64, 128), (2, 4)):
            c = oracle_mod.default_config(block, group, d, elem, torch.device("cuda", 0))
            assert group % c.heads_per_step == 0
            bm, bn = c.m_sub * block, c.n_sub * block
            assert bm >= 64 and bn >= 128 and bm % block == 0 and bn % block == 0
            if (block, d, elem) == (64, 128, 2):
                assert c.num_stages * (c.heads_per_step * bm + bn) * d * elem <= budget
