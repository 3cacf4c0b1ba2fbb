"""Each mesh has its own CA and trust domain; meshes do not trust each other's leaves."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.verification import VerificationError

from tests.unit.pki.helpers import (
    NOW,
    crypto_verify,
    ec_key,
    make_ca_cert,
    make_csr,
    openssl_verify,
)
from verity.pki import (
    CertificateAuthority,
    IssuanceRefused,
    SpiffeId,
    generate_builtin_ca,
    issue_svid,
)


@pytest.fixture(scope="module")
def meshes() -> tuple[CertificateAuthority, CertificateAuthority]:
    return (
        generate_builtin_ca("payments", "payments.example", NOW),
        generate_builtin_ca("shop", "shop.example", NOW),
    )


def test_leaves_of_one_mesh_do_not_verify_in_another(
    meshes: tuple[CertificateAuthority, CertificateAuthority],
) -> None:
    payments, shop = meshes
    leaf = issue_svid(payments, make_csr(ec_key()), SpiffeId("payments.example", "a", "b"), NOW)
    assert openssl_verify(payments.trust_bundle.pem, leaf.cert_pem).returncode == 0
    refused = openssl_verify(shop.trust_bundle.pem, leaf.cert_pem, purpose="sslclient")
    assert (
        refused.returncode != 0
        and "unable to get local issuer certificate" in refused.stdout + refused.stderr
    )
    crypto_verify(payments.trust_bundle.certificates, leaf.cert_pem)
    with pytest.raises(VerificationError):
        crypto_verify(shop.trust_bundle.certificates, leaf.cert_pem)


def test_a_ca_refuses_identities_of_another_trust_domain(
    meshes: tuple[CertificateAuthority, CertificateAuthority],
) -> None:
    payments, _ = meshes
    with pytest.raises(
        IssuanceRefused, match=re.escape("outside the CA's trust domain 'payments.example'")
    ):
        issue_svid(payments, make_csr(ec_key()), SpiffeId("shop.example", "a", "b"), NOW)


def test_root_names_mesh_and_trust_domain(
    meshes: tuple[CertificateAuthority, CertificateAuthority],
) -> None:
    payments, _ = meshes
    subject = payments.root.subject.rfc4514_string()
    assert "O=payments.example" in subject and "OU=mesh payments" in subject
    san = payments.root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("spiffe://payments.example")]
    assert payments.root.extensions.get_extension_for_class(x509.BasicConstraints).critical


def test_uri_name_constraints_are_not_usable_with_cryptographys_verifier() -> None:
    """Why the builtin root carries no URI nameConstraints: cryptography's verifier rejects
    any chain with one. If this starts failing, cryptography gained support: reconsider."""
    key = ec_key()
    root = make_ca_cert(
        "Constrained",
        key,
        extra=[
            (
                x509.NameConstraints(
                    permitted_subtrees=[x509.UniformResourceIdentifier("payments.example")],
                    excluded_subtrees=None,
                ),
                True,
            )
        ],
    )
    leaf_key = ec_key()
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(root.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(minutes=5))
        .not_valid_after(NOW + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://payments.example/ns/a/sa/b")]
            ),
            True,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .sign(key, hashes.SHA256())
    )
    leaf_pem = leaf.public_bytes(serialization.Encoding.PEM)
    root_pem = root.public_bytes(serialization.Encoding.PEM)
    assert openssl_verify(root_pem, leaf_pem).returncode == 0  # openssl honours it
    with pytest.raises(VerificationError, match="unsupported name constraint"):
        crypto_verify([root], leaf_pem)
