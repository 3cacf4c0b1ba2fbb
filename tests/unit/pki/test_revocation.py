from __future__ import annotations

from datetime import timedelta

import pytest

from tests.unit.pki.helpers import NOW, TRUST_DOMAIN
from verity.pki import (
    IdentityRevoked,
    RevocationList,
    SpiffeId,
    ensure_not_revoked,
    identity_revoked_at,
    is_identity_revoked,
    is_serial_revoked,
    reinstate_identity,
    revoke_identity,
    revoke_serial,
)

WEB = SpiffeId(TRUST_DOMAIN, "default", "web")
API = SpiffeId(TRUST_DOMAIN, "default", "api")


def test_revoke_and_reinstate_identity_are_pure() -> None:
    empty = RevocationList()
    revoked = revoke_identity(empty, WEB, NOW)
    assert not is_identity_revoked(empty, WEB)  # the original is untouched
    assert is_identity_revoked(revoked, WEB) and not is_identity_revoked(revoked, API)
    assert identity_revoked_at(revoked, WEB) == NOW
    again = revoke_identity(revoked, WEB, NOW + timedelta(hours=1))
    assert identity_revoked_at(again, WEB) == NOW  # the first revocation time is kept
    assert reinstate_identity(revoked, WEB) == empty


def test_ensure_not_revoked_names_identity_and_time() -> None:
    revoked = revoke_identity(RevocationList(), WEB, NOW)
    ensure_not_revoked(revoked, API)
    with pytest.raises(IdentityRevoked) as caught:
        ensure_not_revoked(revoked, WEB)
    assert str(caught.value) == f"identity {WEB} was revoked at {NOW.isoformat()}"


def test_serials() -> None:
    revoked = revoke_serial(RevocationList(), 12345, NOW)
    assert is_serial_revoked(revoked, 12345) and not is_serial_revoked(revoked, 1)
    with pytest.raises(ValueError, match="positive"):
        revoke_serial(revoked, 0, NOW)


def test_list_cannot_be_mutated_through_the_callers_dict() -> None:
    identities = {str(WEB): NOW}
    revocations = RevocationList(identities)
    identities.clear()
    assert is_identity_revoked(revocations, WEB)
    with pytest.raises(TypeError):
        revocations.identities[str(API)] = NOW  # type: ignore[index]
