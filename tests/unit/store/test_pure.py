"""The pure parts: canonical JSON, digests, the audit hash chain."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

from verity.store.audit import EMPTY_CHAIN, GENESIS_HASH, ChainHead, next_entry, verify_chain
from verity.store.base import AuditEntry
from verity.store.canonical import canonical_json, digest
from verity.store.clock import utc_now


def test_canonical_json_is_sorted_compact_utf8() -> None:
    value = {"b": [1, {"y": 2, "x": "é"}], "a": None}
    assert canonical_json(value) == '{"a":null,"b":[1,{"x":"é","y":2}]}'
    expected = hashlib.sha256('{"a":null,"b":[1,{"x":"é","y":2}]}'.encode()).hexdigest()
    assert digest(value) == expected
    assert digest({"a": 1, "b": 2}) == digest({"b": 2, "a": 1})


def test_utc_now_format() -> None:
    now = utc_now()
    assert len(now) == len("2026-12-02T17:00:00.123456Z") and now.endswith("Z")


def _chain(length: int) -> list[AuditEntry]:
    entries, head = [], EMPTY_CHAIN
    for i in range(length):
        entry = next_entry(
            head, at=utc_now(), actor="a", action="create", kind="Mesh", namespace="",
            name=f"m{i}", old_version=None, new_version=i + 1, spec_digest=digest(i),
        )
        entries.append(entry)
        head = ChainHead(entry.seq, entry.hash)
    return entries


def test_chain_links_and_verifies() -> None:
    chain = _chain(4)
    assert chain[0].prev_hash == GENESIS_HASH
    assert verify_chain(chain, ChainHead(4, chain[-1].hash)) == []
    assert verify_chain([], EMPTY_CHAIN) == []


def test_every_field_is_covered_by_the_hash() -> None:
    chain = _chain(3)
    changed: dict[str, Any] = {
        "at": "x", "actor": "x", "action": "x", "kind": "x", "namespace": "x", "name": "x",
        "old_version": 9, "new_version": 9, "spec_digest": "x", "prev_hash": "x",
    }
    for field, value in changed.items():
        tampered = [chain[0], replace(chain[1], **{field: value}), chain[2]]
        assert "entry 2: hash mismatch" in verify_chain(tampered), field


def test_reordered_entries_are_detected() -> None:
    a, b, c = _chain(3)
    assert verify_chain([a, c, b]) != []
