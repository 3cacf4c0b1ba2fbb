"""The store interface: what every backend (SQLite now, PostgreSQL later) provides.

The store is deliberately ignorant of resource semantics: it keeps documents (plain dicts,
already validated by `verity.resources`) keyed by (kind, namespace, name), owns their
metadata (uid, resourceVersion, generation, timestamps), records every write in a
hash-chained audit trail inside the same transaction, and streams changes to watchers.
"""

from __future__ import annotations

import builtins
import enum
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class StoreError(Exception):
    """Base class of every store failure."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    """Optimistic concurrency failure (stale resourceVersion) or create of an existing key."""


class StorageUnavailable(StoreError):
    """The data directory cannot be written (read-only, full, corrupt): nothing was changed."""


@dataclass(frozen=True)
class ObjectKey:
    kind: str
    namespace: str  # "" for cluster-scoped kinds (Mesh)
    name: str

    def __str__(self) -> str:
        if self.namespace:
            return f"{self.kind} {self.namespace}/{self.name}"
        return f"{self.kind} {self.name}"


@dataclass(frozen=True)
class StoredObject:
    key: ObjectKey
    api_version: str
    labels: Mapping[str, str]
    document: Mapping[str, Any]  # the document as applied, without store-owned metadata
    spec_digest: str  # sha256 hex of the canonical JSON of the document
    uid: str
    resource_version: int  # monotonic across the whole store
    generation: int  # bumped only when the document changes
    created_at: str  # RFC 3339, UTC
    updated_at: str


class WriteAction(enum.StrEnum):
    CREATE = "create"  # fails with Conflict if the key exists
    UPDATE = "update"  # fails with NotFound if missing, Conflict if expected_version is stale
    APPLY = "apply"  # create or update (server-side apply); expected_version honoured if set
    DELETE = "delete"  # fails with NotFound if missing, Conflict if expected_version is stale


@dataclass(frozen=True)
class WriteOp:
    action: WriteAction
    key: ObjectKey
    api_version: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    document: Mapping[str, Any] = field(default_factory=dict)
    expected_version: int | None = None


class Outcome(enum.StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"  # apply of an identical document: no new version, no event
    DELETED = "deleted"


@dataclass(frozen=True)
class WriteResult:
    key: ObjectKey
    outcome: Outcome
    object: StoredObject | None  # None after delete
    old_version: int | None


class EventType(enum.StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


@dataclass(frozen=True)
class WatchEvent:
    revision: int  # the store revision of this change; resume a watch from here
    type: EventType
    key: ObjectKey
    object: StoredObject | None  # the new object; for DELETED the last state before delete


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: str
    actor: str  # token name
    action: str  # create / update / delete
    kind: str
    namespace: str
    name: str
    old_version: int | None
    new_version: int | None
    spec_digest: str
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class TokenRecord:
    """A bearer token as stored: only the hash of the secret, never the secret."""

    name: str
    kind: str  # "user" | "dataplane"
    secret_hash: str
    scope: Mapping[str, Any]  # user: namespaces/kinds/verbs; dataplane: mesh/namespace/sa
    created_at: str
    expires_at: str | None
    revoked_at: str | None = None


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def get(self, key: ObjectKey) -> StoredObject | None: ...

    async def list(
        self,
        kind: str | None = None,
        namespace: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> builtins.list[StoredObject]: ...

    async def write(
        self, ops: Sequence[WriteOp], actor: str, dry_run: bool = False
    ) -> builtins.list[WriteResult]:
        """Apply all ops in one transaction (all or nothing), each recorded in the audit trail."""
        ...

    async def revision(self) -> int: ...

    def watch(self, from_revision: int) -> AsyncIterator[WatchEvent]:
        """Every change after from_revision, then live changes, in revision order."""
        ...

    async def audit_log(
        self,
        kind: str | None = None,
        namespace: str | None = None,
        actor: str | None = None,
        limit: int | None = None,
    ) -> builtins.list[AuditEntry]: ...

    async def audit_verify(self) -> builtins.list[str]:
        """Problems found in the audit hash chain; empty when it is intact."""
        ...

    async def put_token(self, token: TokenRecord) -> None: ...

    async def find_token(self, secret_hash: str) -> TokenRecord | None: ...

    async def list_tokens(self) -> builtins.list[TokenRecord]: ...

    async def revoke_token(self, name: str, at: str) -> bool: ...

    async def get_blob(self, key: str) -> bytes | None:
        """Control-plane state that is not a resource (the CA, encrypted)."""
        ...

    async def put_blob(self, key: str, value: bytes, expected: bytes | None = None) -> bool:
        """Compare-and-set: stores value if the current value equals expected (None: absent)."""
        ...
