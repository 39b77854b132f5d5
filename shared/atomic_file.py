"""The one way this project replaces a file: write a temp file beside it, fsync it, make it readable by
other users (services may run as another uid), rename it over the target, fsync the directory so the
rename itself survives a crash. A reader sees the old file or the new one, never a mix."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(target: str | Path, write: Callable[[str], None], mode: int = 0o644) -> None:
    """`write(tmp_path)` fills the temp file; then fsync, chmod, rename over `target`, fsync the dir."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(target: str | Path, text: str) -> None:
    atomic_write(target, lambda path: Path(path).write_text(text))
