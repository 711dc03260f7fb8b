"""Atomic directories and checkpoint discovery, without a Trainer (the Trainer path is in
``test_resume.py``)."""

from __future__ import annotations

import pytest

from turbotune.errors import TurbotuneError
from turbotune.train.checkpoint import STAGING, atomic_directory, checkpoints, resolve_resume


def test_atomic_directory_publishes_and_replaces(tmp_path):
    final = tmp_path / "final"
    with atomic_directory(final) as tmp:
        assert tmp.parent == tmp_path / STAGING and not final.exists()
        (tmp / "a.txt").write_text("one")
    assert (final / "a.txt").read_text() == "one"
    with atomic_directory(final) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"], "the old version must be gone"
    assert not (tmp_path / STAGING).exists()


def test_atomic_directory_keeps_the_previous_version_on_failure(tmp_path):
    final = tmp_path / "final"
    with atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("good")
    with pytest.raises(RuntimeError, match="killed"), atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed while saving")
    assert (final / "a.txt").read_text() == "good"
    assert not (tmp_path / STAGING).exists()


def test_checkpoints_are_complete_ones_in_numeric_order(tmp_path):
    for name in ["checkpoint-10", "checkpoint-9", "checkpoint-100", "checkpoint-x", "final"]:
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-7").write_text("a file, not a checkpoint")
    (tmp_path / STAGING / "checkpoint-200").mkdir(parents=True)  # a save that never finished
    assert [p.name for p in checkpoints(tmp_path)] == [
        "checkpoint-9",
        "checkpoint-10",
        "checkpoint-100",
    ]
    assert resolve_resume("latest", tmp_path) == str(tmp_path / "checkpoint-100")
    assert resolve_resume(str(tmp_path / "checkpoint-9"), tmp_path) == str(
        tmp_path / "checkpoint-9"
    )
    assert resolve_resume(None, tmp_path) is None
    assert checkpoints(tmp_path / "missing") == []


def test_latest_with_only_an_unfinished_save_is_an_error(tmp_path):
    (tmp_path / STAGING / "checkpoint-5").mkdir(parents=True)
    with pytest.raises(TurbotuneError, match="no checkpoint-N directory"):
        resolve_resume("latest", tmp_path)
