"""Revoked identities and serials.

SVIDs live a day, so revocation in Verity means "issue no more": the CA refuses a revoked
identity (IdentityRevoked) and the control plane stops serving it. Revoked serials are kept
for audit and for proxies that want to refuse a still-valid leaf. The list is an immutable
value; every change returns a new list.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

from verity.pki._time import as_utc
from verity.pki.errors import IdentityRevoked
from verity.pki.spiffe_id import SpiffeId


@dataclass(frozen=True)
class RevocationList:
    """SPIFFE IDs (as strings) and certificate serials, each with when it was revoked."""

    identities: Mapping[str, datetime] = field(default_factory=dict)
    serials: Mapping[int, datetime] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Copy into read-only views so a caller's dict cannot change the list afterwards.
        object.__setattr__(self, "identities", MappingProxyType(dict(self.identities)))
        object.__setattr__(self, "serials", MappingProxyType(dict(self.serials)))


def revoke_identity(
    revocations: RevocationList, identity: SpiffeId, at: datetime
) -> RevocationList:
    """Revoke; revoking again keeps the first timestamp (the audit trail wants the earliest)."""
    identities = dict(revocations.identities)
    identities.setdefault(str(identity), as_utc(at, "at"))
    return RevocationList(identities, revocations.serials)


def reinstate_identity(revocations: RevocationList, identity: SpiffeId) -> RevocationList:
    identities = {k: v for k, v in revocations.identities.items() if k != str(identity)}
    return RevocationList(identities, revocations.serials)


def revoke_serial(revocations: RevocationList, serial: int, at: datetime) -> RevocationList:
    if serial <= 0:
        raise ValueError("certificate serials are positive")
    serials = dict(revocations.serials)
    serials.setdefault(serial, as_utc(at, "at"))
    return RevocationList(revocations.identities, serials)


def identity_revoked_at(revocations: RevocationList, identity: SpiffeId) -> datetime | None:
    return revocations.identities.get(str(identity))


def is_identity_revoked(revocations: RevocationList, identity: SpiffeId) -> bool:
    return str(identity) in revocations.identities


def is_serial_revoked(revocations: RevocationList, serial: int) -> bool:
    return serial in revocations.serials


def ensure_not_revoked(revocations: RevocationList, identity: SpiffeId) -> None:
    """Raise IdentityRevoked, naming the identity and when, if it is on the list."""
    revoked_at = identity_revoked_at(revocations, identity)
    if revoked_at is not None:
        raise IdentityRevoked(f"identity {identity} was revoked at {revoked_at.isoformat()}")
