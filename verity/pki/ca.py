"""Certificate authorities of a mesh.

Two kinds:
- builtin: Verity generates the mesh's root (ECDSA P-256 by default) and signs leaves with it.
- provided: the user hands over a root or an intermediate (certificate + key, PEM); it is
  validated by provided.py and refused with a precise reason if unusable.

Each mesh has its own CA and trust domain, so meshes do not trust each other's leaves. The
builtin root names the mesh and trust domain in its subject and carries the URI SAN
spiffe://<trust-domain>. It does NOT carry nameConstraints restricting URIs to the trust
domain: openssl honours such a constraint, but cryptography's verifier refuses any chain
that contains one ("unsupported name constraint"), so isolation rests on separate roots and
on issuance refusing identities outside the CA's trust domain (svid.py).

The CA's private key stays inside CertificateAuthority: there is no public accessor, repr
shows only subject and fingerprint, and it leaves the object only sealed under a KEK
(kek.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import NoReturn

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from verity.pki import _der
from verity.pki._time import as_utc
from verity.pki.bundle import TrustBundle, fingerprint_sha256
from verity.pki.errors import InvalidCA, InvalidSpiffeId
from verity.pki.keys import AcceptedPrivateKey
from verity.pki.spiffe_id import SCHEME, validate_trust_domain

# Clocks of replicas and proxies drift; certificates start a little in the past.
BACKDATE = timedelta(minutes=5)
DEFAULT_ROOT_VALIDITY = timedelta(days=3650)

_Sign = Callable[[bytes], bytes]


class KeyAlgorithm(StrEnum):
    ECDSA_P256 = "ecdsa-p256"
    ECDSA_P384 = "ecdsa-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"


class CAKind(StrEnum):
    BUILTIN = "builtin"
    PROVIDED = "provided"


@dataclass(frozen=True, slots=True)
class IssuerProfile:
    """What every leaf copies from its CA, encoded once (see svid.py for why)."""

    name_der: bytes
    authority_key_id_extension: bytes
    signature_algorithm: bytes
    served_chain_pem: bytes


class CertificateAuthority:
    """A mesh's signing certificate and key, with the chain up to its root.

    `certificate` signs leaves; `intermediates` are its issuers below the root (served with
    each leaf); `root` is the trust anchor that goes into the trust bundle. For a builtin CA
    and a provided root, certificate is root and intermediates is empty.
    """

    __slots__ = (
        "_certificate",
        "_intermediates",
        "_issuer",
        "_key",
        "_kind",
        "_mesh",
        "_not_after",
        "_not_before",
        "_root",
        "_sign",
        "_trust_domain",
        "_warnings",
    )

    def __init__(
        self,
        *,
        kind: CAKind,
        mesh: str,
        trust_domain: str,
        certificate: x509.Certificate,
        intermediates: Sequence[x509.Certificate],
        root: x509.Certificate,
        private_key: AcceptedPrivateKey,
        warnings: Sequence[str] = (),
    ) -> None:
        """Check the structure (key matches, chain links, root self-signed), not the clock."""
        if not mesh:
            raise InvalidCA("mesh name is empty")
        try:
            validate_trust_domain(trust_domain)
        except InvalidSpiffeId as exc:
            raise InvalidCA(str(exc)) from None
        _check_key_matches(certificate, private_key)
        _check_chain_links(certificate, tuple(intermediates), root)
        self._kind = kind
        self._mesh = mesh
        self._trust_domain = trust_domain
        self._certificate = certificate
        self._intermediates = tuple(intermediates)
        self._root = root
        self._key = private_key
        self._warnings = tuple(warnings)
        chain = self._chain_to_root()
        # Cached: issuance reads both on every leaf.
        self._not_before = max(c.not_valid_before_utc for c in chain)
        self._not_after = min(c.not_valid_after_utc for c in chain)
        self._sign, algorithm = _signer(private_key)
        self._issuer = _issuer_profile(certificate, self._intermediates, root, algorithm)

    def __repr__(self) -> str:
        return (
            f"CertificateAuthority(kind={self._kind.value!r}, mesh={self._mesh!r}, "
            f"trust_domain={self._trust_domain!r}, subject={self.subject!r}, "
            f"sha256={self.fingerprint_sha256!r}, not_after={self.not_after.isoformat()!r})"
        )

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        # Pickling would write the key out unencrypted; the only way out is seal_ca().
        raise TypeError("CertificateAuthority cannot be pickled; seal it with a KEK instead")

    @property
    def kind(self) -> CAKind:
        return self._kind

    @property
    def mesh(self) -> str:
        return self._mesh

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    @property
    def certificate(self) -> x509.Certificate:
        return self._certificate

    @property
    def intermediates(self) -> tuple[x509.Certificate, ...]:
        return self._intermediates

    @property
    def root(self) -> x509.Certificate:
        return self._root

    @property
    def warnings(self) -> tuple[str, ...]:
        """Accepted-but-not-ideal properties of a provided CA, for operators to see."""
        return self._warnings

    @property
    def subject(self) -> str:
        return self._certificate.subject.rfc4514_string()

    @property
    def fingerprint_sha256(self) -> str:
        return fingerprint_sha256(self._certificate)

    @property
    def root_fingerprint_sha256(self) -> str:
        return fingerprint_sha256(self._root)

    @property
    def not_before(self) -> datetime:
        """When the last certificate of the chain becomes valid."""
        return self._not_before

    @property
    def not_after(self) -> datetime:
        """When the first certificate of the chain expires; no leaf may outlive it."""
        return self._not_after

    @property
    def certificate_pem(self) -> bytes:
        return self._certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def trust_bundle(self) -> TrustBundle:
        return TrustBundle.of(self._trust_domain, self._root)

    @property
    def issuer_profile(self) -> IssuerProfile:
        return self._issuer

    def _sign_tbs(self, tbs_certificate: bytes) -> bytes:
        """For svid.py only: sign a TBSCertificate built with issuer_profile. Private because
        it would sign anything, a CA certificate included."""
        return self._sign(tbs_certificate)

    def _chain_to_root(self) -> tuple[x509.Certificate, ...]:
        if self._certificate == self._root:
            return (self._root,)
        return (self._certificate, *self._intermediates, self._root)

    def _private_key_pkcs8_der(self) -> bytes:
        """For kek.seal_ca only: the one place the key is serialized, and only to be encrypted."""
        return self._key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _public_der(key: object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return b""  # never equal to an accepted key's encoding
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_key_matches(certificate: x509.Certificate, key: AcceptedPrivateKey) -> None:
    if _public_der(certificate.public_key()) != _public_der(key.public_key()):
        raise InvalidCA("private key does not match the certificate")


def subject_of(certificate: x509.Certificate) -> str:
    return repr(certificate.subject.rfc4514_string())


def _check_chain_links(
    certificate: x509.Certificate,
    intermediates: tuple[x509.Certificate, ...],
    root: x509.Certificate,
) -> None:
    chain = (certificate,) if certificate == root else (certificate, *intermediates, root)
    for child, parent in zip(chain, (*chain[1:], root), strict=True):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            if child == parent:
                raise InvalidCA(
                    f"root {subject_of(root)} is not self-signed; include its issuer"
                ) from None
            raise InvalidCA(
                f"certificate {subject_of(child)} is not issued by {subject_of(parent)}"
            ) from None


def _signer(key: AcceptedPrivateKey) -> tuple[_Sign, bytes]:
    """A signing function and the AlgorithmIdentifier DER it produces, chosen once per CA."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if isinstance(key.curve, ec.SECP384R1):
            ecdsa384 = ec.ECDSA(hashes.SHA384())
            return (lambda data: key.sign(data, ecdsa384)), _der.ALG_ECDSA_SHA384
        ecdsa256 = ec.ECDSA(hashes.SHA256())
        return (lambda data: key.sign(data, ecdsa256)), _der.ALG_ECDSA_SHA256
    pkcs1, sha256 = padding.PKCS1v15(), hashes.SHA256()
    return (lambda data: key.sign(data, pkcs1, sha256)), _der.ALG_RSA_PKCS1_SHA256


def _issuer_profile(
    certificate: x509.Certificate,
    intermediates: tuple[x509.Certificate, ...],
    root: x509.Certificate,
    signature_algorithm: bytes,
) -> IssuerProfile:
    try:
        ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        public_key = certificate.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise InvalidCA("CA key type is not accepted") from None
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key)
    served = () if certificate == root else (certificate, *intermediates)
    return IssuerProfile(
        name_der=_der.tbs_subject(certificate.tbs_certificate_bytes),
        authority_key_id_extension=_der.extension(
            _der.OID_AUTHORITY_KEY_ID, False, aki.public_bytes()
        ),
        signature_algorithm=signature_algorithm,
        served_chain_pem=b"".join(c.public_bytes(serialization.Encoding.PEM) for c in served),
    )


# --- builtin ---------------------------------------------------------------------------


def _generate_key(algorithm: KeyAlgorithm) -> AcceptedPrivateKey:
    match algorithm:
        case KeyAlgorithm.ECDSA_P256:
            return ec.generate_private_key(ec.SECP256R1())
        case KeyAlgorithm.ECDSA_P384:
            return ec.generate_private_key(ec.SECP384R1())
        case KeyAlgorithm.RSA_2048:
            return rsa.generate_private_key(65537, 2048)
        case KeyAlgorithm.RSA_3072:
            return rsa.generate_private_key(65537, 3072)


def _root_name(mesh: str, trust_domain: str, key_id: bytes) -> x509.Name:
    # The key id in CN tells an old root from a new one during rotation.
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"mesh {mesh}"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Verity root CA {key_id.hex()[:12]}"),
        ]
    )


def generate_builtin_ca(
    mesh: str,
    trust_domain: str,
    now: datetime,
    *,
    key_algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256,
    validity: timedelta = DEFAULT_ROOT_VALIDITY,
) -> CertificateAuthority:
    """Generate a fresh self-signed root for `mesh` and return it as the mesh's CA."""
    now = as_utc(now)
    validate_trust_domain(trust_domain)
    if validity <= BACKDATE:
        raise ValueError("root validity must be longer than the clock-skew backdating")
    key = _generate_key(key_algorithm)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    name = _root_name(mesh, trust_domain, ski.digest)
    root_key_usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + validity)
        # pathLen 0: the builtin root signs leaves only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(root_key_usage, critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SCHEME + trust_domain)]),
            critical=False,
        )
        .sign(key, hashes.SHA384() if key_algorithm is KeyAlgorithm.ECDSA_P384 else hashes.SHA256())
    )
    return CertificateAuthority(
        kind=CAKind.BUILTIN,
        mesh=mesh,
        trust_domain=trust_domain,
        certificate=certificate,
        intermediates=(),
        root=certificate,
        private_key=key,
    )
