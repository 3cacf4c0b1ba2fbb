"""The builtin root: what it is made of, and what the CA object lets out."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.unit.pki.helpers import NOW, TRUST_DOMAIN, ec_key
from verity.pki import (
    BACKDATE,
    DEFAULT_ROOT_VALIDITY,
    CAKind,
    CertificateAuthority,
    InvalidCA,
    InvalidSpiffeId,
    KeyAlgorithm,
    generate_builtin_ca,
)


def test_builtin_root_is_a_proper_spiffe_signing_certificate(ca: CertificateAuthority) -> None:
    root = ca.root
    assert ca.kind is CAKind.BUILTIN and ca.certificate == root and ca.intermediates == ()
    constraints = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = root.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    root.verify_directly_issued_by(root)
    assert root.not_valid_before_utc == NOW - BACKDATE
    assert root.not_valid_after_utc == NOW + DEFAULT_ROOT_VALIDITY
    assert ca.not_after == root.not_valid_after_utc
    assert ca.warnings == ()


@pytest.mark.parametrize(
    ("algorithm", "key_type", "size", "hash_type"),
    [
        (KeyAlgorithm.ECDSA_P256, ec.EllipticCurvePublicKey, 256, hashes.SHA256),
        (KeyAlgorithm.ECDSA_P384, ec.EllipticCurvePublicKey, 384, hashes.SHA384),
        (KeyAlgorithm.RSA_2048, rsa.RSAPublicKey, 2048, hashes.SHA256),
    ],
)
def test_key_algorithms(
    algorithm: KeyAlgorithm, key_type: type, size: int, hash_type: type
) -> None:
    root = generate_builtin_ca("m", TRUST_DOMAIN, NOW, key_algorithm=algorithm).root
    public_key = root.public_key()
    assert isinstance(public_key, key_type)
    assert isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    assert public_key.key_size == size
    assert isinstance(root.signature_hash_algorithm, hash_type)


def test_each_generated_root_is_distinct(ca: CertificateAuthority) -> None:
    again = generate_builtin_ca("default", TRUST_DOMAIN, NOW)
    assert again.root_fingerprint_sha256 != ca.root_fingerprint_sha256
    assert again.root.subject != ca.root.subject  # key id in CN: old and new root tell apart


def test_repr_shows_identity_not_key(ca: CertificateAuthority) -> None:
    text = repr(ca)
    assert text == str(ca)
    assert ca.fingerprint_sha256 in text and "cluster.local" in text and "default" in text
    assert "PRIVATE" not in text and "Key object" not in text
    assert not any(name for name in dir(ca) if "key" in name.lower() and not name.startswith("_"))


def test_bad_inputs_refused() -> None:
    with pytest.raises(InvalidSpiffeId, match="must be lowercase"):
        generate_builtin_ca("m", "Cluster.Local", NOW)
    with pytest.raises(ValueError, match="timezone-aware"):
        generate_builtin_ca("m", TRUST_DOMAIN, NOW.replace(tzinfo=None))
    with pytest.raises(ValueError, match="longer than the clock-skew"):
        generate_builtin_ca("m", TRUST_DOMAIN, NOW, validity=timedelta(minutes=1))


def test_constructor_checks_structure(ca: CertificateAuthority) -> None:
    def build(**changes: object) -> CertificateAuthority:
        arguments: dict[str, object] = {
            "kind": CAKind.BUILTIN,
            "mesh": "default",
            "trust_domain": TRUST_DOMAIN,
            "certificate": ca.root,
            "intermediates": (),
            "root": ca.root,
            "private_key": ec_key(),
        }
        arguments.update(changes)
        return CertificateAuthority(**arguments)  # type: ignore[arg-type]

    with pytest.raises(InvalidCA, match="does not match"):
        build()
    with pytest.raises(InvalidCA, match="mesh name is empty"):
        build(mesh="")
