"""Test helpers: keys, CSRs, hand-made CA certificates and the three independent verifiers."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerifiedClient

# One fixed instant per run, close to the real clock so that openssl (which also gets
# -attime) and hand-made certificates agree.
NOW = datetime.now(UTC).replace(microsecond=0)
TRUST_DOMAIN = "cluster.local"


def ec_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


def key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def _hash_for(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    # Ed25519/Ed448 sign without a separate hash.
    return (
        hashes.SHA256() if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) else None
    )


def make_csr(
    key: CertificateIssuerPrivateKeyTypes,
    *,
    subject: x509.Name | None = None,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject or x509.Name([]))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(key, _hash_for(key)).public_bytes(serialization.Encoding.PEM)


def ca_key_usage(*, key_cert_sign: bool = True) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass
class Issuer:
    certificate: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes


def make_ca_cert(
    name: str,
    key: CertificateIssuerPrivateKeyTypes,
    *,
    issuer: Issuer | None = None,
    ca: bool | None = True,
    bc_critical: bool = True,
    path_length: int | None = None,
    key_usage: x509.KeyUsage | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    extra: Sequence[tuple[x509.ExtensionType, bool]] = (),
) -> x509.Certificate:
    """A CA certificate with any property a test wants wrong; ca=None omits basicConstraints."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - timedelta(days=1))
        .not_valid_after(not_after or NOW + timedelta(days=365))
        .add_extension(key_usage or ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), bc_critical
        )
    if issuer is not None:
        issuer_public = issuer.certificate.public_key()
        assert isinstance(issuer_public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), False
        )
    for extension, critical in extra:
        builder = builder.add_extension(extension, critical)
    return builder.sign(signer_key, _hash_for(signer_key))


# --- the three verifiers ---------------------------------------------------------------


def openssl_verify(
    roots_pem: bytes,
    leaf_pem: bytes,
    *,
    untrusted_pem: bytes | None = None,
    purpose: str | None = None,
    at: datetime = NOW,
) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        (folder / "root.pem").write_bytes(roots_pem)
        (folder / "leaf.pem").write_bytes(leaf_pem)
        command = ["openssl", "verify", "-attime", str(int(at.timestamp()))]
        command += ["-CAfile", str(folder / "root.pem")]
        if untrusted_pem:
            (folder / "chain.pem").write_bytes(untrusted_pem)
            command += ["-untrusted", str(folder / "chain.pem")]
        if purpose:
            command += ["-purpose", purpose]
        command.append(str(folder / "leaf.pem"))
        return subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)


def crypto_verify(
    roots: Sequence[x509.Certificate],
    leaf_pem: bytes,
    intermediates: Sequence[x509.Certificate] = (),
    at: datetime = NOW,
) -> VerifiedClient:
    verifier = PolicyBuilder().store(Store(list(roots))).time(at).build_client_verifier()
    return verifier.verify(x509.load_pem_x509_certificate(leaf_pem), list(intermediates))


def chain_certificates(chain_pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(chain_pem)
