"""A thin async client of the control plane's CA service (verity/protocol/ca.proto).

The channel is always TLS, verifying the control plane against the CA the agent was given at
join (`cp-ca.pem`); there is no insecure mode. Every call carries the dataplane token as
`authorization: Bearer <token>`. gRPC failures become the exceptions below, each with a
one-line reason the agent can log and the CLI can print. The token is never part of a repr,
an exception or a log line.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc

from verity.observe.logs import scrub
from verity.protocol import ca_pb2, ca_pb2_grpc

log = logging.getLogger("verity.cpclient")

DEFAULT_PORT = 5678
DEFAULT_TIMEOUT_S = 10.0
MAX_MESSAGE_BYTES = 4 << 20

# Keepalive finds a control plane that vanished without closing the connection (the watch
# stream is idle between bundle changes); the short reconnect cap gets the agent back soon
# after a control-plane restart. The CA service is reached directly: an http_proxy set for
# the workload's own traffic must not capture it.
_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_reconnect_backoff_ms", 5_000),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.enable_http_proxy", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


# ---------------------------------------------------------------------------------------------
# Errors


class ControlPlaneError(Exception):
    """A CA-service call failed; `str()` is a one-line reason, `code` the gRPC status name."""

    retryable = True

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code


class Unauthenticated(ControlPlaneError):
    """The token is missing, unknown, expired or revoked."""

    retryable = False


class PermissionDenied(ControlPlaneError):
    """The token's identity may not do this (e.g. register another identity's Dataplane)."""

    retryable = False


class InvalidArgument(ControlPlaneError):
    """The request was refused as malformed (a bad CSR, an invalid Dataplane)."""

    retryable = False


class FailedPrecondition(ControlPlaneError):
    """The control plane cannot serve this now (e.g. the mesh does not exist)."""

    retryable = False


class Unavailable(ControlPlaneError):
    """The control plane could not be reached (down, TLS failure, timeout, stream ended)."""


_BY_CODE: dict[str, type[ControlPlaneError]] = {
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": PermissionDenied,
    "INVALID_ARGUMENT": InvalidArgument,
    "FAILED_PRECONDITION": FailedPrecondition,
    "UNAVAILABLE": Unavailable,
    "DEADLINE_EXCEEDED": Unavailable,
    "CANCELLED": Unavailable,
}

_WHAT = {
    "UNAUTHENTICATED": "the control plane did not accept the dataplane token",
    "PERMISSION_DENIED": "the control plane refused (permission denied)",
    "INVALID_ARGUMENT": "the control plane refused the request as invalid",
    "FAILED_PRECONDITION": "the control plane cannot serve this request now",
    "UNAVAILABLE": "the control plane is unreachable",
    "DEADLINE_EXCEEDED": "the control plane did not answer in time",
    "CANCELLED": "the call was cancelled",
}


def map_error(code_name: str, details: str | None) -> ControlPlaneError:
    """The exception for a gRPC status (by name) and its details, scrubbed of any secret."""
    cls = _BY_CODE.get(code_name, ControlPlaneError)
    what = _WHAT.get(code_name, f"the control plane call failed ({code_name.lower()})")
    reason = scrub(" ".join((details or "").split()))[:500]
    return cls(f"{what}: {reason}" if reason else what, code_name)


def _from_rpc_error(exc: grpc.aio.AioRpcError) -> ControlPlaneError:
    code = exc.code()
    return map_error(code.name if code is not None else "UNKNOWN", exc.details())


# ---------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class ControlPlaneTarget:
    """Where the CA service is and how to verify it.

    `server_name` is the name the control plane's certificate carries when it differs from
    `host` (e.g. the agent connects by IP address); `ca_pem` is the CA given at join.
    """

    host: str
    port: int = DEFAULT_PORT
    ca_pem: bytes = field(default=b"", repr=False)
    server_name: str | None = None

    def __post_init__(self) -> None:
        if not self.host or any(c.isspace() or c in "/[]" for c in self.host):
            raise ValueError(f"control plane host {self.host!r}: not a host name or address")
        if not 0 < self.port < 65536:
            raise ValueError(f"control plane port {self.port}: not a TCP port")
        if b"-----BEGIN CERTIFICATE-----" not in self.ca_pem:
            raise ValueError("control plane CA: holds no PEM certificate")
        if self.server_name is not None and (
            not self.server_name or any(c.isspace() for c in self.server_name)
        ):
            raise ValueError(f"control plane server name {self.server_name!r}: not a name")

    @property
    def grpc_target(self) -> str:
        host = f"[{self.host}]" if _is_ipv6(self.host) else self.host
        return f"{host}:{self.port}"

    @property
    def verified_name(self) -> str:
        """The name the serving certificate must carry."""
        return self.server_name or self.host


def parse_address(address: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port`, or a bare host (default port) -> (host, port); ValueError."""
    text = address.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{address!r}: expected [IPv6]:PORT")
        port_text = rest[1:] if rest else ""
    elif text.count(":") > 1:
        raise ValueError(f"{address!r}: put an IPv6 address in brackets, [::1]:{DEFAULT_PORT}")
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"{address!r}: no host")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{address!r}: {port_text!r} is not a TCP port")
    return host, int(port_text)


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


@dataclass(frozen=True)
class Registration:
    namespace: str
    name: str
    resource_version: int


@dataclass(frozen=True)
class SignedCertificate:
    """What SignCertificate returned; the agent checks the leaf itself before serving it."""

    spiffe_id: str
    certificate_pem: bytes
    chain_pem: bytes  # intermediates, may be empty
    trust_bundle_pem: bytes
    not_before: datetime
    not_after: datetime
    serial_hex: str


@dataclass(frozen=True)
class BundleUpdate:
    """The mesh's trust bundle, as GetTrustBundle and the watch stream send it."""

    trust_domain: str
    trust_bundle_pem: bytes
    rotation_stage: str
    signing_root_fingerprint: str


@dataclass(frozen=True)
class AgentReport:
    """What the proxy has applied: sent on the watch stream after each ACKed change."""

    dataplane: str
    applied_root_fingerprints: tuple[str, ...]
    leaf_root_fingerprint: str
    leaf_serial_hex: str
    leaf_not_after_unix: int

    def to_proto(self) -> ca_pb2.AgentReport:
        return ca_pb2.AgentReport(
            dataplane=self.dataplane,
            applied_root_fingerprints=list(self.applied_root_fingerprints),
            leaf_root_fingerprint=self.leaf_root_fingerprint,
            leaf_serial_hex=self.leaf_serial_hex,
            leaf_not_after_unix=self.leaf_not_after_unix,
        )


def _bundle_update(message: ca_pb2.GetTrustBundleResponse) -> BundleUpdate:
    return BundleUpdate(
        trust_domain=message.trust_domain,
        trust_bundle_pem=bytes(message.trust_bundle_pem),
        rotation_stage=message.rotation_stage,
        signing_root_fingerprint=message.signing_root_fingerprint,
    )


def _utc(unix: int) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


def check_token(token: str) -> str:
    """The token, if it can go into a gRPC header; ValueError (never quoting it) otherwise."""
    if not token:
        raise ValueError("the dataplane token is empty")
    if any(c.isspace() or c == "\0" or not c.isprintable() for c in token):
        raise ValueError("the dataplane token holds spaces or control characters")
    return token


# ---------------------------------------------------------------------------------------------
# The client


class CaClient:
    """The CA service over one TLS channel. Use from one event loop; `close()` when done."""

    def __init__(
        self, target: ControlPlaneTarget, token: str, *, timeout: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {check_token(token)}"),)
        options: list[tuple[str, Any]] = list(_CHANNEL_OPTIONS)
        if target.server_name is not None:
            options.append(("grpc.ssl_target_name_override", target.server_name))
        credentials = grpc.ssl_channel_credentials(root_certificates=target.ca_pem)
        self._channel = grpc.aio.secure_channel(target.grpc_target, credentials, options=options)
        self._stub = ca_pb2_grpc.CertificateServiceStub(self._channel)

    def __repr__(self) -> str:
        return f"CaClient({self.target.grpc_target}, verified as {self.target.verified_name!r})"

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> CaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _from_rpc_error(exc) from None

    async def register_dataplane(self, dataplane_yaml: str) -> Registration:
        request = ca_pb2.RegisterDataplaneRequest(dataplane_yaml=dataplane_yaml)
        reply = await self._unary(self._stub.RegisterDataplane, request)
        return Registration(reply.namespace, reply.name, int(reply.resource_version))

    async def sign_certificate(self, csr_pem: bytes) -> SignedCertificate:
        reply = await self._unary(
            self._stub.SignCertificate, ca_pb2.SignCertificateRequest(csr_pem=csr_pem)
        )
        return SignedCertificate(
            spiffe_id=reply.spiffe_id,
            certificate_pem=bytes(reply.certificate_pem),
            chain_pem=bytes(reply.chain_pem),
            trust_bundle_pem=bytes(reply.trust_bundle_pem),
            not_before=_utc(reply.not_before_unix),
            not_after=_utc(reply.not_after_unix),
            serial_hex=reply.serial_hex,
        )

    async def get_trust_bundle(self) -> BundleUpdate:
        reply = await self._unary(self._stub.GetTrustBundle, ca_pb2.GetTrustBundleRequest())
        return _bundle_update(reply)

    def watch_trust_bundle(self) -> TrustBundleWatch:
        """Open the long-lived bundle stream (no deadline: it lasts as long as the agent)."""
        return TrustBundleWatch(self._stub.WatchTrustBundle(metadata=self._metadata))


class TrustBundleWatch:
    """One WatchTrustBundle stream: iterate it for updates, `send()` reports on it.

    Iteration ends only by an exception: Unavailable when the control plane ends the stream,
    or the mapped error of a failed call. `cancel()` ends it from this side.
    """

    def __init__(self, call: Any) -> None:
        self._call = call
        self._write_lock = asyncio.Lock()  # grpc.aio allows one pending write per call

    async def send(self, report: AgentReport) -> None:
        async with self._write_lock:
            try:
                await self._call.write(report.to_proto())
            except grpc.aio.AioRpcError as exc:
                raise _from_rpc_error(exc) from None
            except (asyncio.InvalidStateError, RuntimeError) as exc:
                # Writing to a call that has already finished.
                raise Unavailable(f"the watch stream is closed ({type(exc).__name__})") from None

    async def next(self) -> BundleUpdate:
        try:
            message = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise _from_rpc_error(exc) from None
        if message is grpc.aio.EOF:
            code = await self._call.code()
            if code is not None and code != grpc.StatusCode.OK:
                raise map_error(code.name, await self._call.details())
            raise Unavailable("the control plane ended the trust-bundle stream", "OK")
        return _bundle_update(message.bundle)

    def __aiter__(self) -> AsyncIterator[BundleUpdate]:
        return self._updates()

    async def _updates(self) -> AsyncIterator[BundleUpdate]:
        while True:
            yield await self.next()

    def cancel(self) -> None:
        self._call.cancel()
