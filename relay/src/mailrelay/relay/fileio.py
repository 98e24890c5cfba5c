"""Small file-writing primitives shared by the spool and its journal."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["fsync_dir", "write_parts"]


def write_parts(fd: int, parts: Sequence[bytes]) -> None:
    """Write `parts` in order, in one `writev` when the kernel takes it all (no copy);
    a short write continues where it stopped."""
    written = os.writev(fd, parts)
    total = sum(len(part) for part in parts)
    if written < total:
        rest = memoryview(b"".join(parts))[written:]
        while rest:
            rest = rest[os.write(fd, rest) :]


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
