"""Issuing X.509-SVIDs from CSRs.

The identity comes from the caller (the authenticated dataplane token), never from the CSR.
Whatever subject, SANs, basicConstraints or other extensions a CSR asks for are ignored, not
refused: the CSR serves only as proof of possession of the public key, and the leaf always
gets exactly the caller's SPIFFE ID and the fixed extension set below. (Refusing instead
would make agents depend on building a CSR exactly to our taste, for no security gain.)
What IS refused (InvalidCSR): unparseable CSRs, bad signatures, weak hashes and keys other
than ECDSA P-256/P-384 or RSA 2048-8192 (see keys.py; Ed25519 is refused with the reason).

Leaves follow the SPIFFE X.509-SVID specification: one URI SAN (critical, since the subject
is empty), basicConstraints CA:false (critical), keyUsage digitalSignature (+keyEncipherment
for RSA keys) (critical), extKeyUsage serverAuth+clientAuth, subject and authority key
identifiers, a 159-bit random serial, validity backdated for clock skew and never beyond
the CA chain's own notAfter.

Speed: the leaf's TBSCertificate is concatenated from DER pieces fixed per process (the
extension values) or per CA (issuer name, AKI, signature algorithm; CertificateAuthority
caches them), so each issuance costs one CSR signature check, one signature and a little
byte-joining. Tests check the bytes equal cryptography's CertificateBuilder output.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, SignatureAlgorithmOID

from verity.pki import _der
from verity.pki._time import as_utc, whole_seconds
from verity.pki.ca import BACKDATE, CertificateAuthority
from verity.pki.errors import InvalidCSR, IssuanceRefused
from verity.pki.keys import AcceptedPublicKey, hash_problem, key_problem
from verity.pki.revocation import RevocationList, ensure_not_revoked
from verity.pki.spiffe_id import SpiffeId

DEFAULT_SVID_VALIDITY = timedelta(hours=24)
SERIAL_BITS = 159  # 20 DER bytes at most, sign bit clear; RFC 5280 caps serials at 20 octets
MIN_SERIAL_BITS = 64  # CA/Browser Forum minimum of serial entropy


def _key_usage(*, key_encipherment: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _fixed_extensions(*, key_encipherment: bool) -> bytes:
    return b"".join(
        (
            _der.extension(
                _der.OID_BASIC_CONSTRAINTS,
                True,
                x509.BasicConstraints(ca=False, path_length=None).public_bytes(),
            ),
            _der.extension(
                _der.OID_KEY_USAGE,
                True,
                _key_usage(key_encipherment=key_encipherment).public_bytes(),
            ),
            _der.extension(
                _der.OID_EXTENDED_KEY_USAGE,
                False,
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ).public_bytes(),
            ),
        )
    )


# RSA keys may also be used for key transport (TLS 1.2 RSA key exchange): RFC 5280 usage.
_FIXED_EXTENSIONS_EC = _fixed_extensions(key_encipherment=False)
_FIXED_EXTENSIONS_RSA = _fixed_extensions(key_encipherment=True)


@dataclass(frozen=True, slots=True)
class IssuedSvid:
    """A freshly signed leaf. chain_pem is what a proxy serves: the leaf, then intermediates
    (empty for a root CA); the root is not included, it travels in the trust bundle."""

    spiffe_id: SpiffeId
    serial: int
    not_before: datetime
    not_after: datetime
    cert_pem: bytes
    chain_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


def _accepted_csr_key(csr_pem: bytes) -> AcceptedPublicKey:
    """The CSR's public key, once the CSR has proved possession of it with a strong signature."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidCSR(f"CSR could not be parsed as a PEM certificate request ({exc})") from None
    # Key first: refusing a weak or huge key must not cost a signature check.
    problem = key_problem(key)
    if problem is not None or not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise InvalidCSR(f"CSR key refused: {problem}")
    try:
        problem = hash_problem(csr.signature_hash_algorithm)
    except UnsupportedAlgorithm:
        problem = f"signature algorithm {csr.signature_algorithm_oid.dotted_string} is unknown"
    if problem is not None:
        raise InvalidCSR(f"CSR {problem}")
    if not _signature_valid(csr, key):
        raise InvalidCSR("CSR signature does not verify: no proof of possession of the key")
    return key


_ECDSA_SIGNATURES = {
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: ec.ECDSA(hashes.SHA256()),
    SignatureAlgorithmOID.ECDSA_WITH_SHA384: ec.ECDSA(hashes.SHA384()),
    SignatureAlgorithmOID.ECDSA_WITH_SHA512: ec.ECDSA(hashes.SHA512()),
}


def _signature_valid(csr: x509.CertificateSigningRequest, key: AcceptedPublicKey) -> bool:
    """Same check as csr.is_signature_valid, but for EC keys with the key already loaded,
    which saves reloading it (about a sixth of the cost of an issuance)."""
    if isinstance(key, rsa.RSAPublicKey):
        return csr.is_signature_valid  # covers PKCS#1 v1.5 and PSS parameters
    algorithm = _ECDSA_SIGNATURES.get(csr.signature_algorithm_oid)
    if algorithm is None:
        return False  # an EC key with a non-ECDSA signature algorithm
    try:
        key.verify(csr.signature, csr.tbs_certrequest_bytes, algorithm)
    except InvalidSignature:
        return False
    return True


def _validity_window(
    ca: CertificateAuthority, now: datetime, validity: timedelta
) -> tuple[datetime, datetime]:
    if validity <= timedelta(0):
        raise IssuanceRefused(f"SVID validity must be positive, got {validity}")
    if now < ca.not_before:
        raise IssuanceRefused(f"CA {ca.subject!r} is not valid until {ca.not_before.isoformat()}")
    not_before = whole_seconds(max(now - BACKDATE, ca.not_before))
    not_after = whole_seconds(min(now + validity, ca.not_after))
    if not_after <= now:
        raise IssuanceRefused(f"CA {ca.subject!r} expired at {ca.not_after.isoformat()}")
    return not_before, not_after


def _random_serial() -> int:
    while True:  # a draw below 2**64 has probability 2**-95; redraw rather than pad
        serial = secrets.randbits(SERIAL_BITS)
        if serial.bit_length() >= MIN_SERIAL_BITS:
            return serial


# The SKI extension up to its 20-byte SHA-1 value: everything before the digest is constant.
_SKI_EXTENSION_HEADER = _der.extension(
    _der.OID_SUBJECT_KEY_ID, False, _der.tlv(_der.OCTET_STRING, bytes(20))
)[:-20]


@lru_cache(maxsize=4096)  # one entry per identity: replicas and renewals repeat them
def _san_extension(uri: str) -> bytes:
    return _der.extension(
        _der.OID_SUBJECT_ALT_NAME,
        True,  # critical: RFC 5280 4.2.1.6 requires it when the subject is empty
        _der.tlv(_der.SEQUENCE, _der.tlv(_der.URI_NAME, uri.encode("ascii"))),
    )


def build_tbs_certificate(
    ca: CertificateAuthority,
    public_key: AcceptedPublicKey,
    identity: SpiffeId,
    serial: int,
    not_before: datetime,
    not_after: datetime,
) -> bytes:
    """The leaf's TBSCertificate DER. Public so tests can compare it with CertificateBuilder."""
    issuer = ca.issuer_profile
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # RFC 5280 4.2.1.2 method (1), what cryptography's from_public_key computes; not security.
    key_id = hashlib.sha1(_der.spki_key_bits(spki), usedforsecurity=False).digest()
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    extensions = (
        (_FIXED_EXTENSIONS_RSA if is_rsa else _FIXED_EXTENSIONS_EC)
        + _san_extension(str(identity))
        + _SKI_EXTENSION_HEADER
        + key_id
        + issuer.authority_key_id_extension
    )
    return _der.tlv(
        _der.SEQUENCE,
        _der.VERSION_3
        + _der.positive_integer(serial)
        + issuer.signature_algorithm
        + issuer.name_der
        + _der.tlv(_der.SEQUENCE, _der.time(not_before) + _der.time(not_after))
        + _der.EMPTY_NAME
        + spki
        + _der.tlv(_der.CONTEXT_3, _der.tlv(_der.SEQUENCE, extensions)),
    )


def issue_svid(
    ca: CertificateAuthority,
    csr_pem: bytes,
    identity: SpiffeId,
    now: datetime,
    validity: timedelta = DEFAULT_SVID_VALIDITY,
    *,
    revocations: RevocationList | None = None,
) -> IssuedSvid:
    """Sign the CSR's key into an SVID for `identity`, which the caller has authenticated.

    Raises IdentityRevoked, IssuanceRefused (foreign trust domain, CA not valid, bad
    validity) or InvalidCSR. Checks that need no cryptography run first.
    """
    now = as_utc(now)
    if revocations is not None:
        ensure_not_revoked(revocations, identity)
    if identity.trust_domain != ca.trust_domain:
        raise IssuanceRefused(
            f"identity {identity} is outside the CA's trust domain {ca.trust_domain!r}"
        )
    not_before, not_after = _validity_window(ca, now, validity)
    public_key = _accepted_csr_key(csr_pem)
    serial = _random_serial()
    tbs = build_tbs_certificate(ca, public_key, identity, serial, not_before, not_after)
    signature = ca._sign_tbs(tbs)
    signature_value = _der.tlv(_der.BIT_STRING, b"\x00" + signature)  # no unused bits
    certificate = _der.tlv(
        _der.SEQUENCE, tbs + ca.issuer_profile.signature_algorithm + signature_value
    )
    cert_pem = _der.pem(certificate)
    return IssuedSvid(
        spiffe_id=identity,
        serial=serial,
        not_before=not_before,
        not_after=not_after,
        cert_pem=cert_pem,
        chain_pem=cert_pem + ca.issuer_profile.served_chain_pem,
    )
