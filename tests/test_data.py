"""The training data pipeline: discovery, documents, packing, position ids, labels, sharding, errors."""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest
import torch

from lemo_ds.training import data
from lemo_ds.training.errors import TrainingSetupError
from lemo_ds.training.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _rows(files, seq_len=16, seed=0, start=0, count=10):
    return list(islice(data.packed_rows(files, TOK, seq_len, seed, start=start), count))


def _corpus(tmp_path, texts: dict[str, str]):
    for name, text in texts.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return tmp_path


# ---- packing ---------------------------------------------------------------------------------------------


def test_pack_rows_exact_layout():
    docs = [np.arange(1, 6), np.arange(10, 13), np.arange(20, 30)]  # lengths 5, 3, 10 -> 18 tokens
    rows = list(data.pack_rows(docs, seq_len=6))
    assert len(rows) == 3  # the 18 tokens fill three rows exactly
    np.testing.assert_array_equal(rows[0].input_ids, [1, 2, 3, 4, 5, 10])
    np.testing.assert_array_equal(rows[0].position_ids, [0, 1, 2, 3, 4, 0])
    np.testing.assert_array_equal(rows[0].labels, [-100, 2, 3, 4, 5, -100])
    # The second document continues in the next row: a row start restarts the positions too.
    np.testing.assert_array_equal(rows[1].input_ids, [11, 12, 20, 21, 22, 23])
    np.testing.assert_array_equal(rows[1].position_ids, [0, 1, 0, 1, 2, 3])
    np.testing.assert_array_equal(rows[1].labels, [-100, 12, -100, 21, 22, 23])
    np.testing.assert_array_equal(rows[2].position_ids, [0, 1, 2, 3, 4, 5])


def test_pack_rows_drops_partial_tail():
    assert list(data.pack_rows([np.arange(5)], seq_len=6)) == []


def test_rows_positions_restart_and_labels_mask_document_starts(tmp_path):
    files = data.discover_files(str(_corpus(tmp_path, {f"d{i}.txt": "x" * (3 + 7 * i) for i in range(6)})))
    for row in _rows(files, seq_len=16, count=12):
        assert row.input_ids.shape == row.labels.shape == row.position_ids.shape == (16,)
        starts = row.position_ids == 0
        assert starts[0]
        # Every document starts with BOS at position 0, and position 0 is never a training target.
        assert np.all(row.labels[starts] == -100)
        np.testing.assert_array_equal(row.labels[~starts], row.input_ids[~starts])
        # Inside a document positions count up by one.
        steps = np.diff(row.position_ids)
        assert np.all((steps == 1) | (row.position_ids[1:] == 0))
        bos = row.input_ids == ByteTokenizer.BOS
        assert np.all(row.position_ids[bos] == 0)


def test_documents_are_bos_text_eos(tmp_path):
    files = data.discover_files(str(_corpus(tmp_path, {"a.txt": "abc"})))
    doc = next(data.document_tokens(files, TOK, seed=0))
    np.testing.assert_array_equal(doc, [ByteTokenizer.BOS, 97, 98, 99, ByteTokenizer.EOS])


# ---- order, epochs, resume position ------------------------------------------------------------------------


def test_order_is_deterministic_and_follows_the_seed(tmp_path):
    files = data.discover_files(str(_corpus(tmp_path, {f"d{i:02d}.txt": f"document {i} " * 3 for i in range(20)})))
    first = [r.input_ids for r in _rows(files, seed=1, count=8)]
    again = [r.input_ids for r in _rows(files, seed=1, count=8)]
    other = [r.input_ids for r in _rows(files, seed=2, count=8)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_start_skips_exactly_the_consumed_rows(tmp_path):
    files = data.discover_files(str(_corpus(tmp_path, {f"d{i}.md": "y" * (5 + 11 * i) for i in range(5)})))
    full = _rows(files, count=12)
    tail = _rows(files, start=5, count=7)
    for a, b in zip(full[5:], tail, strict=True):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.position_ids, b.position_ids)


def test_corpus_repeats_in_new_epochs(tmp_path):
    files = data.discover_files(str(_corpus(tmp_path, {"a.txt": "a" * 10, "b.txt": "b" * 10, "c.txt": "c" * 10})))
    # 3 documents of 12 tokens: one epoch is 36 tokens, so 20 rows of 16 span about nine epochs.
    rows = _rows(files, seq_len=16, count=20)
    assert len(rows) == 20
    docs = list(islice(data.document_tokens(files, TOK, seed=0), 30))
    orders = {tuple(int(d[1]) for d in docs[i : i + 3]) for i in range(0, 30, 3)}
    assert all(sorted(order) == [97, 98, 99] for order in orders)  # each epoch is one pass over every file
    assert len(orders) > 1  # ... in an order drawn per epoch


# ---- sharding ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size,micro_batch", [(2, 1), (2, 2), (3, 2)])
def test_ranks_take_disjoint_interleaved_shards(tmp_path, world_size, micro_batch):
    files = data.discover_files(str(_corpus(tmp_path, {f"d{i}.txt": f"{i}" * (20 + i) for i in range(10)})))
    steps = 3
    global_rows = _rows(files, seq_len=16, count=steps * world_size * micro_batch)
    per_rank = []
    for rank in range(world_size):
        rows = data.packed_rows(files, TOK, 16, 0)
        batches = list(
            islice(data.rank_batches(rows, rank=rank, world_size=world_size, micro_batch=micro_batch), steps)
        )
        for batch in batches:
            assert set(batch) == {"input_ids", "labels", "position_ids"}
            for tensor in batch.values():
                assert tensor.dtype == torch.long and tensor.shape == (micro_batch, 16)
        per_rank.append(batches)
    for step in range(steps):
        group = global_rows[step * world_size * micro_batch : (step + 1) * world_size * micro_batch]
        for rank in range(world_size):
            mine = group[rank * micro_batch : (rank + 1) * micro_batch]
            expected = torch.from_numpy(np.stack([r.input_ids for r in mine]))
            assert torch.equal(per_rank[rank][step]["input_ids"], expected)


# ---- inputs -------------------------------------------------------------------------------------------------


def test_folder_is_searched_recursively_for_text_suffixes(tmp_path):
    _corpus(
        tmp_path,
        {
            "a.txt": "a",
            "sub/b.py": "b",
            "sub/deeper/c.md": "c",
            "d.jsonl": '{"text": "d"}\n',
            "skip.bin": "x",
            "skip.json": "{}",
        },
    )
    names = [p.relative_to(tmp_path).as_posix() for p in data.discover_files(str(tmp_path))]
    assert names == ["a.txt", "d.jsonl", "sub/b.py", "sub/deeper/c.md"]


def test_jsonl_documents_come_from_the_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["one", "two", "three"])) + "\n\n")
    assert data.read_documents(path) == ["one", "two", "three"]
    shuffled = data.read_documents(path, np.random.default_rng(0))
    assert sorted(shuffled) == ["one", "three", "two"]
    files = data.discover_files(str(path))
    assert files == [path]
    assert len(_rows(files, seq_len=8, count=3)) == 3


def test_single_text_file_is_one_document(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("line one\nline two\n")
    assert data.read_documents(path) == ["line one\nline two\n"]


def test_default_corpus_is_the_stdlib_without_site_packages():
    files = data.discover_files(None)
    assert len(files) > 100
    root = data.stdlib_dir()
    assert all(p.suffix == ".py" and "site-packages" not in p.relative_to(root).parts for p in files)
    assert any(p.name == "os.py" for p in files)


def test_byte_tokenizer_round_trip():
    ids = TOK.encode("héllo\n")
    assert ids.dtype == np.int64 and ids.max() < 256
    assert TOK.decode(ids) == "héllo\n"
    assert TOK.vocab_size == 259


# ---- errors -------------------------------------------------------------------------------------------------


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(TrainingSetupError, match="no such file or folder"):
        data.discover_files(str(tmp_path / "nope"))


def test_folder_without_text_files_is_an_error(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\0")
    with pytest.raises(TrainingSetupError, match="holds no"):
        data.discover_files(str(tmp_path))


def test_empty_corpus_is_an_error(tmp_path):
    _corpus(tmp_path, {"a.txt": "", "b.jsonl": ""})
    files = data.discover_files(str(tmp_path))
    with pytest.raises(TrainingSetupError, match="holds no text"):
        data.check_corpus(files, TOK, 16, str(tmp_path))


def test_corpus_shorter_than_one_row_is_an_error(tmp_path):
    files = data.discover_files(str(_corpus(tmp_path, {"a.txt": "tiny"})))
    with pytest.raises(TrainingSetupError, match="6 tokens, fewer than one sequence of --seq-len 64"):
        data.check_corpus(files, TOK, 64, str(tmp_path))
    data.check_corpus(files, TOK, 6, str(tmp_path))  # exactly one row is enough


@pytest.mark.parametrize(
    "line,match",
    [('{"txt": "x"}', 'string "text" field'), ("{not json", "not valid JSON"), ('["x"]', 'string "text" field')],
)
def test_bad_jsonl_lines_name_file_and_line(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(TrainingSetupError, match=match) as info:
        data.read_documents(path)
    assert f"{path}:2" in str(info.value)
