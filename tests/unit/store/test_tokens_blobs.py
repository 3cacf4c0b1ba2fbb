"""Tokens (hashes only) and blobs (compare-and-set)."""

from __future__ import annotations

import hashlib

import pytest

from verity.store import SqliteStore
from verity.store.base import Conflict, TokenRecord


def _token(name: str, secret: str, kind: str = "user") -> TokenRecord:
    return TokenRecord(
        name=name,
        kind=kind,
        secret_hash=hashlib.sha256(secret.encode()).hexdigest(),
        scope={"namespaces": ["shop"], "verbs": ["get", "list"]},
        created_at="2026-12-02T17:00:00.000000Z",
        expires_at=None,
    )


async def test_put_find_list(store: SqliteStore) -> None:
    admin, agent = _token("admin", "s1"), _token("web-1", "s2", kind="dataplane")
    await store.put_token(admin)
    await store.put_token(agent)
    assert await store.find_token(admin.secret_hash) == admin
    assert await store.find_token("0" * 64) is None
    assert await store.list_tokens() == [admin, agent]


async def test_duplicate_name_conflicts(store: SqliteStore) -> None:
    await store.put_token(_token("admin", "s1"))
    with pytest.raises(Conflict, match="token admin already exists"):
        await store.put_token(_token("admin", "s2"))
    assert len(await store.list_tokens()) == 1


async def test_duplicate_secret_conflicts_without_echoing_it(store: SqliteStore) -> None:
    first = _token("a", "same")
    await store.put_token(first)
    with pytest.raises(Conflict) as raised:
        await store.put_token(_token("b", "same"))
    assert first.secret_hash not in str(raised.value)


async def test_revoke(store: SqliteStore) -> None:
    token = _token("admin", "s1")
    await store.put_token(token)
    assert await store.revoke_token("admin", "2026-12-03T00:00:00.000000Z") is True
    assert await store.revoke_token("admin", "2026-12-04T00:00:00.000000Z") is False
    assert await store.revoke_token("nobody", "2026-12-04T00:00:00.000000Z") is False
    found = await store.find_token(token.secret_hash)
    assert found is not None and found.revoked_at == "2026-12-03T00:00:00.000000Z"


async def test_blob_compare_and_set(store: SqliteStore) -> None:
    assert await store.get_blob("ca") is None
    assert await store.put_blob("ca", b"v1", expected=b"something") is False
    assert await store.put_blob("ca", b"v1") is True
    assert await store.put_blob("ca", b"v1-again") is False  # expected absent, but present
    assert await store.put_blob("ca", b"v2", expected=b"wrong") is False
    assert await store.get_blob("ca") == b"v1"
    assert await store.put_blob("ca", b"\x00v2\xff", expected=b"v1") is True
    assert await store.get_blob("ca") == b"\x00v2\xff"
    assert await store.get_blob("other") is None


async def test_tokens_and_blobs_do_not_touch_the_revision(store: SqliteStore) -> None:
    await store.put_token(_token("admin", "s1"))
    await store.put_blob("ca", b"x")
    assert await store.revision() == 0 and await store.audit_log() == []
