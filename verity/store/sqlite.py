"""The resource store on SQLite: the default backend, one file in the data dir.

Durability: WAL journal with synchronous=FULL, so a write that returned has been fsynced, and
a crash leaves every transaction either whole or absent. Blocking SQLite calls run in worker
threads (asyncio.to_thread) on two connections, each used by one thread at a time: a writer
(every transaction is BEGIN IMMEDIATE, so writes are serialized) and a reader, which WAL lets
read committed data while a write is in progress.
"""

from __future__ import annotations

import asyncio
import builtins
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from verity.store import sqlite_repo as repo
from verity.store.audit import ChainHead, next_entry, verify_chain
from verity.store.base import (
    AuditEntry,
    Conflict,
    ObjectKey,
    StoredObject,
    StoreError,
    TokenRecord,
    WatchEvent,
    WriteOp,
    WriteResult,
)
from verity.store.clock import utc_now
from verity.store.feed import ChangeFeed
from verity.store.plan import PlannedChange, plan_write, require_distinct_keys
from verity.store.sqlite_conn import (
    GuardedConnection,
    prepare_data_dir,
    snapshot,
    transaction,
    translated_errors,
)
from verity.store.sqlite_sql import SCHEMA_VERSION

T = TypeVar("T")


def _new_uid() -> str:
    return str(uuid.uuid4())


class SqliteStore:
    """`Store` on the SQLite database file at path (created, with its data dir, on open)."""

    def __init__(
        self, path: Path, *, busy_timeout_s: float = 5.0, watch_buffer: int = 1024
    ) -> None:
        """busy_timeout_s: how long to wait for another connection's write lock.
        watch_buffer: recent changes kept in memory for live watchers (older ones are read
        back from the change log)."""
        self.path = path
        self._busy_timeout_s = busy_timeout_s
        self._writer = self._connection(read_only=False)
        self._reader = self._connection(read_only=True)
        self._feed = ChangeFeed(self._read_changes, capacity=watch_buffer)

    def _connection(self, *, read_only: bool) -> GuardedConnection:
        return GuardedConnection(
            self.path, busy_timeout_s=self._busy_timeout_s, read_only=read_only
        )

    # --- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Create the data dir, database and schema as needed; raises StorageUnavailable when
        the data dir cannot be written."""
        self._writer.activate()
        self._reader.activate()
        try:
            revision = await asyncio.to_thread(self._open_sync)
        except BaseException:
            await asyncio.to_thread(self._close_sync)
            raise
        self._feed.start(asyncio.get_running_loop(), revision)

    def _open_sync(self) -> int:
        with translated_errors(self.path):
            prepare_data_dir(self.path)
        with self._writer.use() as conn, transaction(conn):
            version = repo.schema_version(conn)
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"database {self.path} has schema version {version}, newer than this "
                    f"version of Verity understands ({SCHEMA_VERSION})"
                )
            repo.migrate(conn, version)
            return repo.read_state(conn).revision

    async def close(self) -> None:
        self._feed.close()
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        self._reader.close()
        self._writer.close(optimize=True)

    async def __aenter__(self) -> SqliteStore:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- helpers -------------------------------------------------------------------------

    async def _read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self._read_sync, query)

    def _read_sync(self, query: Callable[[sqlite3.Connection], T]) -> T:
        with self._reader.use() as conn:
            return query(conn)

    async def _write(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run body in one committed write transaction (for tokens and blobs)."""
        return await asyncio.to_thread(self._write_sync, body)

    def _write_sync(self, body: Callable[[sqlite3.Connection], T]) -> T:
        with self._writer.use() as conn, transaction(conn):
            return body(conn)

    # --- resources -----------------------------------------------------------------------

    async def get(self, key: ObjectKey) -> StoredObject | None:
        return await self._read(lambda conn: repo.get_object(conn, key))

    async def list(
        self,
        kind: str | None = None,
        namespace: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> builtins.list[StoredObject]:
        selector = dict(labels or {})
        return await self._read(lambda conn: repo.list_objects(conn, kind, namespace, selector))

    async def revision(self) -> int:
        return await self._read(lambda conn: repo.read_state(conn).revision)

    async def write(
        self, ops: Sequence[WriteOp], actor: str, dry_run: bool = False
    ) -> builtins.list[WriteResult]:
        """Apply all ops in one transaction (all or nothing), each recorded in the audit trail.

        An APPLY or UPDATE whose api_version, labels and document equal the stored ones is
        UNCHANGED: no new version, no audit entry, no event. dry_run returns the same results
        (would-be versions included) and rolls back.
        """
        ops = list(ops)
        require_distinct_keys(ops)
        if not ops:
            return []
        return await asyncio.to_thread(self._write_ops_sync, ops, actor, dry_run)

    def _write_ops_sync(
        self, ops: Sequence[WriteOp], actor: str, dry_run: bool
    ) -> builtins.list[WriteResult]:
        with self._writer.use() as conn:
            with transaction(conn, commit=not dry_run):
                changes = self._store_ops(conn, ops, actor)
            if not dry_run:
                # Still under the writer lock, so events reach the feed in commit order.
                self._feed.publish([change.event() for change in changes if change.changed])
        return [change.result for change in changes]

    def _store_ops(
        self, conn: sqlite3.Connection, ops: Sequence[WriteOp], actor: str
    ) -> builtins.list[PlannedChange]:
        state = repo.read_state(conn)
        current = {op.key: repo.get_object(conn, op.key) for op in ops}
        now = utc_now()
        changes = plan_write(ops, current, revision=state.revision, now=now, new_uid=_new_uid)
        revision, head = state.revision, state.audit_head
        for change in changes:
            if change.revision is None:
                continue
            repo.store_change(conn, change)
            entry = _audit_entry(change, head, actor, now)
            repo.insert_audit(conn, entry)
            revision, head = change.revision, ChainHead(entry.seq, entry.hash)
        if revision != state.revision:
            repo.write_state(conn, repo.StoreState(revision, head))
        return changes

    # --- watch ---------------------------------------------------------------------------

    def watch(self, from_revision: int) -> AsyncIterator[WatchEvent]:
        """Every change after from_revision, then live changes, in revision order.

        Replays from the change log (kept in full, so any revision works, also after a
        restart), then follows writes made through this store object. Ends when the store is
        closed. Writes by other processes are seen only on the next replay.
        Events share their objects with the write results and other watchers: read-only.
        """
        return self._feed.follow(from_revision)

    async def _read_changes(self, after: int, limit: int) -> builtins.list[WatchEvent]:
        return await self._read(lambda conn: repo.read_changes(conn, after, limit))

    # --- audit ---------------------------------------------------------------------------

    async def audit_log(
        self,
        kind: str | None = None,
        namespace: str | None = None,
        actor: str | None = None,
        limit: int | None = None,
    ) -> builtins.list[AuditEntry]:
        """Matching entries in seq order (oldest first); with limit, only the newest `limit`."""
        return await self._read(
            lambda conn: repo.select_audit(conn, kind, namespace, actor, limit)
        )

    async def audit_verify(self) -> builtins.list[str]:
        """Problems found in the audit hash chain; empty when it is intact."""
        return await self._read(_verify_audit)

    # --- tokens --------------------------------------------------------------------------

    async def put_token(self, token: TokenRecord) -> None:
        await self._write(lambda conn: _insert_new_token(conn, token))

    async def find_token(self, secret_hash: str) -> TokenRecord | None:
        return await self._read(lambda conn: repo.find_token(conn, secret_hash))

    async def list_tokens(self) -> builtins.list[TokenRecord]:
        return await self._read(repo.list_tokens)

    async def revoke_token(self, name: str, at: str) -> bool:
        """True if the token existed and was not revoked yet."""
        return await self._write(lambda conn: repo.revoke_token(conn, name, at))

    # --- blobs ---------------------------------------------------------------------------

    async def get_blob(self, key: str) -> bytes | None:
        return await self._read(lambda conn: repo.get_blob(conn, key))

    async def put_blob(self, key: str, value: bytes, expected: bytes | None = None) -> bool:
        """Compare-and-set: stores value if the current value equals expected (None: absent)."""
        return await self._write(lambda conn: _compare_and_set_blob(conn, key, value, expected))


def _audit_entry(change: PlannedChange, head: ChainHead, actor: str, at: str) -> AuditEntry:
    state = change.last_state
    return next_entry(
        head,
        at=at,
        actor=actor,
        action=change.audit_action,
        kind=state.key.kind,
        namespace=state.key.namespace,
        name=state.key.name,
        old_version=change.result.old_version,
        new_version=change.result.object.resource_version if change.result.object else None,
        spec_digest=state.spec_digest,
    )


def _verify_audit(conn: sqlite3.Connection) -> list[str]:
    with snapshot(conn):
        head = repo.read_state(conn).audit_head
        return verify_chain(repo.iter_audit_chain(conn), head)


def _insert_new_token(conn: sqlite3.Connection, token: TokenRecord) -> None:
    if repo.token_name_exists(conn, token.name):
        raise Conflict(f"token {token.name} already exists")
    if repo.token_hash_exists(conn, token.secret_hash):
        # Never echo the hash: it identifies the other token's secret.
        raise Conflict(f"token {token.name}: another token has the same secret")
    repo.insert_token(conn, token)


def _compare_and_set_blob(
    conn: sqlite3.Connection, key: str, value: bytes, expected: bytes | None
) -> bool:
    if repo.get_blob(conn, key) != expected:
        return False
    repo.put_blob(conn, key, value)
    return True
