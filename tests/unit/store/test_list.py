"""list() filters: kind, namespace, labels, and their combinations."""

from __future__ import annotations

from verity.store import SqliteStore
from verity.store.base import ObjectKey, StoredObject, WriteAction, WriteOp

from .conftest import apply_op


async def _seed(store: SqliteStore) -> None:
    await store.write(
        [
            apply_op("a", "shop", labels={"app": "web", "tier": "front"}),
            apply_op("b", "shop", labels={"app": "api", "tier": "back"}),
            apply_op("c", "bank", labels={"app": "web", "tier": "back"}),
            apply_op("d", "bank"),
            WriteOp(WriteAction.APPLY, ObjectKey("Mesh", "", "default"), "v1", {"app": "web"}, {}),
            WriteOp(
                WriteAction.APPLY, ObjectKey("PeerAuthentication", "shop", "strict"), "v1",
                {"app": "web"}, {"spec": {"mtls": {"mode": "STRICT"}}},
            ),
        ],
        actor="seed",
    )


def _names(objects: list[StoredObject]) -> list[str]:
    return [str(o.key) for o in objects]


async def test_list_all_is_ordered_by_key(store: SqliteStore) -> None:
    await _seed(store)
    assert _names(await store.list()) == [
        "AuthorizationPolicy bank/c",
        "AuthorizationPolicy bank/d",
        "AuthorizationPolicy shop/a",
        "AuthorizationPolicy shop/b",
        "Mesh default",
        "PeerAuthentication shop/strict",
    ]


async def test_list_by_kind_and_namespace(store: SqliteStore) -> None:
    await _seed(store)
    assert _names(await store.list(kind="Mesh")) == ["Mesh default"]
    assert _names(await store.list(namespace="shop")) == [
        "AuthorizationPolicy shop/a",
        "AuthorizationPolicy shop/b",
        "PeerAuthentication shop/strict",
    ]
    assert _names(await store.list(kind="AuthorizationPolicy", namespace="bank")) == [
        "AuthorizationPolicy bank/c",
        "AuthorizationPolicy bank/d",
    ]
    assert _names(await store.list(namespace="")) == ["Mesh default"]
    assert await store.list(kind="Nope") == []


async def test_list_by_labels_requires_every_pair(store: SqliteStore) -> None:
    await _seed(store)
    assert _names(await store.list(labels={"app": "web"})) == [
        "AuthorizationPolicy bank/c",
        "AuthorizationPolicy shop/a",
        "Mesh default",
        "PeerAuthentication shop/strict",
    ]
    assert _names(await store.list(labels={"app": "web", "tier": "back"})) == [
        "AuthorizationPolicy bank/c"
    ]
    assert _names(
        await store.list(kind="AuthorizationPolicy", namespace="shop", labels={"app": "web"})
    ) == ["AuthorizationPolicy shop/a"]
    assert await store.list(labels={"app": "web", "tier": "nope"}) == []
    assert _names(await store.list(labels={})) == _names(await store.list())


async def test_label_index_follows_updates_and_deletes(store: SqliteStore) -> None:
    await _seed(store)
    await store.write(
        [apply_op("a", "shop", labels={"app": "api"}), apply_op("c", "bank", labels={})],
        actor="x",
    )
    assert _names(await store.list(kind="AuthorizationPolicy", labels={"app": "api"})) == [
        "AuthorizationPolicy shop/a",
        "AuthorizationPolicy shop/b",
    ]
    assert _names(await store.list(kind="AuthorizationPolicy", labels={"app": "web"})) == []
