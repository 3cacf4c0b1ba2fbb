"""Writing files that hold secrets (or point at them): 0600 from the first byte, atomically."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_private_file(path: Path, content: bytes) -> None:
    """Write a 0600 file atomically: the data never exists with wider permissions, and a
    reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
