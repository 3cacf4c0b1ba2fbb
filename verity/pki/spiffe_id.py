"""SPIFFE IDs of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.

Validation follows the SPIFFE ID specification: lowercase trust domain of [a-z0-9.-_],
path segments of [a-zA-Z0-9.-_] that are neither empty nor '.'/'..', no percent-encoding,
query, fragment, port or userinfo. Verity additionally fixes the path shape to ns/sa so that
namespace-based policy (Istio `namespaces`) can be derived from the ID alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from verity.pki.errors import InvalidSpiffeId

SCHEME = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

_TRUST_DOMAIN_CHARS = re.compile(r"[a-z0-9._-]+")
_SEGMENT_CHARS = re.compile(r"[a-zA-Z0-9._-]+")


def validate_trust_domain(trust_domain: str) -> str:
    """Return the trust domain unchanged if valid, else raise InvalidSpiffeId with the reason."""
    if not trust_domain:
        raise InvalidSpiffeId("trust domain is empty")
    if len(trust_domain.encode()) > MAX_TRUST_DOMAIN_BYTES:
        raise InvalidSpiffeId(f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes")
    if "@" in trust_domain:
        raise InvalidSpiffeId(f"trust domain {trust_domain!r} contains userinfo ('@')")
    if ":" in trust_domain:
        raise InvalidSpiffeId(f"trust domain {trust_domain!r} contains a port (':')")
    if "%" in trust_domain:
        raise InvalidSpiffeId(f"trust domain {trust_domain!r} is percent-encoded")
    if trust_domain.lower() != trust_domain:
        raise InvalidSpiffeId(f"trust domain {trust_domain!r} must be lowercase")
    if not _TRUST_DOMAIN_CHARS.fullmatch(trust_domain):
        raise InvalidSpiffeId(
            f"trust domain {trust_domain!r} may contain only a-z, 0-9, '.', '-' and '_'"
        )
    return trust_domain


def _validate_segment(what: str, segment: str) -> str:
    if not segment:
        raise InvalidSpiffeId(f"{what} is empty")
    if segment in (".", ".."):
        raise InvalidSpiffeId(f"{what} must not be '.' or '..'")
    if "%" in segment:
        raise InvalidSpiffeId(f"{what} {segment!r} is percent-encoded")
    if not _SEGMENT_CHARS.fullmatch(segment):
        raise InvalidSpiffeId(
            f"{what} {segment!r} may contain only letters, digits, '.', '-' and '_'"
        )
    return segment


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A validated workload identity; `str()` gives the URI."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        _validate_segment("namespace", self.namespace)
        _validate_segment("service account", self.service_account)
        if len(str(self).encode()) > MAX_ID_BYTES:
            raise InvalidSpiffeId(f"SPIFFE ID is longer than {MAX_ID_BYTES} bytes")

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def uri(self) -> str:
        return str(self)

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse `spiffe://td/ns/<ns>/sa/<sa>`; raise InvalidSpiffeId naming what is wrong."""
        if not text.startswith(SCHEME):
            raise InvalidSpiffeId(f"{text!r} does not start with {SCHEME!r}")
        rest = text[len(SCHEME) :]
        if "?" in rest:
            raise InvalidSpiffeId(f"{text!r} has a query ('?')")
        if "#" in rest:
            raise InvalidSpiffeId(f"{text!r} has a fragment ('#')")
        trust_domain, _, path = rest.partition("/")
        validate_trust_domain(trust_domain)
        segments = path.split("/")
        if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
            raise InvalidSpiffeId(
                f"{text!r} does not have the path /ns/<namespace>/sa/<service-account>"
            )
        return cls(trust_domain, segments[1], segments[3])

    @classmethod
    def build(cls, trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
        return cls(trust_domain, namespace, service_account)
