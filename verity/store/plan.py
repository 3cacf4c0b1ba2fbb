"""What a write does, decided without touching storage.

`plan_write` takes the ops and the current state of the keys they name and returns, per op,
the outcome and the new object with its store-owned metadata, or raises NotFound / Conflict.
Backends load the current objects, call it inside their transaction and persist the result,
so the rules (versions, generations, unchanged applies) are the same for every backend.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from verity.store.base import (
    Conflict,
    EventType,
    NotFound,
    ObjectKey,
    Outcome,
    StoredObject,
    StoreError,
    WatchEvent,
    WriteAction,
    WriteOp,
    WriteResult,
)
from verity.store.canonical import canonical_json, sha256_hex

_EVENT_TYPES = {
    Outcome.CREATED: EventType.ADDED,
    Outcome.UPDATED: EventType.MODIFIED,
    Outcome.DELETED: EventType.DELETED,
}
_AUDIT_ACTIONS = {
    Outcome.CREATED: "create",
    Outcome.UPDATED: "update",
    Outcome.DELETED: "delete",
}


@dataclass(frozen=True)
class PlannedChange:
    result: WriteResult
    previous: StoredObject | None  # the state before this write
    revision: int | None  # the store revision this change takes; None when unchanged
    # canonical JSON of the new document, already made for its digest: backends store it
    # rather than serialize the document again
    document_json: str | None = None

    @property
    def changed(self) -> bool:
        return self.revision is not None

    @property
    def last_state(self) -> StoredObject:
        """The new object, or for a delete the object as it was."""
        state = self.result.object or self.previous
        assert state is not None, "every planned change has an old or a new state"
        return state

    @property
    def audit_action(self) -> str:
        return _AUDIT_ACTIONS[self.result.outcome]

    def event(self) -> WatchEvent:
        assert self.revision is not None, "an unchanged object has no event"
        return WatchEvent(
            revision=self.revision,
            type=_EVENT_TYPES[self.result.outcome],
            key=self.result.key,
            object=self.last_state,
        )


@dataclass(frozen=True)
class _Context:
    now: str
    new_uid: Callable[[], str]


@dataclass(frozen=True)
class _Content:
    """The caller's document and labels, copied to plain JSON values (so later changes to
    the caller's dicts cannot reach stored or published objects) and digested once."""

    api_version: str
    labels: dict[str, str]
    document: dict[str, Any]
    document_json: str
    digest: str

    @classmethod
    def of(cls, op: WriteOp) -> _Content:
        try:
            text = canonical_json(op.document)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"{op.key}: the document is not plain JSON data: {exc}") from exc
        return cls(op.api_version, dict(op.labels), json.loads(text), text, sha256_hex(text))

    def same_as(self, stored: StoredObject) -> bool:
        return (
            self.digest == stored.spec_digest
            and self.api_version == stored.api_version
            and self.labels == dict(stored.labels)
        )


def require_distinct_keys(ops: Sequence[WriteOp]) -> None:
    """Two ops on one key in a single write have no obvious meaning: refuse rather than guess."""
    first_index: dict[ObjectKey, int] = {}
    for index, op in enumerate(ops, start=1):
        if op.key in first_index:
            raise Conflict(
                f"{op.key} appears twice in one write (ops {first_index[op.key]} and {index}); "
                "send one op per object"
            )
        first_index[op.key] = index


def _check_expected(op: WriteOp, current: StoredObject) -> None:
    expected = op.expected_version
    if expected is not None and expected != current.resource_version:
        raise Conflict(
            f"{op.key}: resourceVersion {expected} is stale (current {current.resource_version})"
        )


def _require_current(op: WriteOp, current: StoredObject | None) -> StoredObject:
    if current is None:
        expected = "" if op.expected_version is None else (
            f" (expected resourceVersion {op.expected_version})"
        )
        raise NotFound(f"{op.key} not found{expected}")
    _check_expected(op, current)
    return current


def _created(op: WriteOp, revision: int, ctx: _Context) -> PlannedChange:
    content = _Content.of(op)
    new = StoredObject(
        key=op.key,
        api_version=content.api_version,
        labels=content.labels,
        document=content.document,
        spec_digest=content.digest,
        uid=ctx.new_uid(),
        resource_version=revision,
        generation=1,
        created_at=ctx.now,
        updated_at=ctx.now,
    )
    result = WriteResult(op.key, Outcome.CREATED, new, None)
    return PlannedChange(result, None, revision, content.document_json)


def _updated(op: WriteOp, current: StoredObject, revision: int, ctx: _Context) -> PlannedChange:
    content = _Content.of(op)
    if content.same_as(current):
        unchanged = WriteResult(op.key, Outcome.UNCHANGED, current, current.resource_version)
        return PlannedChange(unchanged, current, None)
    document_changed = content.digest != current.spec_digest
    new = StoredObject(
        key=op.key,
        api_version=content.api_version,
        labels=content.labels,
        document=content.document,
        spec_digest=content.digest,
        uid=current.uid,
        resource_version=revision,
        generation=current.generation + (1 if document_changed else 0),
        created_at=current.created_at,
        updated_at=ctx.now,
    )
    result = WriteResult(op.key, Outcome.UPDATED, new, current.resource_version)
    return PlannedChange(result, current, revision, content.document_json)


def _deleted(op: WriteOp, current: StoredObject, revision: int) -> PlannedChange:
    result = WriteResult(op.key, Outcome.DELETED, None, current.resource_version)
    return PlannedChange(result, current, revision)


def _plan_op(
    op: WriteOp, current: StoredObject | None, revision: int, ctx: _Context
) -> PlannedChange:
    if op.action is WriteAction.CREATE:
        if current is not None:
            raise Conflict(f"{op.key} already exists (resourceVersion {current.resource_version})")
        return _created(op, revision, ctx)
    if op.action is WriteAction.APPLY and current is None and op.expected_version is None:
        return _created(op, revision, ctx)
    existing = _require_current(op, current)
    if op.action is WriteAction.DELETE:
        return _deleted(op, existing, revision)
    # UPDATE, and APPLY of an existing key: an identical document is UNCHANGED either way.
    return _updated(op, existing, revision, ctx)


def plan_write(
    ops: Sequence[WriteOp],
    current: Mapping[ObjectKey, StoredObject | None],
    *,
    revision: int,
    now: str,
    new_uid: Callable[[], str],
) -> list[PlannedChange]:
    """Plan ops against current (every op's key must be present, None when absent).

    revision is the store revision before the write; each changed object takes the next one,
    in op order. Raises NotFound or Conflict on the first op that cannot be done.
    """
    require_distinct_keys(ops)
    ctx = _Context(now, new_uid)
    planned = []
    for op in ops:
        change = _plan_op(op, current[op.key], revision + 1, ctx)
        if change.changed:
            revision += 1
        planned.append(change)
    return planned
