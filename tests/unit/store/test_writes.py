"""create / update / apply / delete, versions, conflicts, all-or-nothing, dry run."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from verity.store import SqliteStore
from verity.store.base import (
    Conflict,
    NotFound,
    ObjectKey,
    Outcome,
    StoreError,
    WriteAction,
    WriteOp,
)
from verity.store.canonical import digest

from .conftest import apply_op, delete_op, events_until, policy_key

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


async def test_create_sets_store_owned_metadata(store: SqliteStore) -> None:
    op = apply_op("allow-web", action=WriteAction.CREATE, labels={"team": "a"})
    [result] = await store.write([op], actor="alice")

    assert result.outcome is Outcome.CREATED and result.old_version is None
    obj = result.object
    assert obj is not None
    assert obj.resource_version == 1 and obj.generation == 1
    assert uuid.UUID(obj.uid).version == 4
    assert RFC3339_UTC.match(obj.created_at) and obj.updated_at == obj.created_at
    assert obj.spec_digest == digest(op.document)
    assert dict(obj.labels) == {"team": "a"} and obj.document == op.document
    assert await store.get(op.key) == obj
    assert await store.revision() == 1


async def test_create_of_existing_key_conflicts(store: SqliteStore) -> None:
    await store.write([apply_op("p")], actor="alice")
    with pytest.raises(Conflict, match=r"AuthorizationPolicy default/p already exists"):
        await store.write([apply_op("p", action=WriteAction.CREATE)], actor="alice")


async def test_update_bumps_version_and_generation(store: SqliteStore) -> None:
    [created] = await store.write([apply_op("p")], actor="alice")
    await store.write([apply_op("other")], actor="alice")  # the revision is store-wide
    [updated] = await store.write([apply_op("p", action=WriteAction.UPDATE, app="api")], "bob")

    assert updated.outcome is Outcome.UPDATED and updated.old_version == 1
    assert updated.object is not None and created.object is not None
    assert updated.object.resource_version == 3
    assert updated.object.generation == 2
    assert updated.object.uid == created.object.uid
    assert updated.object.created_at == created.object.created_at
    assert updated.object.updated_at >= created.object.updated_at


async def test_label_change_is_a_new_version_of_the_same_generation(store: SqliteStore) -> None:
    await store.write([apply_op("p")], actor="alice")
    op = apply_op("p")
    relabelled = WriteOp(op.action, op.key, op.api_version, {"tier": "gold"}, op.document)
    [result] = await store.write([relabelled], actor="alice")
    assert result.outcome is Outcome.UPDATED and result.object is not None
    assert result.object.resource_version == 2 and result.object.generation == 1
    assert await store.list(labels={"tier": "gold"}) == [result.object]


async def test_update_of_missing_key_is_not_found(store: SqliteStore) -> None:
    with pytest.raises(NotFound, match="AuthorizationPolicy default/nope not found"):
        await store.write([apply_op("nope", action=WriteAction.UPDATE)], actor="alice")


async def test_stale_version_conflicts_and_changes_nothing(store: SqliteStore) -> None:
    await store.write([apply_op("p")], actor="alice")
    await store.write([apply_op("p", app="v2")], actor="alice")
    before = await store.get(policy_key("p"))
    audit_before = await store.audit_log()

    for op in (
        apply_op("p", app="v3", expected_version=1),
        apply_op("p", app="v3", action=WriteAction.UPDATE, expected_version=1),
        delete_op("p", expected=1),
    ):
        with pytest.raises(Conflict, match=r"^AuthorizationPolicy default/p: resourceVersion "
                           r"1 is stale \(current 2\)$"):
            await store.write([op], actor="mallory")

    assert await store.get(policy_key("p")) == before
    assert await store.audit_log() == audit_before
    assert await store.revision() == 2


async def test_stale_version_message_of_a_cluster_scoped_kind(store: SqliteStore) -> None:
    mesh = ObjectKey("Mesh", "", "default")
    await store.write([WriteOp(WriteAction.APPLY, mesh, "verity/v1", {}, {"spec": {}})], "a")
    stale = WriteOp(WriteAction.APPLY, mesh, "verity/v1", {}, {"spec": {"x": 1}}, 7)
    with pytest.raises(Conflict, match=r"^Mesh default: resourceVersion 7 is stale \(current 1\)$"):
        await store.write([stale], actor="a")


async def test_matching_expected_version_is_accepted(store: SqliteStore) -> None:
    await store.write([apply_op("p")], actor="alice")
    [result] = await store.write([apply_op("p", app="v2", expected_version=1)], actor="alice")
    assert result.outcome is Outcome.UPDATED


async def test_apply_with_expected_version_of_missing_key_is_not_found(
    store: SqliteStore,
) -> None:
    with pytest.raises(NotFound, match=r"not found \(expected resourceVersion 3\)"):
        await store.write([apply_op("p", expected_version=3)], actor="alice")


async def test_apply_of_identical_document_is_unchanged(store: SqliteStore) -> None:
    [first] = await store.write([apply_op("p", labels={"a": "1"})], actor="alice")
    events_before = await store.revision()
    [again] = await store.write([apply_op("p", labels={"a": "1"})], actor="bob")

    assert again.outcome is Outcome.UNCHANGED
    assert again.object == first.object and again.old_version == 1
    assert await store.revision() == events_before
    assert [e.actor for e in await store.audit_log()] == ["alice"]


async def test_key_order_does_not_make_a_document_different(store: SqliteStore) -> None:
    doc = {"spec": {"b": 1, "a": [1, 2]}, "kind": "Mesh"}
    reordered = {"kind": "Mesh", "spec": {"a": [1, 2], "b": 1}}
    key = ObjectKey("Mesh", "", "m")
    await store.write([WriteOp(WriteAction.APPLY, key, "v1", {}, doc)], "a")
    [result] = await store.write([WriteOp(WriteAction.APPLY, key, "v1", {}, reordered)], "a")
    assert result.outcome is Outcome.UNCHANGED


async def test_delete_returns_old_version_and_removes(store: SqliteStore) -> None:
    await store.write([apply_op("p", labels={"a": "1"})], actor="alice")
    [result] = await store.write([delete_op("p")], actor="alice")
    assert result.outcome is Outcome.DELETED and result.object is None
    assert result.old_version == 1
    assert await store.get(policy_key("p")) is None
    assert await store.list(labels={"a": "1"}) == []
    assert await store.revision() == 2
    with pytest.raises(NotFound):
        await store.write([delete_op("p")], actor="alice")


async def test_recreate_after_delete_gets_a_new_uid(store: SqliteStore) -> None:
    [first] = await store.write([apply_op("p")], actor="alice")
    await store.write([delete_op("p")], actor="alice")
    [second] = await store.write([apply_op("p")], actor="alice")
    assert first.object is not None and second.object is not None
    assert second.object.uid != first.object.uid and second.object.generation == 1


async def test_multi_op_write_is_one_transaction(store: SqliteStore) -> None:
    results = await store.write([apply_op("a"), apply_op("b"), apply_op("c")], actor="alice")
    assert [r.object.resource_version for r in results if r.object] == [1, 2, 3]
    assert len({r.object.updated_at for r in results if r.object}) == 1


async def test_failing_op_in_the_middle_changes_nothing(store: SqliteStore) -> None:
    await store.write([apply_op("existing")], actor="alice")
    snapshot = (await store.list(), await store.audit_log(), await store.revision())

    ops = [apply_op("new-1"), apply_op("existing", action=WriteAction.CREATE), apply_op("new-2")]
    with pytest.raises(Conflict, match="existing already exists"):
        await store.write(ops, actor="alice")
    ops = [apply_op("new-1"), delete_op("missing"), apply_op("existing", app="changed")]
    with pytest.raises(NotFound, match="missing not found"):
        await store.write(ops, actor="alice")

    assert (await store.list(), await store.audit_log(), await store.revision()) == snapshot
    assert [e.revision for e in await events_until(store, 0, 1)] == [1]


async def test_two_ops_on_one_key_are_refused(store: SqliteStore) -> None:
    with pytest.raises(Conflict, match=r"default/p appears twice in one write \(ops 1 and 3\)"):
        await store.write([apply_op("p"), apply_op("q"), delete_op("p")], actor="alice")
    assert await store.list() == []


async def test_dry_run_reports_results_and_changes_nothing(store: SqliteStore) -> None:
    await store.write([apply_op("a")], actor="alice")
    ops = [apply_op("a", app="v2"), apply_op("b"), apply_op("a2")]
    dry = await store.write(ops, actor="alice", dry_run=True)

    assert [r.outcome for r in dry] == [Outcome.UPDATED, Outcome.CREATED, Outcome.CREATED]
    assert [r.object.resource_version for r in dry if r.object] == [2, 3, 4]
    assert await store.revision() == 1
    assert len(await store.list()) == 1 and len(await store.audit_log()) == 1

    real = await store.write(ops, actor="alice")
    assert [(r.outcome, r.object.resource_version) for r in real if r.object] == [
        (r.outcome, r.object.resource_version) for r in dry if r.object
    ]


async def test_dry_run_still_raises(store: SqliteStore) -> None:
    with pytest.raises(NotFound):
        await store.write([delete_op("x")], actor="alice", dry_run=True)


async def test_stored_document_is_a_copy(store: SqliteStore) -> None:
    op = apply_op("p")
    [result] = await store.write([op], actor="alice")
    op.document["spec"]["action"] = "DENY"
    assert result.object is not None
    assert result.object.document["spec"]["action"] == "ALLOW"


async def test_empty_write_does_nothing(store: SqliteStore) -> None:
    assert await store.write([], actor="alice") == []
    assert await store.revision() == 0


async def test_document_that_is_not_json_data_is_refused(store: SqliteStore) -> None:
    key = ObjectKey("Mesh", "", "m")
    for document in ({"spec": {"ratio": float("nan")}}, {"spec": {"when": object()}}):
        with pytest.raises(StoreError, match="Mesh m: the document is not plain JSON data"):
            await store.write([WriteOp(WriteAction.APPLY, key, "v1", {}, document)], "a")
    assert await store.revision() == 0


async def test_use_before_open_and_after_close_is_an_error(db_path: Path) -> None:
    store = SqliteStore(db_path)
    with pytest.raises(StoreError, match="is not open"):
        await store.get(policy_key("p"))
    await store.open()
    await store.write([apply_op("p")], actor="a")
    await store.close()
    with pytest.raises(StoreError, match="is not open"):
        await store.write([apply_op("q")], actor="a")
    await store.open()  # a closed store can be opened again
    assert [o.key.name for o in await store.list()] == ["p"]
    await store.close()
