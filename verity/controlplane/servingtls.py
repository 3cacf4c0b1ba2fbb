"""The control plane's own TLS identity for its gRPC port (CA service and ADS).

This is not a mesh CA: it only lets agents authenticate the control plane. On first start the
control plane makes a small CA of its own (kept in the data dir, key 0600) and a serving
certificate for the names it is reached by. Agents are given `cp-ca.pem` when they join and
verify the control plane against it; there is no "insecure" mode.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from verity.controlplane.privatefile import write_private_file

CA_CERT = "cp-ca.pem"
CA_KEY = "cp-ca.key"
SERVING_CERT = "cp-server.pem"
SERVING_KEY = "cp-server.key"
SERVING_NAMES = "cp-server.names"
CA_LIFETIME = timedelta(days=3650)
SERVING_LIFETIME = timedelta(days=365)


@dataclass(frozen=True)
class ServingCredentials:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _make_ca(now: datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Verity control plane CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_serving(
    ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, names: list[str], now: datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(min(now + SERVING_LIFETIME, ca.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def ensure_serving_credentials(data_dir: Path, names: list[str]) -> ServingCredentials:
    """Load or create the control plane's CA and serving certificate for `names`.

    The CA persists across restarts (agents keep trusting it); the serving certificate is
    re-made when the names change or it is within 30 days of expiry.
    """
    now = datetime.now(UTC)
    ca_path, ca_key_path = data_dir / CA_CERT, data_dir / CA_KEY
    if ca_path.exists() and ca_key_path.exists():
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
        loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        ca_key = loaded
    else:
        ca, ca_key = _make_ca(now)
        write_private_file(ca_key_path, _key_pem(ca_key))
        ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path, key_path, names_path = (
        data_dir / SERVING_CERT,
        data_dir / SERVING_KEY,
        data_dir / SERVING_NAMES,
    )
    wanted = ",".join(names)
    fresh = (
        cert_path.exists()
        and key_path.exists()
        and names_path.exists()
        and names_path.read_text() == wanted
        and x509.load_pem_x509_certificate(cert_path.read_bytes()).not_valid_after_utc
        > now + timedelta(days=30)
    )
    if not fresh:
        cert, key = _make_serving(ca, ca_key, names, now)
        write_private_file(key_path, _key_pem(key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        names_path.write_text(wanted)
    return ServingCredentials(
        ca_pem=ca_path.read_bytes(), cert_pem=cert_path.read_bytes(), key_pem=key_path.read_bytes()
    )
