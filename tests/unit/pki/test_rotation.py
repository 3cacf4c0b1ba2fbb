"""Root rotation: the full cycle, the bundle and signer at each stage, and refusals."""

from __future__ import annotations

import pytest

from tests.unit.pki.helpers import (
    NOW,
    TRUST_DOMAIN,
    crypto_verify,
    ec_key,
    make_csr,
    openssl_verify,
)
from verity.pki import (
    CertificateAuthority,
    RotationError,
    RotationStage,
    RotationState,
    SpiffeId,
    abort_rotation,
    add_new_root,
    advance,
    finish_rotation,
    generate_builtin_ca,
    issue_svid,
    remove_old_root,
    stable,
    start_reissuing,
)

WEB = SpiffeId(TRUST_DOMAIN, "default", "web")


@pytest.fixture(scope="module")
def old() -> CertificateAuthority:
    return generate_builtin_ca("default", TRUST_DOMAIN, NOW)


@pytest.fixture(scope="module")
def new() -> CertificateAuthority:
    return generate_builtin_ca("default", TRUST_DOMAIN, NOW)


def _leaf(ca: CertificateAuthority) -> bytes:
    return issue_svid(ca, make_csr(ec_key()), WEB, NOW).cert_pem


def _verifies(state: RotationState, leaf_pem: bytes) -> bool:
    """Both verifiers must agree; return whether they accept."""
    by_openssl = openssl_verify(state.bundle.pem, leaf_pem, purpose="sslclient").returncode == 0
    try:
        crypto_verify(state.bundle.certificates, leaf_pem)
        by_cryptography = True
    except Exception:  # VerificationError
        by_cryptography = False
    assert by_openssl == by_cryptography
    return by_openssl


def test_full_cycle(old: CertificateAuthority, new: CertificateAuthority) -> None:
    old_leaf, new_leaf = _leaf(old), _leaf(new)

    state = stable(old)
    assert state.signing_ca is old and state.bundle.certificates == (old.root,)
    assert _verifies(state, old_leaf) and not _verifies(state, new_leaf)

    state = add_new_root(state, new)
    assert state.stage is RotationStage.NEW_ROOT_ADDED
    assert state.signing_ca is old
    assert state.bundle.certificates == (old.root, new.root)
    assert _verifies(state, old_leaf) and _verifies(state, new_leaf)

    state = start_reissuing(state, previous_stage_reached_all_proxies=True)
    assert state.stage is RotationStage.REISSUING
    assert state.signing_ca is new
    assert state.bundle.certificates == (old.root, new.root)
    reissued = issue_svid(state.signing_ca, make_csr(ec_key()), WEB, NOW).cert_pem
    assert _verifies(state, reissued) and _verifies(state, old_leaf)

    state = remove_old_root(state, previous_stage_reached_all_proxies=True)
    assert state.stage is RotationStage.OLD_ROOT_REMOVED
    assert state.signing_ca is new
    assert state.bundle.certificates == (new.root,)
    assert _verifies(state, reissued)
    assert not _verifies(state, old_leaf)

    state = finish_rotation(state, previous_stage_reached_all_proxies=True)
    assert state == stable(new)


def test_advance_walks_the_same_cycle(old: CertificateAuthority, new: CertificateAuthority) -> None:
    state = stable(old)
    stages = []
    for _ in range(4):
        state = advance(state, previous_stage_reached_all_proxies=True, new_ca=new)
        stages.append(state.stage)
    assert stages == [
        RotationStage.NEW_ROOT_ADDED,
        RotationStage.REISSUING,
        RotationStage.OLD_ROOT_REMOVED,
        RotationStage.STABLE,
    ]
    assert state.signing_ca is new
    with pytest.raises(RotationError, match="no new CA given"):
        advance(state, previous_stage_reached_all_proxies=True)


def test_out_of_order_steps_refused(old: CertificateAuthority, new: CertificateAuthority) -> None:
    steady = stable(old)
    with pytest.raises(
        RotationError, match="cannot start reissuing: stage is STABLE, expected NEW_ROOT_ADDED"
    ):
        start_reissuing(steady, previous_stage_reached_all_proxies=True)
    with pytest.raises(RotationError, match="cannot remove the old root: stage is STABLE"):
        remove_old_root(steady, previous_stage_reached_all_proxies=True)
    with pytest.raises(RotationError, match="cannot finish the rotation: stage is STABLE"):
        finish_rotation(steady, previous_stage_reached_all_proxies=True)
    added = add_new_root(steady, new)
    with pytest.raises(RotationError, match="cannot add a new root: stage is NEW_ROOT_ADDED"):
        add_new_root(added, new)
    with pytest.raises(RotationError, match="stage is NEW_ROOT_ADDED, expected REISSUING"):
        remove_old_root(added, previous_stage_reached_all_proxies=True)
    reissuing = start_reissuing(added, previous_stage_reached_all_proxies=True)
    with pytest.raises(RotationError, match="cannot abort the rotation: stage is REISSUING"):
        abort_rotation(reissuing)


def test_steps_wait_until_the_previous_stage_reached_every_proxy(
    old: CertificateAuthority, new: CertificateAuthority
) -> None:
    added = add_new_root(stable(old), new)
    with pytest.raises(RotationError, match="the two-root bundle has not reached every proxy"):
        start_reissuing(added, previous_stage_reached_all_proxies=False)
    reissuing = start_reissuing(added, previous_stage_reached_all_proxies=True)
    with pytest.raises(RotationError, match="a reissued leaf has not reached every proxy"):
        remove_old_root(reissuing, previous_stage_reached_all_proxies=False)
    removed = remove_old_root(reissuing, previous_stage_reached_all_proxies=True)
    with pytest.raises(RotationError, match="the new-root bundle has not reached every proxy"):
        finish_rotation(removed, previous_stage_reached_all_proxies=False)


def test_abort_before_reissuing_returns_to_the_old_root(
    old: CertificateAuthority, new: CertificateAuthority
) -> None:
    assert abort_rotation(add_new_root(stable(old), new)) == stable(old)


def test_new_root_must_be_new_and_of_the_same_mesh(old: CertificateAuthority) -> None:
    with pytest.raises(RotationError, match="the root already in use"):
        add_new_root(stable(old), old)
    other = generate_builtin_ca("other", "other.mesh", NOW)
    with pytest.raises(RotationError, match="for mesh 'other'"):
        add_new_root(stable(old), other)


def test_state_invariant(old: CertificateAuthority, new: CertificateAuthority) -> None:
    with pytest.raises(RotationError):
        RotationState(RotationStage.REISSUING, old)
    with pytest.raises(RotationError):
        RotationState(RotationStage.STABLE, old, new)
