from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from verity.controlplane import auth
from verity.store.base import TokenRecord

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def record(scope: dict[str, object], **overrides: object) -> TokenRecord:
    fields: dict[str, object] = {
        "name": "alice",
        "kind": "user",
        "secret_hash": "x",
        "scope": scope,
        "created_at": NOW.isoformat(),
        "expires_at": None,
    }
    fields.update(overrides)
    return TokenRecord(**fields)  # type: ignore[arg-type]


def caller(namespaces: list[str], kinds: list[str], verbs: list[str]) -> auth.Caller:
    return auth.caller_from_record(record(auth.user_scope(namespaces, kinds, verbs)), NOW)


def test_namespace_scope() -> None:
    alice = caller(["shop"], [], ["get", "apply"])
    auth.authorize(alice, "apply", "AuthorizationPolicy", "shop")
    with pytest.raises(
        auth.PermissionDenied, match="apply AuthorizationPolicy in namespace 'payments'"
    ):
        auth.authorize(alice, "apply", "AuthorizationPolicy", "payments")
    with pytest.raises(auth.PermissionDenied, match="delete"):
        auth.authorize(alice, "delete", "AuthorizationPolicy", "shop")


def test_cluster_scope_and_all_namespaces_need_star() -> None:
    alice = caller(["shop"], [], [])
    with pytest.raises(auth.PermissionDenied, match="cluster scope"):
        auth.authorize(alice, "apply", "Mesh", "")
    with pytest.raises(auth.PermissionDenied, match="all namespaces"):
        auth.authorize(alice, "get", "AuthorizationPolicy", None)
    ops = caller(["*"], [], ["get"])
    auth.authorize(ops, "get", "Mesh", "")
    auth.authorize(ops, "get", "Dataplane", None)


def test_kind_scope() -> None:
    policy_only = caller(["shop"], ["AuthorizationPolicy"], [])
    auth.authorize(policy_only, "apply", "AuthorizationPolicy", "shop")
    with pytest.raises(auth.PermissionDenied, match="Dataplane"):
        auth.authorize(policy_only, "apply", "Dataplane", "shop")


def test_expired_revoked_and_dataplane_tokens_are_unauthenticated() -> None:
    scope = auth.user_scope(["shop"], [], [])
    with pytest.raises(auth.Unauthenticated, match="expired"):
        auth.caller_from_record(record(scope, expires_at=(NOW - timedelta(1)).isoformat()), NOW)
    with pytest.raises(auth.Unauthenticated, match="revoked"):
        auth.caller_from_record(record(scope, revoked_at=NOW.isoformat()), NOW)
    with pytest.raises(auth.Unauthenticated, match="not valid for the API"):
        auth.caller_from_record(record(scope, kind="dataplane"), NOW)


def test_unknown_verb_refused() -> None:
    with pytest.raises(ValueError, match="unknown verb 'patch'"):
        auth.user_scope(["shop"], [], ["patch"])


def test_secrets_are_random_and_hashed() -> None:
    a, b = auth.new_secret(auth.USER_PREFIX), auth.new_secret(auth.USER_PREFIX)
    assert a != b and len(a) > 40
    assert auth.hash_secret(a) != a and len(auth.hash_secret(a)) == 64
