"""The audit trail: one entry per changed object, filters, and hash-chain verification
against entries tampered with directly in the database file."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

from verity.store import SqliteStore
from verity.store.audit import GENESIS_HASH, entry_hash
from verity.store.canonical import digest

from .conftest import apply_op, delete_op


async def _history(store: SqliteStore) -> None:
    await store.write([apply_op("a", "shop"), apply_op("b", "bank")], actor="alice")
    await store.write([apply_op("a", "shop", app="v2")], actor="bob")
    await store.write([apply_op("a", "shop", app="v2")], actor="bob")  # unchanged: no entry
    await store.write([delete_op("b", "bank")], actor="carol")
    await store.write([apply_op(f"p{i}", "shop") for i in range(5)], actor="alice")


async def test_one_entry_per_changed_object(store: SqliteStore) -> None:
    await _history(store)
    log = await store.audit_log()
    assert [e.seq for e in log] == list(range(1, 10))
    assert [(e.actor, e.action, e.name, e.old_version, e.new_version) for e in log[:4]] == [
        ("alice", "create", "a", None, 1),
        ("alice", "create", "b", None, 2),
        ("bob", "update", "a", 1, 3),
        ("carol", "delete", "b", 2, None),
    ]
    assert log[0].prev_hash == GENESIS_HASH
    assert all(entry.prev_hash == before.hash for before, entry in pairwise(log))
    assert all(entry.hash == entry_hash(entry) for entry in log)
    # a delete records the digest of what was deleted
    assert log[3].spec_digest == log[1].spec_digest == digest(apply_op("b", "bank").document)


async def test_filters_and_limit(store: SqliteStore) -> None:
    await _history(store)
    assert [e.seq for e in await store.audit_log(actor="bob")] == [3]
    assert [e.seq for e in await store.audit_log(namespace="bank")] == [2, 4]
    assert [e.seq for e in await store.audit_log(kind="AuthorizationPolicy", namespace="shop",
                                                 actor="alice")] == [1, 5, 6, 7, 8, 9]
    assert [e.seq for e in await store.audit_log(limit=3)] == [7, 8, 9]
    assert [e.seq for e in await store.audit_log(namespace="bank", limit=1)] == [4]
    assert await store.audit_log(kind="Mesh") == []


async def test_intact_chain_verifies(store: SqliteStore) -> None:
    assert await store.audit_verify() == []
    await _history(store)
    assert await store.audit_verify() == []


def _tamper(db_path: Path, statement: str, *params: object) -> None:
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute(statement, params)
    conn.close()


async def test_modified_entry_is_detected(db_path: Path) -> None:
    async with SqliteStore(db_path) as store:
        await _history(store)
    _tamper(db_path, "UPDATE audit SET actor = 'mallory' WHERE seq = 7")
    async with SqliteStore(db_path) as store:
        assert await store.audit_verify() == ["entry 7: hash mismatch"]


async def test_modified_entry_with_recomputed_hash_breaks_the_next_link(db_path: Path) -> None:
    async with SqliteStore(db_path) as store:
        await _history(store)
        entry = (await store.audit_log())[6]
    forged = entry_hash(replace(entry, actor="mallory"))
    _tamper(db_path, "UPDATE audit SET actor = 'mallory', hash = ? WHERE seq = 7", forged)
    async with SqliteStore(db_path) as store:
        assert await store.audit_verify() == ["entry 8: prev_hash does not match entry 7"]


async def test_removed_entry_is_detected(db_path: Path) -> None:
    async with SqliteStore(db_path) as store:
        await _history(store)
    _tamper(db_path, "DELETE FROM audit WHERE seq = 7")
    async with SqliteStore(db_path) as store:
        assert await store.audit_verify() == [
            "entry 8: gap in seq, entries 7..7 are missing",
            "entry 8: prev_hash does not match entry 6",
        ]


async def test_removed_first_and_last_entries_are_detected(db_path: Path) -> None:
    async with SqliteStore(db_path) as store:
        await _history(store)
    _tamper(db_path, "DELETE FROM audit WHERE seq IN (1, 9)")
    async with SqliteStore(db_path) as store:
        assert await store.audit_verify() == [
            "entry 2: gap in seq, entries 1..1 are missing",
            "entry 2: prev_hash does not match the start of the chain",
            "chain ends at entry 8 but the store recorded entry 9 as the last",
        ]


async def test_chain_continues_across_reopen(db_path: Path) -> None:
    async with SqliteStore(db_path) as store:
        await store.write([apply_op("a")], actor="x")
    async with SqliteStore(db_path) as store:
        await store.write([apply_op("b")], actor="x")
        log = await store.audit_log()
        assert log[1].prev_hash == log[0].hash
        assert await store.audit_verify() == []
