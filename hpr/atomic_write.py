"""Writing a file so that a crash never leaves one that looks complete: temp file, fsync, rename, fsync the directory.

The one implementation for the whole project: checkpoints (``hpr.checkpoint``), activation shards and reports
(``trainer``) all write through :func:`atomic_write`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(target: Path, write: Callable[[str], object]) -> None:
    """Write ``target`` through ``write(tmp_path)``, fsync it, rename it into place and fsync the directory.

    On any failure the temporary file is removed and the exception propagates (``OSError`` for disk problems);
    ``target`` is either the old file or the complete new one. The file is readable by others (0644): a checkpoint
    is read by other users (a server container, a non-root service), and ``mkstemp`` creates 0600.
    """
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # after writing: a writer may replace the file (safetensors does), resetting its mode
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
