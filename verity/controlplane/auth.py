"""Bearer tokens for the REST API: minting, hashing, and scope checks.

Secrets are random 256-bit values shown once at creation; the store keeps only their
SHA-256 (a fast hash is right here: the secrets are high-entropy, not passwords).
A user token is scoped to namespaces, kinds and verbs (an app team writes policy for its own
namespace and nothing else); the admin token may do everything, including managing tokens
and reading the audit trail.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from verity.store.base import TokenRecord

USER_PREFIX = "vrtu_"
ADMIN_NAME = "admin"
VERBS = ("get", "apply", "delete")
ANY = "*"


class Unauthenticated(Exception):
    """No token, an unknown one, or one that expired or was revoked (HTTP 401)."""


class PermissionDenied(Exception):
    """A valid token outside its scope (HTTP 403); the message names the missing permission."""


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    name: str
    admin: bool
    namespaces: tuple[str, ...]
    kinds: tuple[str, ...]
    verbs: tuple[str, ...]

    def describe_scope(self) -> str:
        return (
            f"namespaces [{', '.join(self.namespaces)}], kinds [{', '.join(self.kinds)}], "
            f"verbs [{', '.join(self.verbs)}]"
        )


def user_scope(
    namespaces: Sequence[str], kinds: Sequence[str], verbs: Sequence[str], admin: bool = False
) -> dict[str, Any]:
    unknown = sorted(set(verbs) - set(VERBS))
    if unknown:
        raise ValueError(f"verbs: unknown verb {unknown[0]!r} (known: {', '.join(VERBS)})")
    if not namespaces:
        raise ValueError("namespaces: a user token needs at least one namespace (or '*')")
    return {
        "admin": admin,
        "namespaces": sorted(set(namespaces)),
        "kinds": sorted(set(kinds)) or [ANY],
        "verbs": sorted(set(verbs)) or list(VERBS),
    }


def require_live(record: TokenRecord, kind: str, now: datetime, wrong_kind: str) -> None:
    """Refuse a revoked or expired token, or one of another kind (`wrong_kind` says why)."""
    if record.revoked_at is not None:
        raise Unauthenticated("token has been revoked")
    if record.expires_at is not None and datetime.fromisoformat(record.expires_at) <= now:
        raise Unauthenticated("token has expired")
    if record.kind != kind:
        raise Unauthenticated(wrong_kind)


def caller_from_record(record: TokenRecord, now: datetime) -> Caller:
    require_live(record, "user", now, "this token is not valid for the API")
    scope: Mapping[str, Any] = record.scope
    return Caller(
        name=record.name,
        admin=bool(scope.get("admin", False)),
        namespaces=tuple(scope.get("namespaces", ())),
        kinds=tuple(scope.get("kinds", ())),
        verbs=tuple(scope.get("verbs", ())),
    )


def _allows(granted: Iterable[str], wanted: str) -> bool:
    return any(g == ANY or g == wanted for g in granted)


def authorize(caller: Caller, verb: str, kind: str, namespace: str | None) -> None:
    """Raise PermissionDenied unless caller may do verb on kind in namespace.

    namespace "" is a cluster-scoped object and None means "all namespaces": both need a
    token whose namespaces include "*".
    """
    if caller.admin:
        return
    where = (
        "all namespaces"
        if namespace is None
        else ("cluster scope" if namespace == "" else f"namespace {namespace!r}")
    )
    ns_ok = _allows(caller.namespaces, namespace) if namespace else ANY in caller.namespaces
    if not (ns_ok and _allows(caller.verbs, verb) and _allows(caller.kinds, kind)):
        raise PermissionDenied(
            f"token {caller.name!r} may not {verb} {kind} in {where} "
            f"(it has {caller.describe_scope()})"
        )


def require_admin(caller: Caller, what: str) -> None:
    if not caller.admin:
        raise PermissionDenied(f"token {caller.name!r} may not {what} (admin only)")


def expiry(now: datetime, valid_for: timedelta | None) -> str | None:
    return None if valid_for is None else (now + valid_for).isoformat()
