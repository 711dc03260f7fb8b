"""Checkpoints that are never half-written, and finding the one to resume from.

A checkpoint is first written into ``<output_dir>/.staging/checkpoint-N`` and then moved into
place with one ``os.replace`` (atomic on a POSIX file system): a run killed while saving leaves
the previous checkpoints intact and no ``checkpoint-N`` that cannot be loaded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from turbotune.errors import TurbotuneError

STAGING = ".staging"
PREFIX = "checkpoint-"


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final`` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / STAGING / final.name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_staging(final.parent)
        raise
    publish(tmp, final)
    remove_staging(final.parent)


def publish(tmp: Path, final: Path) -> None:
    """Move a finished directory ``tmp`` to ``final``, replacing an older one.

    Replacing takes two renames (directories cannot be swapped in one): a crash between them
    leaves the previous version in ``.staging/<name>.old`` rather than a half-written ``final``.
    """
    if final.exists():
        old = final.parent / STAGING / (final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def remove_staging(parent: str | os.PathLike) -> None:
    """Remove ``parent/.staging`` when nothing is left in it (another writer may still be)."""
    with contextlib.suppress(OSError):
        (Path(parent) / STAGING).rmdir()


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def resolve_resume(value: str | None, output_dir: str | os.PathLike) -> str | None:
    """``None``, a checkpoint directory, or ``latest`` (the newest complete one) -> a path."""
    if value is None:
        return None
    if value == "latest":
        found = checkpoints(output_dir)
        if not found:
            raise TurbotuneError(
                f"train.resume_from_checkpoint=latest, but '{output_dir}' has no checkpoint-N directory "
                "(set train.save_steps so that checkpoints are written)"
            )
        return str(found[-1])
    if not Path(value).is_dir():
        raise TurbotuneError(f"checkpoint '{value}' does not exist (train.resume_from_checkpoint)")
    return value
