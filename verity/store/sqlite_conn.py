"""SQLite connections for the store: settings, locking, transactions, and turning SQLite and
OS failures into the store's own errors (so no sqlite3 type reaches a caller)."""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from verity.store.base import StorageUnavailable, StoreError

# Primary result codes (the low byte of an extended code), from sqlite3.h.
_SQLITE_PERM = 3
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_READONLY = 8
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_NOTADB = 26

_READ_ONLY_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def read_only_reason(directory: Path) -> str | None:
    """Why directory cannot be written to, or None when it can."""
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError as exc:
        return exc.strerror
    if not os.access(directory, os.W_OK | os.X_OK):
        return "permission denied"
    return None


def _describe(exc: sqlite3.Error) -> str:
    name = getattr(exc, "sqlite_errorname", None)
    return f"{exc} ({name})" if name else str(exc)


def storage_error(exc: sqlite3.Error, path: Path) -> StoreError:
    """The store error for a failed SQLite call on the database at path."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    data_dir, detail = path.parent, _describe(exc)
    if primary in (_SQLITE_READONLY, _SQLITE_PERM):
        return StorageUnavailable(f"data dir {data_dir} is read-only: {detail}")
    if primary == _SQLITE_FULL:
        return StorageUnavailable(f"data dir {data_dir} is full: {detail}")
    if primary == _SQLITE_IOERR:
        return StorageUnavailable(f"storage failed in data dir {data_dir}: {detail}")
    if primary == _SQLITE_CANTOPEN:
        reason = read_only_reason(data_dir)
        if reason:
            return StorageUnavailable(f"data dir {data_dir} is read-only: {reason}")
        return StorageUnavailable(f"cannot open database {path}: {detail}")
    if primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return StorageUnavailable(f"database {path} is locked by another connection: {detail}")
    if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return StorageUnavailable(f"database {path} is corrupt or not a store: {detail}")
    return StoreError(f"database {path}: {detail}")


def os_storage_error(exc: OSError, path: Path) -> StorageUnavailable:
    data_dir = path.parent
    if exc.errno in _READ_ONLY_ERRNOS:
        return StorageUnavailable(f"data dir {data_dir} is read-only: {exc.strerror}")
    if exc.errno in _FULL_ERRNOS:
        return StorageUnavailable(f"data dir {data_dir} is full: {exc.strerror}")
    return StorageUnavailable(f"storage failed in data dir {data_dir}: {exc.strerror or exc}")


@contextlib.contextmanager
def translated_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise storage_error(exc, path) from exc
    except OSError as exc:
        raise os_storage_error(exc, path) from exc


def prepare_data_dir(path: Path) -> None:
    """Create the data dir (0700) and an empty database file (0600) if missing, and fail early
    with the reason when either cannot be written. SQLite gives its -wal and -shm files the
    database file's permissions."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    reason = read_only_reason(path.parent)
    if reason:
        raise StorageUnavailable(f"data dir {path.parent} is read-only: {reason}")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise StorageUnavailable(f"database {path} is read-only: permission denied")
        return
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    # Makes the new file's directory entry durable, like SQLite does for its journal files.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def connect(path: Path, *, busy_timeout_s: float, read_only: bool) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) with the store's settings."""
    conn = sqlite3.connect(
        path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
    )
    try:
        _configure(conn, busy_timeout_s=busy_timeout_s, read_only=read_only)
    except BaseException:
        conn.close()
        raise
    return conn


def _configure(conn: sqlite3.Connection, *, busy_timeout_s: float, read_only: bool) -> None:
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    if not read_only:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StorageUnavailable(f"database cannot use WAL mode (journal_mode is {mode})")
    # FULL: a commit has reached the disk (WAL fsynced) when COMMIT returns.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    if read_only:
        conn.execute("PRAGMA query_only = ON")


def _rollback_quietly(conn: sqlite3.Connection) -> None:
    # SQLite may already have rolled back (it does on some FULL/IOERR failures); the original
    # error is the one worth reporting.
    with contextlib.suppress(sqlite3.Error):
        if conn.in_transaction:
            conn.execute("ROLLBACK")


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, *, commit: bool = True) -> Iterator[None]:
    """BEGIN IMMEDIATE (take the write lock up front, so no upgrade deadlock) ... COMMIT,
    or ROLLBACK when commit is False or the body raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT" if commit else "ROLLBACK")
    except BaseException:
        _rollback_quietly(conn)
        raise


@contextlib.contextmanager
def snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """A read transaction: every query in it sees the same committed state."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        _rollback_quietly(conn)


class GuardedConnection:
    """One connection shared by worker threads, one at a time, usable between activate()
    and close().

    The connection is opened lazily and reopened after a failure that left it inside a
    transaction it could not roll back, so a passing storage problem does not wedge the store.
    """

    def __init__(self, path: Path, *, busy_timeout_s: float, read_only: bool) -> None:
        self._path = path
        self._busy_timeout_s = busy_timeout_s
        self._read_only = read_only
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._active = False

    def activate(self) -> None:
        with self._lock:
            self._active = True

    @contextlib.contextmanager
    def use(self) -> Iterator[sqlite3.Connection]:
        with self._lock, translated_errors(self._path):
            if not self._active:
                raise StoreError(f"store {self._path} is not open")
            if self._conn is None:
                self._conn = connect(
                    self._path, busy_timeout_s=self._busy_timeout_s, read_only=self._read_only
                )
            conn = self._conn
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    self._discard()

    def _discard(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    def close(self, *, optimize: bool = False) -> None:
        with self._lock:
            if optimize and self._conn is not None:
                # Refreshes the planner's statistics; cheap, and what SQLite recommends on close.
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("PRAGMA optimize")
            self._discard()
            self._active = False
