"""Issued SVIDs: every MUST of the SPIFFE X.509-SVID spec, three independent verifiers,
and what the CA does with hostile or weak CSRs."""

from __future__ import annotations

import re
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from spiffe import X509Svid

from tests.unit.pki.helpers import (
    NOW,
    TRUST_DOMAIN,
    crypto_verify,
    ec_key,
    key_pem,
    make_csr,
    openssl_verify,
)
from verity.pki import (
    BACKDATE,
    CertificateAuthority,
    IdentityRevoked,
    InvalidCSR,
    IssuanceRefused,
    RevocationList,
    SpiffeId,
    _der,
    generate_builtin_ca,
    issue_svid,
    revoke_identity,
)
from verity.pki.svid import build_tbs_certificate

WEB = SpiffeId(TRUST_DOMAIN, "default", "web")


def _issue(
    ca: CertificateAuthority, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
) -> x509.Certificate:
    return issue_svid(ca, make_csr(key), WEB, NOW, timedelta(hours=24)).certificate


# --- the X.509-SVID MUSTs, field by field ----------------------------------------------


def test_leaf_has_exactly_one_uri_san_equal_to_the_callers_identity(
    ca: CertificateAuthority,
) -> None:
    leaf = _issue(ca, ec_key())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical  # subject is empty (RFC 5280 4.2.1.6)
    assert list(san.value) == [x509.UniformResourceIdentifier(str(WEB))]
    assert san.value.get_values_for_type(x509.DNSName) == []
    assert leaf.subject == x509.Name([])


def test_leaf_is_not_a_ca_and_has_only_leaf_key_usages(ca: CertificateAuthority) -> None:
    leaf = _issue(ca, ec_key())
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign
    assert not usage.value.crl_sign
    assert not usage.value.key_encipherment  # EC key
    assert not usage.value.key_agreement
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


def test_leaf_extension_set_is_exactly_the_fixed_one(ca: CertificateAuthority) -> None:
    leaf = _issue(ca, ec_key())
    assert [e.oid for e in leaf.extensions] == [
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    ]


def test_rsa_leaf_key_also_gets_key_encipherment(ca: CertificateAuthority) -> None:
    usage = _issue(ca, rsa.generate_private_key(65537, 2048)).extensions.get_extension_for_class(
        x509.KeyUsage
    )
    assert usage.value.digital_signature and usage.value.key_encipherment
    assert not usage.value.key_cert_sign


def test_serial_is_random_positive_and_at_least_64_bits(ca: CertificateAuthority) -> None:
    csr = make_csr(ec_key())
    serials = [issue_svid(ca, csr, WEB, NOW).serial for _ in range(200)]
    assert len(set(serials)) == 200
    assert all(64 <= s.bit_length() <= 159 for s in serials)
    assert max(s.bit_length() for s in serials) > 150


def test_validity_is_backdated_and_lasts_the_requested_time(ca: CertificateAuthority) -> None:
    issued = issue_svid(ca, make_csr(ec_key()), WEB, NOW, timedelta(hours=24))
    leaf = issued.certificate
    assert leaf.not_valid_before_utc == NOW - BACKDATE
    assert leaf.not_valid_after_utc == NOW + timedelta(hours=24)
    assert (issued.not_before, issued.not_after) == (
        leaf.not_valid_before_utc,
        leaf.not_valid_after_utc,
    )


def test_validity_never_exceeds_the_ca(ca: CertificateAuthority) -> None:
    short_ca = generate_builtin_ca("short", TRUST_DOMAIN, NOW, validity=timedelta(hours=2))
    issued = issue_svid(short_ca, make_csr(ec_key()), WEB, NOW, timedelta(hours=24))
    assert issued.not_after == short_ca.not_after
    assert issued.certificate.not_valid_after_utc <= short_ca.certificate.not_valid_after_utc


def test_key_identifiers_link_leaf_to_ca(ca: CertificateAuthority) -> None:
    key = ec_key()
    leaf = _issue(ca, key)
    ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    assert not ski.critical
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest


def test_leaf_is_signed_by_the_ca_for_the_csr_key(ca: CertificateAuthority) -> None:
    key = ec_key()
    leaf = _issue(ca, key)
    leaf.verify_directly_issued_by(ca.certificate)
    assert leaf.public_key() == key.public_key()
    assert leaf.issuer == ca.certificate.subject
    assert leaf.version is x509.Version.v3
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)


def test_issued_svid_reports_what_is_in_the_certificate(ca: CertificateAuthority) -> None:
    issued = issue_svid(ca, make_csr(ec_key()), WEB, NOW)
    assert issued.serial == issued.certificate.serial_number
    assert issued.spiffe_id == WEB
    assert issued.chain_pem == issued.cert_pem  # builtin root: nothing between leaf and root


# --- three independent verifiers -------------------------------------------------------


@pytest.mark.parametrize("purpose", [None, "sslclient", "sslserver"])
def test_openssl_verifies_the_leaf(ca: CertificateAuthority, purpose: str | None) -> None:
    issued = issue_svid(ca, make_csr(ec_key()), WEB, NOW)
    result = openssl_verify(ca.trust_bundle.pem, issued.cert_pem, purpose=purpose)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cryptography_client_verifier_accepts_and_returns_the_identity(
    ca: CertificateAuthority,
) -> None:
    issued = issue_svid(ca, make_csr(ec_key()), WEB, NOW)
    verified = crypto_verify(ca.trust_bundle.certificates, issued.cert_pem)
    assert verified.subjects == [x509.UniformResourceIdentifier(str(WEB))]
    assert verified.chain[-1] == ca.root


def test_py_spiffe_parses_the_svid(ca: CertificateAuthority) -> None:
    key = ec_key()
    issued = issue_svid(ca, make_csr(key), WEB, NOW)
    svid = X509Svid.parse(issued.chain_pem, key_pem(key))
    assert str(svid.spiffe_id) == str(WEB)
    assert svid.leaf == issued.certificate


@pytest.mark.parametrize("ca_fixture", ["rsa_ca", "p384_ca"])
def test_other_ca_algorithms_issue_verifiable_leaves(
    ca_fixture: str, request: pytest.FixtureRequest
) -> None:
    other: CertificateAuthority = request.getfixturevalue(ca_fixture)
    key = ec_key()
    issued = issue_svid(other, make_csr(key), WEB, NOW)
    result = openssl_verify(other.trust_bundle.pem, issued.cert_pem, purpose="sslclient")
    assert result.returncode == 0, result.stdout + result.stderr
    crypto_verify(other.trust_bundle.certificates, issued.cert_pem)
    X509Svid.parse(issued.chain_pem, key_pem(key))


# --- the fast path builds exactly what cryptography's CertificateBuilder would ---------


def _same_algorithm_signer(
    authority: CertificateAuthority,
) -> tuple[ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, hashes.SHA256 | hashes.SHA384]:
    public = authority.certificate.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        return rsa.generate_private_key(65537, 2048), hashes.SHA256()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    if isinstance(public.curve, ec.SECP384R1):
        return ec.generate_private_key(ec.SECP384R1()), hashes.SHA384()
    return ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()


def _reference_tbs(
    authority: CertificateAuthority,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    identity: SpiffeId,
    serial: int,
    not_before: datetime,
    not_after: datetime,
) -> bytes:
    """The TBSCertificate cryptography's CertificateBuilder makes for the same leaf."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(authority.certificate.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                authority.certificate.extensions.get_extension_for_class(
                    x509.SubjectKeyIdentifier
                ).value
            ),
            False,
        )
    )
    # The signing key does not appear in the TBS, so any key of the CA's algorithm will do.
    signer, algorithm = _same_algorithm_signer(authority)
    return builder.sign(signer, algorithm).tbs_certificate_bytes


@pytest.mark.parametrize("ca_fixture", ["ca", "rsa_ca", "p384_ca"])
@pytest.mark.parametrize("leaf_key", ["ec", "rsa"])
def test_issued_tbs_equals_certificate_builder_output(
    ca_fixture: str, leaf_key: str, request: pytest.FixtureRequest
) -> None:
    authority: CertificateAuthority = request.getfixturevalue(ca_fixture)
    key = ec_key() if leaf_key == "ec" else rsa.generate_private_key(65537, 2048)
    issued = issue_svid(authority, make_csr(key), WEB, NOW)
    reference = _reference_tbs(
        authority, key.public_key(), WEB, issued.serial, issued.not_before, issued.not_after
    )
    assert issued.certificate.tbs_certificate_bytes == reference


_LONG = SpiffeId("a" * 200, "n" * 100, "s" * 100)  # lengths above 127 and 255 bytes


@pytest.mark.parametrize(
    ("serial", "identity", "not_after"),
    [
        (2**64, WEB, NOW + timedelta(hours=1)),
        (2**64 - 1, WEB, NOW + timedelta(hours=1)),  # top bit set: needs a leading zero
        (2**159 - 1, WEB, NOW + timedelta(hours=1)),
        (0x80, WEB, NOW + timedelta(hours=1)),
        (1, _LONG, NOW + timedelta(hours=1)),
        (2**100, WEB, datetime(2050, 1, 1, tzinfo=UTC)),  # GeneralizedTime
    ],
)
def test_tbs_edge_cases_equal_certificate_builder_output(
    serial: int, identity: SpiffeId, not_after: datetime
) -> None:
    authority = generate_builtin_ca(
        "long", identity.trust_domain, NOW, validity=timedelta(days=9000)
    )
    public_key = ec_key().public_key()
    mine = build_tbs_certificate(authority, public_key, identity, serial, NOW, not_after)
    assert mine == _reference_tbs(authority, public_key, identity, serial, NOW, not_after)


def test_times_from_2050_use_generalized_time() -> None:
    assert _der.time(datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC)) == (b"\x17\x0d491231235959Z")
    assert _der.time(datetime(2050, 1, 1, tzinfo=UTC)) == b"\x18\x0f20500101000000Z"


# --- the identity comes from the caller, never from the CSR ---------------------------


def test_csr_asking_for_other_san_ca_and_extensions_gets_exactly_the_callers_identity(
    ca: CertificateAuthority,
) -> None:
    key = ec_key()
    hostile = make_csr(
        key,
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "root-of-all")]),
        extensions=[
            (
                x509.SubjectAlternativeName(
                    [
                        x509.UniformResourceIdentifier(
                            "spiffe://cluster.local/ns/kube-system/sa/admin"
                        ),
                        x509.DNSName("evil.example"),
                    ]
                ),
                False,
            ),
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (
                x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                True,
            ),
            (x509.OCSPNoCheck(), False),
        ],
    )
    issued = issue_svid(ca, hostile, WEB, NOW)
    leaf = issued.certificate
    assert leaf.subject == x509.Name([])
    assert list(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == [
        x509.UniformResourceIdentifier(str(WEB))
    ]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert not leaf.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    with pytest.raises(x509.ExtensionNotFound):
        leaf.extensions.get_extension_for_class(x509.OCSPNoCheck)
    X509Svid.parse(issued.chain_pem, key_pem(key))


_SHARED_CA = generate_builtin_ca("props", TRUST_DOMAIN, NOW)  # hypothesis dislikes fixtures
_SHARED_CSR = make_csr(ec_key())


@given(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._", min_size=1, max_size=12).filter(
        lambda s: s not in (".", "..")
    ),
)
@settings(max_examples=25, deadline=None)
def test_any_identity_is_issued_verbatim(namespace: str, account: str) -> None:
    authority = _SHARED_CA
    identity = SpiffeId(TRUST_DOMAIN, namespace, account)
    leaf = issue_svid(authority, _SHARED_CSR, identity, NOW).certificate
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [str(identity)]


# --- refused CSRs ------------------------------------------------------------------------


def _tamper_signature(csr_pem: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the ECDSA signature's s value: still well-formed DER
    return _der.pem(bytes(der), "CERTIFICATE REQUEST")


def test_bad_csr_signature_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(InvalidCSR, match="signature does not verify"):
        issue_svid(ca, _tamper_signature(make_csr(ec_key())), WEB, NOW)


@pytest.mark.parametrize(
    ("make_key", "reason"),
    [
        (lambda: rsa.generate_private_key(65537, 1024), "RSA key of 1024 bits is too weak"),  # noqa: S505
        (lambda: ec.generate_private_key(ec.SECP256K1()), "EC curve secp256k1 is not accepted"),
        (lambda: ec.generate_private_key(ec.SECP521R1()), "EC curve secp521r1 is not accepted"),
        (ed25519.Ed25519PrivateKey.generate, "Ed25519 keys are not accepted: Envoy (BoringSSL)"),
        (ed448.Ed448PrivateKey.generate, "Ed448 keys are not accepted"),
    ],
)
def test_weak_or_unsupported_csr_keys_refused_with_reason(
    ca: CertificateAuthority, make_key: object, reason: str
) -> None:
    key = make_key()  # type: ignore[operator]
    with pytest.raises(InvalidCSR) as caught:
        issue_svid(ca, make_csr(key), WEB, NOW)
    assert reason in str(caught.value)


def test_sha1_signed_csr_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    # cryptography no longer signs with SHA-1, openssl still does.
    folder = tmp_path
    (folder / "key.pem").write_bytes(key_pem(ec_key()))
    result = subprocess.run(
        ["openssl", "req", "-new", "-sha1", "-key", str(folder / "key.pem"), "-subj", "/"],
        capture_output=True,
        check=True,
    )
    with pytest.raises(InvalidCSR, match="signature uses SHA1"):
        issue_svid(ca, result.stdout, WEB, NOW)


def test_garbage_csr_refused(ca: CertificateAuthority) -> None:
    garbage = _der.pem(b"\x30\x03\x02\x01\x01", "CERTIFICATE REQUEST")
    with pytest.raises(InvalidCSR, match="could not be parsed"):
        issue_svid(ca, garbage, WEB, NOW)
    with pytest.raises(InvalidCSR, match="could not be parsed"):
        issue_svid(ca, b"not pem at all", WEB, NOW)


# --- refused issuance --------------------------------------------------------------------


def test_identity_outside_the_ca_trust_domain_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(IssuanceRefused, match="outside the CA's trust domain"):
        issue_svid(ca, make_csr(ec_key()), SpiffeId("other.mesh", "default", "web"), NOW)


def test_revoked_identity_refused(ca: CertificateAuthority) -> None:
    revocations = revoke_identity(RevocationList(), WEB, NOW - timedelta(hours=1))
    with pytest.raises(IdentityRevoked, match=re.escape(f"{WEB} was revoked at")):
        issue_svid(ca, make_csr(ec_key()), WEB, NOW, revocations=revocations)
    other = SpiffeId(TRUST_DOMAIN, "default", "api")
    issue_svid(ca, make_csr(ec_key()), other, NOW, revocations=revocations)


def test_expired_or_not_yet_valid_ca_refuses(ca: CertificateAuthority) -> None:
    csr = make_csr(ec_key())
    with pytest.raises(IssuanceRefused, match="expired"):
        issue_svid(ca, csr, WEB, ca.not_after + timedelta(seconds=1))
    with pytest.raises(IssuanceRefused, match="not valid until"):
        issue_svid(ca, csr, WEB, ca.not_before - timedelta(seconds=1))


def test_non_positive_validity_and_naive_now_refused(ca: CertificateAuthority) -> None:
    csr = make_csr(ec_key())
    with pytest.raises(IssuanceRefused, match="validity must be positive"):
        issue_svid(ca, csr, WEB, NOW, timedelta(0))
    with pytest.raises(ValueError, match="timezone-aware"):
        issue_svid(ca, csr, WEB, NOW.replace(tzinfo=None))
