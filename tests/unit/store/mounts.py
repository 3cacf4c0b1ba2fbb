"""Real read-only and full file systems for the storage-failure tests (root can mount here).

Tests skip, saying why, where mounting is not permitted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


@contextlib.contextmanager
def tmpfs(directory: Path, size: str) -> Iterator[Path]:
    """A tmpfs of the given size mounted on directory for the duration of the block."""
    directory.mkdir(parents=True, exist_ok=True)
    mounted = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(directory))
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        if _run("umount", str(directory)).returncode != 0:
            _run("umount", "-l", str(directory))  # something still holds it open: detach


def remount(directory: Path, mode: str) -> None:
    result = _run("mount", "-o", f"remount,{mode}", str(directory))
    assert result.returncode == 0, f"remount {mode} failed: {result.stderr.strip()}"


def fill(directory: Path) -> Path:
    """Write a file until the file system is full; returns it (delete it to free the space)."""
    filler = directory / "filler"
    chunk = b"\0" * 4096
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


@contextlib.contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """chattr +i: refuses writes even to root and even through descriptors already open, the
    way a failing disk refuses them. Never apply it to a -shm file: SQLite maps that into
    memory and a refused store there is a SIGBUS, not an error."""
    done: list[Path] = []
    try:
        for path in paths:
            result = _run("chattr", "+i", str(path))
            if result.returncode != 0:
                pytest.skip(f"chattr +i is not supported here: {result.stderr.strip()}")
            done.append(path)
        yield
    finally:
        for path in done:
            _run("chattr", "-i", str(path))


def running_as_root() -> bool:
    return os.geteuid() == 0
