"""The resource store: documents keyed by (kind, namespace, name), with versions, a change
watch, a hash-chained audit trail, tokens and blobs. `open_store` picks the backend."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from verity.store.base import (
    AuditEntry,
    Conflict,
    EventType,
    NotFound,
    ObjectKey,
    Outcome,
    StorageUnavailable,
    Store,
    StoredObject,
    StoreError,
    TokenRecord,
    WatchEvent,
    WriteAction,
    WriteOp,
    WriteResult,
)
from verity.store.sqlite import SqliteStore

DEFAULT_DATABASE_NAME = "verity.db"

__all__ = [
    "DEFAULT_DATABASE_NAME",
    "AuditEntry",
    "Conflict",
    "EventType",
    "NotFound",
    "ObjectKey",
    "Outcome",
    "SqliteStore",
    "StorageUnavailable",
    "Store",
    "StoreError",
    "StoredObject",
    "TokenRecord",
    "WatchEvent",
    "WriteAction",
    "WriteOp",
    "WriteResult",
    "open_store",
]

_POSTGRES_SCHEMES = {"postgres", "postgresql"}


def _sqlite_path(url_or_path: str) -> Path:
    if not url_or_path.startswith("sqlite:"):
        return Path(url_or_path)
    parts = urlsplit(url_or_path)
    if parts.netloc or not parts.path or parts.query or parts.fragment:
        raise StoreError(
            f"invalid SQLite URL {url_or_path!r}: expected sqlite:///absolute/path/to/file.db"
        )
    return Path(parts.path)


def open_store(url_or_path: str) -> Store:
    """The store for a database path or URL; call `await store.open()` before use.

    Accepted: a file path, `sqlite:///absolute/path` (URL form, so three slashes then the
    absolute path), or an existing directory (the data dir, holding `verity.db`).
    PostgreSQL URLs are recognised and refused until that backend exists.
    """
    scheme = urlsplit(url_or_path).scheme.split("+")[0].lower()
    if scheme in _POSTGRES_SCHEMES:
        # The URL may carry a password: do not echo it.
        raise StoreError(
            "PostgreSQL store is not supported yet; use a SQLite path or sqlite:///path"
        )
    if scheme not in ("", "sqlite") and len(scheme) > 1:  # "C:" style drive letters are paths
        raise StoreError(f"unsupported store URL scheme {scheme!r}: use a path or sqlite:///path")
    path = _sqlite_path(url_or_path)
    if path.is_dir():
        path = path / DEFAULT_DATABASE_NAME
    return SqliteStore(path)
