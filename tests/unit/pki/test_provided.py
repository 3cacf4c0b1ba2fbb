"""Provided CAs: good roots and intermediates work; bad ones are refused with their reason."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from spiffe import X509Svid

from tests.unit.pki.helpers import (
    NOW,
    TRUST_DOMAIN,
    Issuer,
    ca_key_usage,
    cert_pem,
    crypto_verify,
    ec_key,
    key_pem,
    make_ca_cert,
    make_csr,
    openssl_verify,
)
from verity.pki import CAKind, InvalidCA, SpiffeId, issue_svid, load_provided_ca

WEB = SpiffeId(TRUST_DOMAIN, "default", "web")


def _load(certificate: bytes, key: bytes, root: bytes | None = None, now: datetime = NOW) -> None:
    load_provided_ca("default", TRUST_DOMAIN, certificate, key, now, root_pem=root)


@pytest.fixture(scope="module")
def root() -> Issuer:
    key = ec_key()
    return Issuer(make_ca_cert("Corp Root", key, path_length=1), key)


@pytest.fixture(scope="module")
def intermediate(root: Issuer) -> Issuer:
    key = ec_key()
    return Issuer(make_ca_cert("Mesh Intermediate", key, issuer=root, path_length=0), key)


def test_provided_root_issues_verifiable_leaves(root: Issuer) -> None:
    authority = load_provided_ca(
        "default", TRUST_DOMAIN, cert_pem(root.certificate), key_pem(root.key), NOW
    )
    assert authority.kind is CAKind.PROVIDED
    assert authority.root == root.certificate and authority.intermediates == ()
    issued = issue_svid(authority, make_csr(ec_key()), WEB, NOW)
    assert issued.chain_pem == issued.cert_pem
    assert openssl_verify(cert_pem(root.certificate), issued.cert_pem).returncode == 0


def test_provided_intermediate_with_chain_serves_the_intermediate_and_trusts_the_root(
    root: Issuer, intermediate: Issuer
) -> None:
    chain = cert_pem(intermediate.certificate, root.certificate)
    authority = load_provided_ca("default", TRUST_DOMAIN, chain, key_pem(intermediate.key), NOW)
    assert authority.certificate == intermediate.certificate
    assert authority.trust_bundle.certificates == (root.certificate,)
    key = ec_key()
    issued = issue_svid(authority, make_csr(key), WEB, NOW)
    served = x509.load_pem_x509_certificates(issued.chain_pem)
    assert served == [issued.certificate, intermediate.certificate]  # root not served

    for purpose in (None, "sslclient", "sslserver"):
        result = openssl_verify(
            authority.trust_bundle.pem,
            issued.cert_pem,
            untrusted_pem=issued.chain_pem,
            purpose=purpose,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    verified = crypto_verify(authority.trust_bundle.certificates, issued.cert_pem, served[1:])
    assert verified.subjects == [x509.UniformResourceIdentifier(str(WEB))]
    assert X509Svid.parse(issued.chain_pem, key_pem(key)).spiffe_id is not None
    # Without the intermediate, the leaf does not verify: the chain really is needed.
    assert openssl_verify(authority.trust_bundle.pem, issued.cert_pem).returncode != 0


def test_root_may_come_separately(root: Issuer, intermediate: Issuer) -> None:
    authority = load_provided_ca(
        "default",
        TRUST_DOMAIN,
        cert_pem(intermediate.certificate),
        key_pem(intermediate.key),
        NOW,
        root_pem=cert_pem(root.certificate),
    )
    assert authority.root == root.certificate


def test_intermediate_without_its_root_refused(intermediate: Issuer) -> None:
    with pytest.raises(InvalidCA, match="not a self-signed root; include the root"):
        _load(cert_pem(intermediate.certificate), key_pem(intermediate.key))


def _refusal(
    certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
) -> str:
    with pytest.raises(InvalidCA) as caught:
        _load(cert_pem(certificate), key_pem(key))
    return str(caught.value)


def test_non_ca_certificate_refused() -> None:
    key = ec_key()
    assert _refusal(make_ca_cert("leaf", key, ca=False), key) == (
        "provided CA: certificate is not a CA (basicConstraints CA:false)"
    )


def test_certificate_without_basic_constraints_refused() -> None:
    key = ec_key()
    assert _refusal(make_ca_cert("old", key, ca=None), key) == (
        "provided CA: certificate is not a CA (no basicConstraints extension)"
    )


def test_ca_without_key_cert_sign_refused() -> None:
    key = ec_key()
    certificate = make_ca_cert("no-sign", key, key_usage=ca_key_usage(key_cert_sign=False))
    assert _refusal(certificate, key) == "provided CA: certificate keyUsage lacks keyCertSign"


def test_key_that_does_not_match_refused(root: Issuer) -> None:
    assert _refusal(root.certificate, ec_key()) == (
        "provided CA: private key does not match the certificate"
    )


def test_expired_certificate_refused() -> None:
    key = ec_key()
    certificate = make_ca_cert(
        "old", key, not_before=NOW - timedelta(days=30), not_after=NOW - timedelta(days=1)
    )
    assert _refusal(certificate, key).startswith("provided CA: certificate expired (notAfter ")


def test_not_yet_valid_certificate_refused() -> None:
    key = ec_key()
    certificate = make_ca_cert("future", key, not_before=NOW + timedelta(days=1))
    assert _refusal(certificate, key).startswith("provided CA: certificate is not valid yet")


def test_rsa_1024_refused() -> None:
    key = rsa.generate_private_key(65537, 1024)  # noqa: S505 - the point of the test
    assert _refusal(make_ca_cert("weak", key), key) == (
        "provided CA: certificate key: RSA key of 1024 bits is too weak (minimum 2048)"
    )


def test_unaccepted_curve_refused() -> None:
    key = ec.generate_private_key(ec.SECP256K1())
    assert "EC curve secp256k1 is not accepted" in _refusal(make_ca_cert("k1", key), key)


def test_sha1_signed_ca_refused(tmp_path: Path) -> None:
    # cryptography no longer signs with SHA-1; openssl still does.
    key = ec_key()
    (tmp_path / "key.pem").write_bytes(key_pem(key))
    made = subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-new",
            "-sha1",
            "-days",
            "30",
            "-key",
            str(tmp_path / "key.pem"),
            "-subj",
            "/CN=SHA-1 root",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        capture_output=True,
        check=True,
    )
    with pytest.raises(InvalidCA) as caught:
        # openssl 3.0 cannot backdate notBefore, so check against the real clock.
        _load(made.stdout, key_pem(key), now=datetime.now(UTC) + timedelta(seconds=5))
    assert str(caught.value) == (
        "provided CA: certificate signature uses SHA1, which is not accepted "
        "(use SHA-256 or stronger)"
    )


def test_bad_issuer_in_chain_named(root: Issuer) -> None:
    key, other_root_key = ec_key(), ec_key()
    other_root = Issuer(make_ca_cert("Other Root", other_root_key), other_root_key)
    intermediate = make_ca_cert("Mesh Intermediate", key, issuer=other_root)
    with pytest.raises(InvalidCA, match="is not issued by 'CN=Corp Root'"):
        _load(cert_pem(intermediate, root.certificate), key_pem(key))


def test_expired_issuer_in_chain_refused_and_named() -> None:
    root_key, key = ec_key(), ec_key()
    old_root = Issuer(
        make_ca_cert(
            "Old Root",
            root_key,
            not_before=NOW - timedelta(days=9),
            not_after=NOW - timedelta(days=1),
        ),
        root_key,
    )
    intermediate = make_ca_cert("Mesh Intermediate", key, issuer=old_root)
    with pytest.raises(InvalidCA, match=r"issuer #1 'CN=Old Root' expired"):
        _load(cert_pem(intermediate, old_root.certificate), key_pem(key))


def test_path_length_violation_refused() -> None:
    root_key, key = ec_key(), ec_key()
    root = Issuer(make_ca_cert("Strict Root", root_key, path_length=0), root_key)
    intermediate = make_ca_cert("Mesh Intermediate", key, issuer=root)
    with pytest.raises(InvalidCA, match="pathLenConstraint 0, the chain needs 1"):
        _load(cert_pem(intermediate, root.certificate), key_pem(key))


def test_name_constraints_excluding_the_trust_domain_refused() -> None:
    key = ec_key()
    constrained = make_ca_cert(
        "Other domain",
        key,
        extra=[
            (
                x509.NameConstraints(
                    permitted_subtrees=[x509.UniformResourceIdentifier("other.example")],
                    excluded_subtrees=None,
                ),
                True,
            )
        ],
    )
    assert "nameConstraints do not permit URIs in trust domain 'cluster.local'" in _refusal(
        constrained, key
    )


def test_encrypted_and_garbage_input_refused(root: Issuer) -> None:
    encrypted = root.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(InvalidCA, match="private key is encrypted"):
        _load(cert_pem(root.certificate), encrypted)
    with pytest.raises(InvalidCA, match="private key PEM could not be parsed"):
        _load(
            cert_pem(root.certificate),
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
    with pytest.raises(InvalidCA, match="certificate PEM"):
        _load(b"nothing here", key_pem(root.key))


def test_non_critical_basic_constraints_accepted_with_a_warning() -> None:
    key = ec_key()
    authority = load_provided_ca(
        "default",
        TRUST_DOMAIN,
        cert_pem(make_ca_cert("lax", key, bc_critical=False)),
        key_pem(key),
        NOW,
    )
    assert authority.warnings == ("certificate: basicConstraints is not marked critical",)
