"""A data dir that cannot be written (read-only, full, failing) gives StorageUnavailable with a
one-line reason, changes nothing, and leaves the data readable. These use real file systems:
a tmpfs remounted read-only, a small tmpfs filled up, and immutable files for I/O errors."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from verity.store import SqliteStore
from verity.store.base import StorageUnavailable, WriteOp

from .conftest import apply_op
from .mounts import fill, immutable, remount, running_as_root, tmpfs

BIG = "x" * 4000


def _big_ops(prefix: str, count: int) -> list[WriteOp]:
    return [apply_op(f"{prefix}-{i}", labels={"pad": BIG[: 60]}, app=BIG) for i in range(count)]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "mnt", "512k") as mounted:
        yield mounted


def _integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


async def _assert_intact(db: Path, names: list[str]) -> None:
    assert _integrity(db) == "ok"
    async with SqliteStore(db) as store:
        assert sorted(o.key.name for o in await store.list()) == sorted(names)
        assert await store.audit_verify() == []


async def test_open_in_read_only_dir(small_fs: Path) -> None:
    db = small_fs / "verity.db"
    async with SqliteStore(db) as store:
        await store.write([apply_op("kept")], actor="x")
    remount(small_fs, "ro")
    try:
        with pytest.raises(StorageUnavailable) as raised:
            await SqliteStore(db).open()
        assert str(raised.value) == f"data dir {small_fs} is read-only: read-only file system"
        with pytest.raises(StorageUnavailable, match="is read-only"):
            await SqliteStore(small_fs / "new" / "verity.db").open()
    finally:
        remount(small_fs, "rw")
    await _assert_intact(db, ["kept"])


async def test_open_in_a_dir_without_write_permission(tmp_path: Path) -> None:
    if running_as_root():
        pytest.skip("root ignores permission bits; the read-only mount test covers root")
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o500)
    try:
        with pytest.raises(StorageUnavailable, match="is read-only: permission denied"):
            await SqliteStore(data / "verity.db").open()
    finally:
        data.chmod(0o700)


async def test_full_disk_fails_the_write_and_keeps_the_data(small_fs: Path) -> None:
    db = small_fs / "verity.db"
    async with SqliteStore(db) as store:
        await store.write([apply_op("kept-1"), apply_op("kept-2")], actor="x")
        filler = fill(small_fs)

        with pytest.raises(StorageUnavailable) as raised:
            await store.write(_big_ops("lost", 40), actor="x")
        reason = str(raised.value)
        assert reason.startswith(f"data dir {small_fs} is full: database or disk is full")
        assert "\n" not in reason

        assert sorted(o.key.name for o in await store.list()) == ["kept-1", "kept-2"]
        assert await store.revision() == 2
        filler.unlink()
        [result] = await store.write([apply_op("after")], actor="x")  # the store recovers
        assert result.object is not None and result.object.resource_version == 3
    await _assert_intact(db, ["kept-1", "kept-2", "after"])


async def test_open_on_a_full_disk(small_fs: Path) -> None:
    fill(small_fs)
    with pytest.raises(StorageUnavailable, match=f"data dir {small_fs}/new is full"):
        await SqliteStore(small_fs / "new" / "verity.db").open()


async def test_disk_io_error_fails_the_write_and_keeps_the_data(db_path: Path) -> None:
    async with SqliteStore(db_path) as store:
        await store.write([apply_op("kept")], actor="x")
        wal = db_path.with_name(db_path.name + "-wal")
        with immutable(db_path, wal):
            with pytest.raises(StorageUnavailable) as raised:
                await store.write(_big_ops("lost", 3), actor="x")
            assert str(raised.value).startswith(
                f"storage failed in data dir {db_path.parent}: disk I/O error (SQLITE_IOERR"
            )
            assert [o.key.name for o in await store.list()] == ["kept"]
        await store.write([apply_op("after")], actor="x")
    await _assert_intact(db_path, ["kept", "after"])


async def test_open_with_an_unwritable_database_file(db_path: Path) -> None:
    async with SqliteStore(db_path) as store:
        await store.write([apply_op("kept")], actor="x")
    with immutable(db_path):
        with pytest.raises(StorageUnavailable, match=f"database {db_path} is read-only"):
            await SqliteStore(db_path).open()
    await _assert_intact(db_path, ["kept"])
