"""The attribute tests an authorization rule is made of, with Envoy's matching semantics.

Istio compiles every AuthorizationPolicy field into Envoy RBAC matchers; Verity does the same
in two steps. `verity.policy.authz` turns Istio fields into the `Condition`s below (the same
ones Istio generates), and then:

- `Condition.holds(attributes)` evaluates them here (the reference evaluator), and
- `verity.xds.rbac` emits each as the Envoy matcher of the same meaning.

Both sides read one description, so they cannot drift apart; a differential test against
real Envoy checks that the two readings agree.

Conditions are either principal-side (who: peer identity, addresses, headers, JWT claims) or
permission-side (what: host, method, path, destination, SNI), as in Envoy's RBAC Policy.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from verity.policy.request import Request

MatchKind = Literal["exact", "prefix", "suffix", "regex", "present"]
_REGEX_SPECIALS = frozenset("\\.^$|?*+()[]{}")


def regex_literal(text: str) -> str:
    """`text` as a regex matching itself, in the syntax RE2 and Python share."""
    return "".join(f"\\{c}" if c in _REGEX_SPECIALS else c for c in text)


@lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.DOTALL)


@dataclass(frozen=True)
class StringMatch:
    """Envoy's StringMatcher (and `present` of its HeaderMatcher); `regex` is a full match."""

    kind: MatchKind
    value: str = ""
    ignore_case: bool = False

    def matches(self, actual: str | None) -> bool:
        if actual is None:
            return False
        if self.kind == "present":
            return True
        if self.kind == "regex":
            return _compiled(self.value).fullmatch(actual) is not None
        value = self.value
        if self.ignore_case:
            actual, value = actual.lower(), value.lower()
        if self.kind == "exact":
            return actual == value
        if self.kind == "prefix":
            return actual.startswith(value)
        return actual.endswith(value)

    def describe(self) -> str:
        case = " (any case)" if self.ignore_case else ""
        if self.kind == "present":
            return "present"
        return f"{self.kind} {self.value!r}{case}"


def istio_string(value: str, *, prefix: str = "") -> StringMatch:
    """Istio's string rule (`*` alone, `abc*`, `*abc`, exact), as istiod generates it.

    `prefix` is prepended to what is matched (e.g. `spiffe://` for principals); a suffix
    match with a prefix becomes a regex, since both ends are then fixed.
    """
    if value == "*":
        return StringMatch("regex", ".+")
    if value.startswith("*"):
        rest = value[1:]
        if prefix:
            return StringMatch("regex", regex_literal(prefix) + ".*" + regex_literal(rest))
        return StringMatch("suffix", rest)
    if value.endswith("*"):
        return StringMatch("prefix", prefix + value[:-1])
    return StringMatch("exact", prefix + value)


def header_string(value: str, *, ignore_case: bool = False) -> StringMatch:
    """Istio's header rule: `*` means the header is present (even if empty)."""
    if value == "*":
        return StringMatch("present")
    if value.startswith("*"):
        return StringMatch("suffix", value[1:], ignore_case)
    if value.endswith("*"):
        return StringMatch("prefix", value[:-1], ignore_case)
    return StringMatch("exact", value, ignore_case)


# --- paths -------------------------------------------------------------------------------------

# Characters Envoy's path normalization (RFC 3986, Chromium's URL canonicalizer) leaves as
# they are; every other byte is percent-encoded. Unreserved characters that arrive encoded
# (%41, %2E, %7E) are decoded.
_PATH_KEEP = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@/%"
)
_UNRESERVED = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~")
_PCHAR = r"[a-zA-Z0-9\-._~%!$&'()+,;:@=]"


def normalize_path(raw: str) -> str:
    """The path RBAC matches: query removed, as Envoy normalizes it (`normalize_path` and
    `merge_slashes` on the inbound HTTP connection manager)."""
    path = raw.split("?", 1)[0].replace("\\", "/")
    path = _remove_dot_segments(_canonical_escapes(path))
    return re.sub("/{2,}", "/", path) or "/"


def _canonical_escapes(path: str) -> str:
    out: list[str] = []
    index = 0
    while index < len(path):
        char = path[index]
        escape = path[index + 1 : index + 3]
        if char == "%" and len(escape) == 2 and all(c in "0123456789abcdefABCDEF" for c in escape):
            decoded = chr(int(escape, 16))
            out.append(decoded if decoded in _UNRESERVED else "%" + escape)
            index += 3
            continue
        out.append(char if char in _PATH_KEEP else "".join(f"%{b:02X}" for b in char.encode()))
        index += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4, on an absolute path."""
    segments = path.split("/")[1:]
    output: list[str] = []
    for position, segment in enumerate(segments):
        last = position == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
        elif segment == "..":
            if output:
                output.pop()
            if last:
                output.append("")
        else:
            output.append(segment)
    return "/" + "/".join(output)


def template_regex(template: str) -> str:
    """Envoy's `uri_template` (`*` one segment, `**` any segments after it) as a regex."""
    parts = []
    for segment in template.split("/"):
        if segment == "**":
            parts.append(f"(?:{_PCHAR}|/)*")
        elif segment == "*":
            parts.append(f"{_PCHAR}+")
        else:
            parts.append(regex_literal(segment))
    return "/".join(parts)


def istio_path_template(value: str) -> str:
    """Istio's `{*}` / `{**}` path as an Envoy `uri_template`."""
    return value.replace("{**}", "**").replace("{*}", "*")


# --- the attributes of one request -----------------------------------------------------------


@dataclass(frozen=True)
class Attributes:
    """What the RBAC filters see: the request plus the JWT payload that passed authentication."""

    request: Request
    jwt: Mapping[str, object] | None
    path: str | None

    @classmethod
    def of(cls, request: Request, jwt: Mapping[str, object] | None) -> Attributes:
        path = normalize_path(request.path) if request.protocol == "http" else None
        return cls(request, jwt, path)

    def header(self, name: str) -> str | None:
        if self.request.protocol != "http":
            return None
        if name == ":authority":
            return self.request.host
        if name == ":method":
            return self.request.method
        if name == ":path":
            return self.request.path
        return self.request.headers.get(name)


# --- conditions --------------------------------------------------------------------------------


def _in_cidr(address: str | None, cidr: str) -> bool:
    if address is None:
        return False
    try:
        return ipaddress.ip_address(address) in ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return False


def cidr_of(block: str) -> str:
    """An Istio ipBlock ("10.0.0.1" or "10.0.0.0/8") as a CIDR with its host bits cleared."""
    return str(ipaddress.ip_network(block, strict=False))


@dataclass(frozen=True)
class PeerPrincipal:
    """The peer certificate's URI SAN (Envoy `authenticated.principal_name`); TLS only."""

    match: StringMatch

    def holds(self, attrs: Attributes) -> bool:
        return self.match.matches(attrs.request.source_principal)


@dataclass(frozen=True)
class DirectRemoteIp:
    """The direct peer address (Envoy `direct_remote_ip`)."""

    cidr: str

    def holds(self, attrs: Attributes) -> bool:
        return _in_cidr(attrs.request.source_ip, self.cidr)


@dataclass(frozen=True)
class RemoteIp:
    """The client address after X-Forwarded-For (Envoy `remote_ip`)."""

    cidr: str

    def holds(self, attrs: Attributes) -> bool:
        return _in_cidr(attrs.request.peer_address, self.cidr)


@dataclass(frozen=True)
class Header:
    """An HTTP header (`:authority` and `:method` included); an absent header never matches."""

    name: str
    match: StringMatch

    def holds(self, attrs: Attributes) -> bool:
        return self.match.matches(attrs.header(self.name))


@dataclass(frozen=True)
class UrlPath:
    """The normalized path without its query (Envoy `url_path`)."""

    match: StringMatch

    def holds(self, attrs: Attributes) -> bool:
        return self.match.matches(attrs.path)


@dataclass(frozen=True)
class PathTemplate:
    """A path template (Envoy `uri_template`): `*` one segment, `**` the rest."""

    template: str

    def holds(self, attrs: Attributes) -> bool:
        if attrs.path is None:
            return False
        return _compiled(template_regex(self.template)).fullmatch(attrs.path) is not None


@dataclass(frozen=True)
class DestinationIp:
    cidr: str

    def holds(self, attrs: Attributes) -> bool:
        return _in_cidr(attrs.request.destination_ip, self.cidr)


@dataclass(frozen=True)
class DestinationPort:
    port: int

    def holds(self, attrs: Attributes) -> bool:
        return attrs.request.destination_port == self.port


@dataclass(frozen=True)
class ServerName:
    """The TLS SNI the client asked for (Envoy `requested_server_name`)."""

    match: StringMatch

    def holds(self, attrs: Attributes) -> bool:
        return self.match.matches(attrs.request.sni)


@dataclass(frozen=True)
class JwtClaim:
    """A claim of the verified JWT payload at `path` (nested keys): a string matches if one
    of `matches` does; with `lists`, a list matches if one of its strings does."""

    path: tuple[str, ...]
    matches: tuple[StringMatch, ...]
    lists: bool = True

    def holds(self, attrs: Attributes) -> bool:
        return _value_matches(claim_value(attrs.jwt, self.path), self.matches, self.lists)


@dataclass(frozen=True)
class FilterMetadata:
    """Dynamic metadata another filter set (`experimental.envoy.filters.<filter>[<key>]`).

    Each of `matches` is (matcher, in_list): a string value matched by the matcher, or (when
    `in_list`, Istio's `[value]` syntax) a list holding a string the matcher matches.
    """

    filter: str
    key: str
    matches: tuple[tuple[StringMatch, bool], ...]

    def holds(self, attrs: Attributes) -> bool:
        value = attrs.request.filter_metadata.get(self.filter, {}).get(self.key)
        for match, in_list in self.matches:
            if in_list and isinstance(value, list):
                if any(isinstance(v, str) and match.matches(v) for v in value):
                    return True
            elif not in_list and isinstance(value, str) and match.matches(value):
                return True
        return False


def _value_matches(value: object, matches: Sequence[StringMatch], lists: bool) -> bool:
    if isinstance(value, str):
        return any(m.matches(value) for m in matches)
    if lists and isinstance(value, list):
        strings = [v for v in value if isinstance(v, str)]
        return any(m.matches(v) for v in strings for m in matches)
    return False


def claim_value(payload: Mapping[str, object] | None, path: Sequence[str]) -> object:
    value: object = payload
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


@dataclass(frozen=True)
class AnyOf:
    items: tuple[Condition, ...]

    def holds(self, attrs: Attributes) -> bool:
        return any(item.holds(attrs) for item in self.items)


@dataclass(frozen=True)
class AllOf:
    items: tuple[Condition, ...]

    def holds(self, attrs: Attributes) -> bool:
        return all(item.holds(attrs) for item in self.items)


@dataclass(frozen=True)
class Not:
    item: Condition

    def holds(self, attrs: Attributes) -> bool:
        return not self.item.holds(attrs)


@dataclass(frozen=True)
class Never:
    """Matches nothing (e.g. the sources of a TrafficPermission whose services have no
    instances)."""

    def holds(self, attrs: Attributes) -> bool:
        del attrs
        return False


Condition = (
    PeerPrincipal
    | DirectRemoteIp
    | RemoteIp
    | Header
    | UrlPath
    | PathTemplate
    | DestinationIp
    | DestinationPort
    | ServerName
    | JwtClaim
    | FilterMetadata
    | AnyOf
    | AllOf
    | Not
    | Never
)
