"""Trust bundles: the set of roots a mesh's proxies trust.

A bundle holds one or more roots so that a root can be rotated without downtime: during a
rotation proxies trust the old and the new root at once (see rotation.py). Bundles are
immutable values; `with_root`/`without_root` return new bundles.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization

from verity.pki.errors import BundleError
from verity.pki.spiffe_id import validate_trust_domain


def fingerprint_sha256(certificate: x509.Certificate) -> str:
    """Lowercase hex SHA-256 of the certificate's DER, the usual openssl -fingerprint value."""
    return certificate.fingerprint(hashes.SHA256()).hex()


def _root_problem(certificate: x509.Certificate) -> str | None:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return "has no basicConstraints extension"
    if not constraints.value.ca:
        return "is not a CA (basicConstraints CA:false)"
    if certificate.issuer != certificate.subject:
        return "is not self-issued (issuer differs from subject)"
    try:
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, InvalidSignature):
        return "is not self-signed (its signature does not verify with its own key)"
    return None


@dataclass(frozen=True, slots=True)
class TrustedRoot:
    """One root certificate of a bundle, with the facts operators and proxies need."""

    certificate: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def sha256(self) -> str:
        return fingerprint_sha256(self.certificate)

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    @property
    def subject(self) -> str:
        return self.certificate.subject.rfc4514_string()


@dataclass(frozen=True)
class TrustBundle:
    """The roots trusted for one trust domain, in the order they were added."""

    trust_domain: str
    roots: tuple[TrustedRoot, ...]

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        if not self.roots:
            raise BundleError("a trust bundle must hold at least one root")
        seen: set[str] = set()
        for root in self.roots:
            problem = _root_problem(root.certificate)
            if problem is not None:
                raise BundleError(f"bundle root {root.subject!r} {problem}")
            if root.sha256 in seen:
                raise BundleError(f"bundle root {root.sha256} is present twice")
            seen.add(root.sha256)

    @classmethod
    def of(cls, trust_domain: str, *certificates: x509.Certificate) -> TrustBundle:
        return cls(trust_domain, tuple(TrustedRoot(c) for c in certificates))

    @classmethod
    def from_pem(cls, trust_domain: str, pem: bytes) -> TrustBundle:
        try:
            certificates = x509.load_pem_x509_certificates(pem)
        except ValueError as exc:
            raise BundleError(f"bundle PEM could not be parsed: {exc}") from exc
        return cls.of(trust_domain, *certificates)

    @cached_property
    def fingerprints(self) -> tuple[str, ...]:
        return tuple(root.sha256 for root in self.roots)

    @property
    def pems(self) -> tuple[bytes, ...]:
        return tuple(root.pem for root in self.roots)

    @property
    def pem(self) -> bytes:
        """All roots concatenated, as Envoy's trusted_ca and openssl -CAfile take them."""
        return b"".join(self.pems)

    @property
    def certificates(self) -> tuple[x509.Certificate, ...]:
        return tuple(root.certificate for root in self.roots)

    @property
    def not_after(self) -> datetime:
        """When the first root expires: the bundle needs attention before then."""
        return min(root.not_after for root in self.roots)

    def contains(self, sha256: str) -> bool:
        return sha256 in self.fingerprints

    def with_root(self, certificate: x509.Certificate) -> TrustBundle:
        return TrustBundle(self.trust_domain, (*self.roots, TrustedRoot(certificate)))

    def without_root(self, sha256: str) -> TrustBundle:
        if not self.contains(sha256):
            raise BundleError(f"bundle holds no root {sha256}")
        kept = tuple(root for root in self.roots if root.sha256 != sha256)
        return TrustBundle(self.trust_domain, kept)
