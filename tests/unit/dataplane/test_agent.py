"""The agent's pure decisions: when to renew, whether a root change needs a new leaf, which root
a chain ends at, what is served and reported, and the work directory's safety checks."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.unit.dataplane.certs import ThrowawayCA
from verity.dataplane.agent import (
    HeldCertificate,
    InvalidIssuance,
    RenewalPolicy,
    backoff_delay,
    build_report,
    chain_root_fingerprint,
    expects_listeners,
    fingerprint,
    held_certificate,
    normalize_fingerprint,
    prepare_work_dir,
    renewal_delay,
    renewal_time,
    root_change_needs_renewal,
    served_chain,
    spiffe_id_of,
)
from verity.dataplane.cpclient import SignedCertificate
from verity.dataplane.keys import WorkloadKey
from verity.pki import IssuedSvid, SpiffeId, generate_builtin_ca, issue_svid
from verity.resources import Dataplane, load_documents

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
IDENTITY = SpiffeId.build("cluster.local", "shop", "web")
PEM = serialization.Encoding.PEM


def issued_for(key: WorkloadKey, validity: timedelta = timedelta(hours=24)) -> IssuedSvid:
    ca = generate_builtin_ca("default", "cluster.local", T0 - timedelta(days=1))
    return issue_svid(ca, key.build_csr(str(IDENTITY)), IDENTITY, T0, validity)


def signed(
    issued: IssuedSvid, bundle_pem: bytes = b"", chain_pem: bytes = b""
) -> SignedCertificate:
    return SignedCertificate(
        spiffe_id=str(issued.spiffe_id),
        certificate_pem=issued.cert_pem,
        chain_pem=chain_pem,
        trust_bundle_pem=bundle_pem,
        not_before=issued.not_before,
        not_after=issued.not_after,
        serial_hex=f"{issued.serial:x}",
    )


# ---------------------------------------------------------------------------------------------
# Renewal timing


def test_renews_when_a_third_of_the_lifetime_remains() -> None:
    policy = RenewalPolicy(remaining_fraction=1 / 3, jitter_fraction=0.15)
    when = renewal_time(
        received_at=T0,
        not_before=T0,
        not_after=T0 + timedelta(hours=24),
        policy=policy,
        jitter=0.0,
    )
    assert when == T0 + timedelta(hours=16)


def test_jitter_only_renews_earlier_and_within_its_share() -> None:
    policy = RenewalPolicy()  # 1/3 remaining, up to 15% of the 16 h earlier
    times = [
        renewal_time(
            received_at=T0,
            not_before=T0,
            not_after=T0 + timedelta(hours=24),
            policy=policy,
            jitter=j,
        )
        for j in (0.0, 0.5, 0.999, 1.0, 7.0)
    ]
    assert times[0] == T0 + timedelta(hours=16)
    assert times[1] == T0 + timedelta(hours=16) - timedelta(hours=1.2)
    assert all(T0 + timedelta(hours=13.6) <= t <= T0 + timedelta(hours=16) for t in times)


def test_short_renewal_fractions_keep_a_valid_jitter() -> None:
    # Renewing when 99% is left (tests): still never before the certificate arrived.
    policy = RenewalPolicy(remaining_fraction=0.99)
    when = renewal_time(
        received_at=T0,
        not_before=T0,
        not_after=T0 + timedelta(seconds=100),
        policy=policy,
        jitter=1.0,
    )
    assert T0 + timedelta(seconds=0.85) <= when <= T0 + timedelta(seconds=1)


def test_backdated_not_before_does_not_eat_a_short_lifetime() -> None:
    # A CA backdates not_before by 5 minutes; a 30 s certificate must not renew at once.
    policy = RenewalPolicy(jitter_fraction=0.0)
    when = renewal_time(
        received_at=T0,
        not_before=T0 - timedelta(minutes=5),
        not_after=T0 + timedelta(seconds=30),
        policy=policy,
        jitter=0.0,
    )
    assert when == T0 + timedelta(seconds=20)


def test_a_certificate_received_late_renews_at_once() -> None:
    policy = RenewalPolicy()
    when = renewal_time(
        received_at=T0 + timedelta(hours=2),
        not_before=T0,
        not_after=T0 + timedelta(hours=1),
        policy=policy,
        jitter=0.3,
    )
    assert when == T0 + timedelta(hours=1)


def test_renewal_delay_counts_from_now_and_never_goes_negative() -> None:
    held = held_at(T0, T0 + timedelta(hours=3))
    policy = RenewalPolicy(jitter_fraction=0.0)
    assert renewal_delay(T0, held, policy, 0.0) == timedelta(hours=2).total_seconds()
    assert renewal_delay(T0 + timedelta(minutes=90), held, policy, 0.0) == 1800.0
    assert renewal_delay(T0 + timedelta(hours=5), held, policy, 0.0) == 0.0


@pytest.mark.parametrize(("remaining", "jitter"), [(0, 0), (1, 0), (-1, 0), (0.5, 1), (0.5, -0.1)])
def test_renewal_policy_refuses_nonsense(remaining: float, jitter: float) -> None:
    with pytest.raises(ValueError):
        RenewalPolicy(remaining_fraction=remaining, jitter_fraction=jitter)


def test_backoff_doubles_is_capped_and_never_overflows() -> None:
    delays = [backoff_delay(n, initial=0.5, maximum=30, jitter=0.0) for n in range(1, 10)]
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
    assert delays[-1] == 30.0
    assert backoff_delay(10**6, initial=0.5, maximum=30, jitter=0.99) == 30.0
    assert 1.0 <= backoff_delay(2, initial=0.5, maximum=30, jitter=0.99) <= 1.2


# ---------------------------------------------------------------------------------------------
# Root changes


def test_fingerprints_compare_in_any_common_form() -> None:
    assert normalize_fingerprint("SHA256:AB:cd:EF") == "abcdef"
    assert normalize_fingerprint(" abcdef ") == "abcdef"


def test_root_change_renews_once_per_signing_root() -> None:
    old, new = "aa" * 32, "bb" * 32
    assert not root_change_needs_renewal(old, old, None)
    assert not root_change_needs_renewal("", old, None)  # the control plane did not say
    assert not root_change_needs_renewal(old.upper(), old, None)
    assert root_change_needs_renewal(new, old, None)
    assert root_change_needs_renewal(new, "", None)  # a leaf of no known root
    assert not root_change_needs_renewal(new, old, new)  # already renewed for it
    assert root_change_needs_renewal("cc" * 32, old, new)


# ---------------------------------------------------------------------------------------------
# Chains and roots


def _ca_cert(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey]
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0])
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(T0 - timedelta(days=1))
        .not_valid_after(T0 + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(issuer[1], hashes.SHA256())
    )


def test_chain_root_through_an_intermediate() -> None:
    root_key, mid_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "root")])
    root = _ca_cert("root", root_key, (root_name, root_key))
    intermediate = _ca_cert("intermediate", mid_key, (root.subject, root_key))
    other = ThrowawayCA("root")  # same name, another key: must not be taken for the root
    assert chain_root_fingerprint([intermediate], [other.cert, root]) == fingerprint(root)
    assert chain_root_fingerprint([intermediate], [other.cert]) == ""


def test_served_chain_drops_a_repeated_leaf_and_any_root() -> None:
    key = WorkloadKey.generate()
    issued = issued_for(key)
    root = ThrowawayCA().cert.public_bytes(PEM)
    chain = served_chain(issued.cert_pem, issued.cert_pem + root)
    assert [c.serial_number for c in chain] == [issued.serial]
    assert served_chain(issued.cert_pem, b"") == chain


def test_held_certificate_from_a_real_issuance() -> None:
    key = WorkloadKey.generate()
    ca = generate_builtin_ca("default", "cluster.local", T0 - timedelta(days=1))
    issued = issue_svid(ca, key.build_csr(str(IDENTITY)), IDENTITY, T0, timedelta(hours=1))
    held = held_certificate(
        signed(issued, ca.trust_bundle.pem), key, received_at=T0, roots=[ca.certificate]
    )
    assert held.spiffe_id == str(IDENTITY)
    assert held.serial_hex == f"{issued.serial:x}"
    assert (held.not_before, held.not_after) == (issued.not_before, issued.not_after)
    assert held.root_fingerprint == ca.root_fingerprint_sha256
    assert held.valid_at(T0) and not held.valid_at(issued.not_after)
    assert "PRIVATE" not in repr(held)  # the key stays inside the secret, unprinted


def test_held_certificate_refuses_a_leaf_for_another_key() -> None:
    issued = issued_for(WorkloadKey.generate())
    with pytest.raises(InvalidIssuance, match="does not match"):
        held_certificate(signed(issued), WorkloadKey.generate(), received_at=T0, roots=[])


def test_held_certificate_refuses_an_expired_leaf() -> None:
    key = WorkloadKey.generate()
    issued = issued_for(key, timedelta(minutes=1))
    with pytest.raises(InvalidIssuance, match="expired"):
        held_certificate(signed(issued), key, received_at=T0 + timedelta(hours=1), roots=[])


def test_held_certificate_refuses_garbage() -> None:
    key = WorkloadKey.generate()
    issued = issued_for(key)
    bad = SignedCertificate("x", b"not pem", b"", b"", T0, T0, "1")
    with pytest.raises(InvalidIssuance, match="cannot be served"):
        held_certificate(bad, key, received_at=T0, roots=[])
    with pytest.raises(InvalidIssuance):
        held_certificate(signed(issued, chain_pem=b"junk"), key, received_at=T0, roots=[])


def test_a_leaf_without_a_spiffe_id_is_refused() -> None:
    key = WorkloadKey.generate()
    loaded = serialization.load_pem_private_key(key.private_key_pem(), password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    svid = ThrowawayCA().issue("https://not-spiffe.example/x", loaded)
    leaf = x509.load_pem_x509_certificate(svid.certificate_pem)
    with pytest.raises(ValueError, match="spiffe"):
        spiffe_id_of(leaf)


# ---------------------------------------------------------------------------------------------
# Reports and listeners


def held_at(not_before: datetime, not_after: datetime) -> HeldCertificate:
    key = WorkloadKey.generate()
    issued = issued_for(key)
    held = held_certificate(signed(issued), key, received_at=T0, roots=[])
    return HeldCertificate(
        secret=held.secret,
        spiffe_id=held.spiffe_id,
        not_before=not_before,
        not_after=not_after,
        received_at=not_before,
        root_fingerprint="aa" * 32,
    )


def test_report_says_what_is_applied_and_served() -> None:
    held = held_at(T0, T0 + timedelta(hours=24))
    report = build_report("shop/web-1", ["aa" * 32, "bb" * 32], held)
    assert report.dataplane == "shop/web-1"
    assert report.applied_root_fingerprints == ("aa" * 32, "bb" * 32)
    assert report.leaf_root_fingerprint == "aa" * 32
    assert report.leaf_serial_hex == held.serial_hex
    assert report.leaf_not_after_unix == int((T0 + timedelta(hours=24)).timestamp())
    proto = report.to_proto()
    assert list(proto.applied_root_fingerprints) == ["aa" * 32, "bb" * 32]


def _dataplane(extra: str) -> Dataplane:
    (resource,) = load_documents(
        "apiVersion: verity.dev/v1alpha1\nkind: Dataplane\nmetadata: {name: w, namespace: ns}\n"
        f"spec:\n  service: web\n  address: 127.0.0.1\n{extra}"
    )
    assert isinstance(resource, Dataplane)
    return resource


def test_readiness_waits_for_listeners_only_when_there_are_ports() -> None:
    assert not expects_listeners(_dataplane(""))
    assert expects_listeners(_dataplane("  inbound: [{port: 8080}]\n"))
    assert expects_listeners(
        _dataplane("  outbound: [{service: db, port: 5432, localPort: 15432}]\n")
    )
    assert expects_listeners(_dataplane("  transparentProxy: {enabled: true}\n"))


# ---------------------------------------------------------------------------------------------
# Work directory


def test_default_work_dir_is_fresh_and_private() -> None:
    path, created = prepare_work_dir(None)
    try:
        assert created and stat.S_IMODE(path.stat().st_mode) == 0o700
    finally:
        path.rmdir()


def test_work_dir_is_created_private(tmp_path: Path) -> None:
    path, temporary = prepare_work_dir(tmp_path / "a" / "work")
    assert not temporary  # the caller chose it: kept at exit
    assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_work_dir_open_to_others_is_refused(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o755)  # noqa: S103 - the unsafe mode under test
    with pytest.raises(PermissionError, match="0700"):
        prepare_work_dir(open_dir)


def test_work_dir_too_long_for_a_socket_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too long"):
        prepare_work_dir(tmp_path / ("x" * 120))
