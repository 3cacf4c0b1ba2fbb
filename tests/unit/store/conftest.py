"""Fixtures for the store tests: a real SQLite store in a temporary data dir."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from verity.store import SqliteStore
from verity.store.base import ObjectKey, WatchEvent, WriteAction, WriteOp


def policy_key(name: str, namespace: str = "default") -> ObjectKey:
    return ObjectKey("AuthorizationPolicy", namespace, name)


def policy_document(
    name: str,
    namespace: str = "default",
    app: str = "web",
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    principal = f"cluster.local/ns/{namespace}/sa/client"
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
        "spec": {
            "selector": {"matchLabels": {"app": app}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": [principal]}}]}],
        },
    }


def apply_op(
    name: str,
    namespace: str = "default",
    *,
    action: WriteAction = WriteAction.APPLY,
    app: str = "web",
    labels: Mapping[str, str] | None = None,
    expected_version: int | None = None,
) -> WriteOp:
    labels = dict(labels or {})
    return WriteOp(
        action=action,
        key=policy_key(name, namespace),
        api_version="security.istio.io/v1",
        labels=labels,
        document=policy_document(name, namespace, app, labels),
        expected_version=expected_version,
    )


def delete_op(name: str, namespace: str = "default", expected: int | None = None) -> WriteOp:
    return WriteOp(WriteAction.DELETE, policy_key(name, namespace), expected_version=expected)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "verity.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteStore]:
    async with SqliteStore(db_path) as opened:
        yield opened


async def events_until(
    store: SqliteStore, after: int, revision: int, timeout: float = 5.0
) -> list[WatchEvent]:
    """Watch events after `after` up to and including `revision`."""

    async def collect() -> list[WatchEvent]:
        events: list[WatchEvent] = []
        if revision <= after:
            return events
        async for event in store.watch(after):
            events.append(event)
            if event.revision >= revision:
                break
        return events

    return await asyncio.wait_for(collect(), timeout)
