"""The workload's private key and its CSR, made on the host and never sent anywhere.

The agent generates the key here, asks the control plane to sign a CSR for it, and hands the
key to Envoy only over the local SDS socket. The key object never shows its material in a
repr, a log line or a pickle; `scrub_key_material` cleans text that might quote a key (Envoy
NACKs and log lines can) before anything keeps or logs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class KeyAlgorithm(StrEnum):
    """Key types Envoy (BoringSSL) serves and the mesh CA accepts."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"


def _generate(algorithm: KeyAlgorithm) -> PrivateKey:
    match algorithm:
        case KeyAlgorithm.EC_P256:
            return ec.generate_private_key(ec.SECP256R1())
        case KeyAlgorithm.EC_P384:
            return ec.generate_private_key(ec.SECP384R1())
        case KeyAlgorithm.RSA_2048:
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        case KeyAlgorithm.RSA_3072:
            return rsa.generate_private_key(public_exponent=65537, key_size=3072)


def check_spiffe_id(spiffe_id: str) -> str:
    """Return `spiffe_id` if it is a well-formed SPIFFE ID, else raise ValueError naming why."""
    parts = urlsplit(spiffe_id)
    if parts.scheme != "spiffe":
        raise ValueError(f"SPIFFE ID {spiffe_id!r}: the scheme must be 'spiffe'")
    if not parts.netloc or parts.netloc != parts.netloc.lower() or "@" in parts.netloc:
        raise ValueError(f"SPIFFE ID {spiffe_id!r}: needs a lowercase trust domain")
    if ":" in parts.netloc:
        raise ValueError(f"SPIFFE ID {spiffe_id!r}: the trust domain cannot have a port")
    if parts.query or parts.fragment or "?" in spiffe_id or "#" in spiffe_id:
        raise ValueError(f"SPIFFE ID {spiffe_id!r}: no query or fragment allowed")
    segments = parts.path.split("/")[1:] if parts.path else []
    if parts.path and (
        not parts.path.startswith("/") or any(s in ("", ".", "..") for s in segments)
    ):
        raise ValueError(f"SPIFFE ID {spiffe_id!r}: the path has an empty or dot segment")
    return spiffe_id


class WorkloadKey:
    """A private key held in memory. Its repr shows the algorithm and public fingerprint only."""

    __slots__ = ("_algorithm", "_key")

    def __init__(self, key: PrivateKey, algorithm: KeyAlgorithm) -> None:
        self._key = key
        self._algorithm = algorithm

    @classmethod
    def generate(cls, algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256) -> WorkloadKey:
        return cls(_generate(algorithm), algorithm)

    @classmethod
    def from_pem(cls, pem: bytes) -> WorkloadKey:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ValueError("unsupported private key type: use ECDSA or RSA")
        return cls(key, _algorithm_of(key))

    @classmethod
    def load(cls, path: Path) -> WorkloadKey:
        return cls.from_pem(path.read_bytes())

    @property
    def algorithm(self) -> KeyAlgorithm:
        return self._algorithm

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
        return self._key.public_key()

    def fingerprint(self) -> str:
        """SHA-256 of the DER SubjectPublicKeyInfo: names the key without revealing it."""
        der = self.public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return "sha256:" + hashlib.sha256(der).hexdigest()

    def private_key_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM, for SDS and the optional key file only."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def matches(self, certificate: x509.Certificate) -> bool:
        """True if `certificate` certifies this key."""
        return certificate.public_key() == self.public_key

    def build_csr(self, spiffe_id: str) -> bytes:
        """A PKCS#10 CSR (PEM) for `spiffe_id`, the only SAN, signed with this key.

        The subject is empty: an SVID's identity is its URI SAN, and the CA decides the rest.
        """
        check_spiffe_id(spiffe_id)
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return csr.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> None:
        """Write the key as PEM to `path`, a file that is 0600 from its first byte."""
        write_private_file(path, self.private_key_pem())

    def __repr__(self) -> str:
        return f"WorkloadKey({self._algorithm.value}, {self.fingerprint()})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        # A pickle is a way out of the process for the key: refuse it.
        raise TypeError("a WorkloadKey cannot be pickled")


def _algorithm_of(key: PrivateKey) -> KeyAlgorithm:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        by_curve = {"secp256r1": KeyAlgorithm.EC_P256, "secp384r1": KeyAlgorithm.EC_P384}
        if key.curve.name in by_curve:
            return by_curve[key.curve.name]
    if isinstance(key, rsa.RSAPrivateKey):
        by_size = {2048: KeyAlgorithm.RSA_2048, 3072: KeyAlgorithm.RSA_3072}
        if key.key_size in by_size:
            return by_size[key.key_size]
    raise ValueError("unsupported private key type: use ECDSA P-256/P-384 or RSA 2048/3072")


def csr_spiffe_id(csr_pem: bytes) -> str:
    """The single URI SAN of a CSR whose signature verifies; ValueError otherwise."""
    csr = x509.load_pem_x509_csr(csr_pem)
    if not csr.is_signature_valid:
        raise ValueError("the CSR signature does not verify")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError("the CSR has no subjectAltName") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or len(list(san)) != 1:
        raise ValueError("the CSR must carry exactly one SAN, a URI")
    return check_spiffe_id(uris[0])


def write_private_file(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`, never readable by anyone but the owner.

    The temporary file is created 0600 by `mkstemp` (umask can only narrow that), filled,
    fsynced and renamed over `path`, so a reader sees the old file or the new one, whole.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# A PEM private key, possibly with its newlines escaped (as in a quoted proto field), possibly
# cut short (as in a truncated error message).
_PEM_PRIVATE_KEY = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
    re.DOTALL,
)
# The values of proto fields that can hold key bytes, in text or JSON form.
_INLINE_FIELD = re.compile(
    r"""(?P<field>inline_(?:bytes|string)|inlineBytes|inlineString)(?P<sep>"?\s*:\s*)"""
    r"""(?P<quote>["'])(?:\\.|(?!(?P=quote)).)*(?P=quote)""",
    re.DOTALL,
)
# Long base64 runs: DER key bytes or a base64-encoded PEM (a JSON `bytes` field).
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{48,}={0,2}")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")
_TOKEN = re.compile(r"vrt[a-z]_[A-Za-z0-9_\-]{16,}")

REMOVED = "[removed]"


def scrub_key_material(text: str, *, base64_runs: bool = True) -> str:
    """Remove private keys, inline secret data, bearer tokens and (unless `base64_runs` is
    False, for text whose certificates should stay readable) long base64 runs from text."""
    text = _PEM_PRIVATE_KEY.sub("[private key removed]", text)
    text = _INLINE_FIELD.sub(
        lambda m: f"{m['field']}{m['sep']}{m['quote']}{REMOVED}{m['quote']}", text
    )
    if base64_runs:
        text = _BASE64_RUN.sub(REMOVED, text)
    text = _TOKEN.sub("[token removed]", text)
    return _BEARER.sub(r"\1[token removed]", text)
