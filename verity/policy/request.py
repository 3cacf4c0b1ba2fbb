"""What the reference evaluator is asked about: one request (or TCP connection) to a workload.

The fields are the attributes Envoy sees on the receiving side, spelled as a caller of
`verity check` knows them:

- `source_principal`: the peer's SPIFFE ID from its client certificate, with or without the
  `spiffe://` prefix; None for a plaintext peer (principals and namespaces never match it).
- `source_ip`: the direct peer address (Istio `ipBlocks`, `source.ip`).
- `remote_ip`: the original client address as derived from X-Forwarded-For (Istio
  `remoteIpBlocks`, `remote.ip`). Verity's inbound listeners trust no proxy hops, so for them
  this is the peer address: None means "same as `source_ip`" (always so on TCP).
- `token`: the JWT the client presents (None: no token). Whether it counts depends on the
  RequestAuthentications that select the workload.
- `host`, `method`, `path` (as sent: query strings and dot segments allowed), `headers`.
- `destination_ip`, `destination_port`: the address the client connected to (the sidecar's
  inbound port); `sni`: the TLS server name the client asked for.
- `protocol`: "http", or "tcp" for a connection to a TCP port (no HTTP attributes).
- `filter_metadata`: dynamic metadata other Envoy filters set, by filter name (what the
  experimental `experimental.envoy.filters.*` condition keys read); rarely needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

RequestProtocol = Literal["http", "tcp"]
SPIFFE_PREFIX = "spiffe://"


@dataclass(frozen=True)
class Token:
    """A JWT's payload; `valid` is False when its signature or lifetime does not verify."""

    claims: Mapping[str, object]
    valid: bool = True

    @classmethod
    def of(
        cls,
        iss: str,
        sub: str,
        *,
        aud: str | list[str] | None = None,
        azp: str | None = None,
        valid: bool = True,
        **claims: object,
    ) -> Token:
        payload: dict[str, object] = {"iss": iss, "sub": sub, **claims}
        if aud is not None:
            payload["aud"] = aud
        if azp is not None:
            payload["azp"] = azp
        return cls(payload, valid)

    @property
    def issuer(self) -> str | None:
        value = self.claims.get("iss")
        return value if isinstance(value, str) else None

    @property
    def audiences(self) -> tuple[str, ...]:
        value = self.claims.get("aud")
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list):
            return tuple(v for v in value if isinstance(v, str))
        return ()


@dataclass(frozen=True)
class Request:
    """One request (or TCP connection) as the receiving sidecar sees it."""

    source_principal: str | None = None
    source_ip: str = "127.0.0.1"
    remote_ip: str | None = None
    token: Token | None = None
    host: str = ""
    method: str = "GET"
    path: str = "/"
    headers: Mapping[str, str] = field(default_factory=dict)
    destination_ip: str | None = None
    destination_port: int | None = None
    sni: str | None = None
    protocol: RequestProtocol = "http"
    filter_metadata: Mapping[str, Mapping[str, object]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Header names are case-insensitive: keep one spelling.
        object.__setattr__(self, "headers", {k.lower(): v for k, v in self.headers.items()})
        principal = self.source_principal
        if principal is not None and not principal.startswith(SPIFFE_PREFIX):
            object.__setattr__(self, "source_principal", SPIFFE_PREFIX + principal)

    @property
    def peer_address(self) -> str:
        """The client address the sidecar trusts (X-Forwarded-For applied; a TCP connection
        has no such header, so there it is the peer)."""
        if self.remote_ip is None or self.protocol == "tcp":
            return self.source_ip
        return self.remote_ip

    def describe(self) -> str:
        who = self.source_principal or "plaintext peer"
        if self.protocol == "tcp":
            return f"TCP connection from {who} ({self.source_ip}) to port {self.destination_port}"
        return f"{self.method} {self.host}{self.path} from {who} ({self.source_ip})"
