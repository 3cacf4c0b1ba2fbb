"""Validation of a user-provided CA (root or intermediate, certificate chain and key, PEM).

Refused with InvalidCA and a precise reason ("provided CA: ..."): a certificate that is not
a CA, lacks keyCertSign, is expired or not yet valid, uses a weak key (see keys.py) or a
SHA-1/MD5 signature, a key that does not match, a chain that does not link up to a
self-signed root, a pathLenConstraint the chain violates, or nameConstraints that exclude
the mesh's trust domain. Imperfections that still work (basicConstraints not critical, no
subjectKeyIdentifier) are accepted and listed in CertificateAuthority.warnings.

With an intermediate, leaves are served with the intermediate and its issuers below the
root; the root goes into the trust bundle.
"""

from __future__ import annotations

from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from verity.pki._time import as_utc
from verity.pki.ca import CAKind, CertificateAuthority, subject_of
from verity.pki.errors import InvalidCA, InvalidSpiffeId
from verity.pki.keys import AcceptedPrivateKey, accepted_private_key, hash_problem, key_problem
from verity.pki.spiffe_id import validate_trust_domain


def load_provided_ca(
    mesh: str,
    trust_domain: str,
    certificate_pem: bytes,
    private_key_pem: bytes,
    now: datetime,
    *,
    root_pem: bytes | None = None,
) -> CertificateAuthority:
    """Validate a user's root or intermediate CA and return it, or raise InvalidCA.

    certificate_pem holds the signing certificate first, then its issuers in order; the
    root may end that chain or come as root_pem. Every message starts with "provided CA: ".
    """
    try:
        return _load_provided(
            mesh, trust_domain, certificate_pem, private_key_pem, as_utc(now), root_pem
        )
    except InvalidCA as exc:
        raise InvalidCA(f"provided CA: {exc}") from None


def _load_provided(
    mesh: str,
    trust_domain: str,
    certificate_pem: bytes,
    private_key_pem: bytes,
    now: datetime,
    root_pem: bytes | None,
) -> CertificateAuthority:
    try:
        validate_trust_domain(trust_domain)
    except InvalidSpiffeId as exc:
        raise InvalidCA(str(exc)) from None
    chain = _provided_chain(certificate_pem, root_pem)
    warnings: list[str] = []
    # Each certificate's own properties first: they give the most useful reason (an
    # expired or SHA-1 root would otherwise surface as "does not verify").
    for position, certificate in enumerate(chain):
        label = "certificate" if position == 0 else f"issuer #{position} {subject_of(certificate)}"
        warnings += _check_ca_certificate(certificate, label, now, position)
        _check_name_constraints(certificate, label, trust_domain)
    if not _is_self_signed(chain[-1]):
        raise InvalidCA(
            f"chain ends at {subject_of(chain[-1])}, which is not a self-signed root; "
            "include the root certificate"
        )
    key = _load_private_key(private_key_pem)
    return CertificateAuthority(
        kind=CAKind.PROVIDED,
        mesh=mesh,
        trust_domain=trust_domain,
        certificate=chain[0],
        intermediates=chain[1:-1],
        root=chain[-1],
        private_key=key,
        warnings=warnings,
    )


def _parse_certificates(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise InvalidCA(f"{what} PEM could not be parsed ({exc})") from None
    if not certificates:
        raise InvalidCA(f"{what} PEM holds no certificate")
    return certificates


def _is_self_signed(certificate: x509.Certificate) -> bool:
    if certificate.issuer != certificate.subject:
        return False
    try:
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _provided_chain(certificate_pem: bytes, root_pem: bytes | None) -> list[x509.Certificate]:
    chain = _parse_certificates(certificate_pem, "certificate")
    if root_pem is not None:
        roots = _parse_certificates(root_pem, "root")
        if len(roots) != 1:
            raise InvalidCA(f"root PEM must hold exactly one certificate, it holds {len(roots)}")
        if chain[-1] != roots[0]:
            chain.append(roots[0])
    return chain


def _load_private_key(pem: bytes) -> AcceptedPrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise InvalidCA("private key is encrypted; provide it decrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        # The parser's message could quote key material; say only what failed.
        raise InvalidCA("private key PEM could not be parsed") from None
    try:
        return accepted_private_key(key)
    except ValueError as exc:
        raise InvalidCA(f"private key: {exc}") from None


def _check_ca_certificate(
    certificate: x509.Certificate, label: str, now: datetime, below: int
) -> list[str]:
    """Refuse an unusable CA certificate; return warnings for acceptable imperfections.

    `below` is how many CA certificates sit between this one and the leaves it vouches for.
    """
    warnings: list[str] = []
    extensions = certificate.extensions
    try:
        constraints = extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        raise InvalidCA(f"{label} is not a CA (no basicConstraints extension)") from None
    if not constraints.value.ca:
        raise InvalidCA(f"{label} is not a CA (basicConstraints CA:false)")
    if not constraints.critical:
        warnings.append(f"{label}: basicConstraints is not marked critical")
    path_length = constraints.value.path_length
    if path_length is not None and path_length < below:
        raise InvalidCA(f"{label} has pathLenConstraint {path_length}, the chain needs {below}")
    try:
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise InvalidCA(f"{label} has no keyUsage extension (keyCertSign required)") from None
    if not usage.key_cert_sign:
        raise InvalidCA(f"{label} keyUsage lacks keyCertSign")
    if now < certificate.not_valid_before_utc:
        raise InvalidCA(
            f"{label} is not valid yet (notBefore {certificate.not_valid_before_utc.isoformat()})"
        )
    if now >= certificate.not_valid_after_utc:
        raise InvalidCA(f"{label} expired (notAfter {certificate.not_valid_after_utc.isoformat()})")
    problem = key_problem(certificate.public_key())
    if problem is not None:
        raise InvalidCA(f"{label} key: {problem}")
    try:
        problem = hash_problem(certificate.signature_hash_algorithm)
    except UnsupportedAlgorithm:
        oid = certificate.signature_algorithm_oid.dotted_string
        problem = f"signature algorithm {oid} is unknown"
    if problem is not None:
        raise InvalidCA(f"{label} {problem}")
    try:
        extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        warnings.append(f"{label}: no subjectKeyIdentifier extension")
    return warnings


def _uri_constraint_matches(constraint: str, host: str) -> bool:
    """RFC 5280 4.2.1.10: a URI constraint names a host, or with a leading '.' its subdomains."""
    if constraint.startswith("."):
        return host.endswith(constraint)
    return host == constraint


def _uri_constraints(subtrees: list[x509.GeneralName] | None) -> list[str]:
    return [n.value for n in subtrees or () if isinstance(n, x509.UniformResourceIdentifier)]


def _check_name_constraints(certificate: x509.Certificate, label: str, trust_domain: str) -> None:
    """A provided CA whose nameConstraints exclude our SPIFFE IDs would issue dead leaves."""
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return
    permitted = _uri_constraints(constraints.permitted_subtrees)
    excluded = _uri_constraints(constraints.excluded_subtrees)
    if permitted and not any(_uri_constraint_matches(c, trust_domain) for c in permitted):
        raise InvalidCA(
            f"{label} nameConstraints do not permit URIs in trust domain {trust_domain!r}"
        )
    if any(_uri_constraint_matches(c, trust_domain) for c in excluded):
        raise InvalidCA(f"{label} nameConstraints exclude URIs in trust domain {trust_domain!r}")
