"""lemo_ds.atomic_io: the content lands whole, and a failed write leaves the old file and no temporary one."""

from __future__ import annotations

import pytest
import torch

from lemo_ds import atomic_io


def test_text_and_bytes_land_and_replace_leaving_no_temporary(tmp_path):
    target = tmp_path / "latest"
    atomic_io.write_text_atomic(target, "step1")
    assert target.read_text(encoding="utf-8") == "step1"
    atomic_io.write_text_atomic(target, "step2 é\n")
    assert target.read_text(encoding="utf-8") == "step2 é\n"
    atomic_io.write_bytes_atomic(target, b"\0bytes")
    assert target.read_bytes() == b"\0bytes"
    assert [path.name for path in tmp_path.iterdir()] == ["latest"]


def test_a_writer_of_its_own_path_lands(tmp_path):
    target = tmp_path / "state.pt"
    atomic_io.write_atomically(target, lambda path: torch.save({"step": 3}, path))
    assert torch.load(target, weights_only=True) == {"step": 3}
    assert [path.name for path in tmp_path.iterdir()] == ["state.pt"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "marker.json"
    target.write_text("old", encoding="utf-8")

    def half_write_then_fail(path: str) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_io.write_atomically(target, half_write_then_fail)
    assert target.read_text(encoding="utf-8") == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["marker.json"]


def test_a_failing_rename_leaves_no_temporary(tmp_path):
    target = tmp_path / "taken"
    (target / "inside").mkdir(parents=True)  # a file cannot replace a folder
    with pytest.raises(OSError):
        atomic_io.write_text_atomic(target, "new")
    assert target.is_dir()
    assert [path.name for path in tmp_path.iterdir()] == ["taken"]


def test_the_data_is_synced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    # A crash must not find the new name pointing at data still in the page cache, nor lose the rename itself.
    target = tmp_path / "latest"
    target.write_text("old", encoding="utf-8")
    synced = []
    monkeypatch.setattr(atomic_io, "fsync", lambda path: synced.append((path, target.read_text(encoding="utf-8"))))
    atomic_io.write_text_atomic(target, "new")
    assert len(synced) == 2
    (tmp, seen_then), (folder, seen_after) = synced
    assert tmp.parent == tmp_path and tmp != target and seen_then == "old"
    assert folder == tmp_path and seen_after == "new"
