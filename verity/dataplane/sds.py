"""The agent's local SDS server: hands Envoy its certificate and trust bundle over a Unix socket.

Secrets travel only here, never over ADS. Envoy finds this server through the static cluster
`SDS_CLUSTER` of its bootstrap; the control plane's listeners and clusters name the secrets
`CERT_SECRET` and `BUNDLE_SECRET` (see `sds_secret_config`). The protocol is xDS
state-of-the-world over gRPC: every `update()` pushes a new version to every subscribed
stream at once, and each stream's ACK or NACK is tracked so the agent can tell when a rotation
has reached Envoy (`acked_version`, `wait_acked`).

Who may connect is decided by the file system: the socket is 0600 inside a 0700 directory.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import socket
import stat
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.extensions.transport_sockets.tls.v3 import (
    common_pb2,
    secret_pb2,
    tls_spiffe_validator_config_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import any_pb2

from verity.dataplane.keys import WorkloadKey, check_spiffe_id, scrub_key_material

CERT_SECRET = "verity-svid"  # noqa: S105 - a name, not a secret
"""The `tls_certificate` secret: the workload's SVID chain and private key."""

BUNDLE_SECRET = "verity-trust-bundle"  # noqa: S105 - a name
"""The `validation_context` secret: the roots (or SPIFFE trust domains) peers are checked with."""

SDS_CLUSTER = "verity-sds"
"""The bootstrap's static cluster that reaches this server's Unix socket (HTTP/2)."""

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105
SPIFFE_VALIDATOR = "envoy.tls.cert_validator.spiffe"
MAX_NACK_MESSAGE = 300

log = logging.getLogger("verity.sds")


class InvalidSecret(ValueError):
    """A secret Envoy would reject or that would weaken trust; nothing was pushed."""


def sds_secret_config(name: str) -> dict[str, Any]:
    """The `SdsSecretConfig` (JSON form) a listener or cluster uses to fetch `name` from here."""
    return {
        "name": name,
        "sds_config": {
            "resource_api_version": "V3",
            "api_config_source": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": SDS_CLUSTER}}],
            },
        },
    }


# ---------------------------------------------------------------------------------------------
# The secrets


@dataclass(frozen=True, repr=False)
class CertificateSecret:
    """The SVID chain (leaf first, then intermediates) and its private key, both PEM.

    Checked on construction: the chain parses and the key is the leaf's, so a mismatched
    rotation fails here instead of in Envoy.
    """

    certificate_chain_pem: bytes
    private_key_pem: bytes = field(repr=False)
    leaf: x509.Certificate = field(init=False, compare=False)

    def __post_init__(self) -> None:
        try:
            chain = x509.load_pem_x509_certificates(self.certificate_chain_pem)
        except ValueError:
            raise InvalidSecret("certificate chain: not PEM certificates") from None
        try:
            key = serialization.load_pem_private_key(self.private_key_pem, password=None)
        except (ValueError, TypeError):
            raise InvalidSecret("private key: not an unencrypted PEM private key") from None
        if chain[0].public_key() != key.public_key():
            raise InvalidSecret("private key: does not match the leaf certificate")
        object.__setattr__(self, "leaf", chain[0])

    @classmethod
    def from_key(cls, key: WorkloadKey, certificate_chain_pem: bytes) -> CertificateSecret:
        return cls(certificate_chain_pem, key.private_key_pem())

    @property
    def serial(self) -> int:
        return self.leaf.serial_number

    def __repr__(self) -> str:
        return (
            f"CertificateSecret(serial={self.serial:x}, "
            f"not_after={self.leaf.not_valid_after_utc.isoformat()})"
        )


@dataclass(frozen=True)
class TrustBundle:
    """One or more root certificates (concatenated PEM) trusted for peers."""

    roots_pem: bytes

    def __post_init__(self) -> None:
        _check_roots("trust bundle", self.roots_pem)


@dataclass(frozen=True)
class SpiffeTrustBundle:
    """Roots per SPIFFE trust domain, checked by Envoy's SPIFFE validator.

    Stricter than `TrustBundle`: a peer is only trusted by the roots of its own trust domain,
    and leaves with CA:true or keyCertSign are refused.
    """

    trust_domains: Mapping[str, bytes]

    def __post_init__(self) -> None:
        if not self.trust_domains:
            raise InvalidSecret("SPIFFE trust bundle: needs at least one trust domain")
        for domain, roots in self.trust_domains.items():
            try:
                check_spiffe_id(f"spiffe://{domain}")
            except ValueError:
                raise InvalidSecret(f"SPIFFE trust bundle: bad trust domain {domain!r}") from None
            _check_roots(f"SPIFFE trust bundle {domain!r}", roots)


def _check_roots(label: str, roots_pem: bytes) -> None:
    try:
        roots = x509.load_pem_x509_certificates(roots_pem)
    except ValueError:
        raise InvalidSecret(f"{label}: not PEM certificates") from None
    for root in roots:
        try:
            is_ca = root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise InvalidSecret(f"{label}: serial {root.serial_number:x} is not a CA certificate")


def _pack(secret: Any) -> Any:
    packed = any_pb2.Any()
    packed.Pack(secret, deterministic=True)  # equal content, equal bytes: no needless push
    return packed


def _inline(data: bytes) -> Any:
    return base_pb2.DataSource(inline_bytes=data)


def certificate_proto(name: str, certificate: CertificateSecret) -> Any:
    return secret_pb2.Secret(
        name=name,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=_inline(certificate.certificate_chain_pem),
            private_key=_inline(certificate.private_key_pem),
        ),
    )


def bundle_proto(name: str, bundle: TrustBundle | SpiffeTrustBundle) -> Any:
    if isinstance(bundle, TrustBundle):
        context = common_pb2.CertificateValidationContext(trusted_ca=_inline(bundle.roots_pem))
    else:
        spiffe = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig(
            trust_domains=[
                tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig.TrustDomain(
                    name=domain, trust_bundle=_inline(roots)
                )
                for domain, roots in sorted(bundle.trust_domains.items())
            ]
        )
        typed = any_pb2.Any()
        typed.Pack(spiffe)
        context = common_pb2.CertificateValidationContext(
            custom_validator_config=extension_pb2.TypedExtensionConfig(
                name=SPIFFE_VALIDATOR, typed_config=typed
            )
        )
    return secret_pb2.Secret(name=name, validation_context=context)


# ---------------------------------------------------------------------------------------------
# What the server tracks


@dataclass(frozen=True)
class Nack:
    """A rejected push, kept only as a scrubbed summary: Envoy's text can quote the key."""

    secret_names: tuple[str, ...]
    rejected_version: str
    node_id: str
    code: int
    message: str


@dataclass(frozen=True)
class StreamStatus:
    node_id: str
    peer: str
    resource_names: tuple[str, ...]
    acked: Mapping[str, str]


@dataclass(frozen=True)
class _Resource:
    version: int
    packed: Any  # google.protobuf.Any holding the Secret


@dataclass(eq=False)
class _Stream:
    peer: str
    node_id: str = ""
    names: frozenset[str] | None = None  # None until the first request; empty = every secret
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    must_respond: bool = False
    sent_nonce: str | None = None
    sent_versions: dict[str, int] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)
    closed: bool = False
    error: str | None = None

    def subscribes(self, name: str) -> bool:
        return self.names is not None and (not self.names or name in self.names)


# ---------------------------------------------------------------------------------------------
# The server


class SdsServer:
    """SDS over gRPC on a Unix socket. Use from one event loop; `update()` is not thread-safe."""

    def __init__(self, socket_path: Path | str) -> None:
        self.socket_path = Path(socket_path).absolute()
        if len(os.fsencode(self.socket_path)) > 107:
            raise ValueError(f"SDS socket path is too long for a Unix socket: {self.socket_path}")
        self._server: grpc.aio.Server | None = None
        self._resources: dict[str, _Resource] = {}
        self._generation = 0
        self._streams: set[_Stream] = set()
        self._nacks: dict[str, Nack] = {}
        self._acked = asyncio.Event()
        self._nonces = itertools.count(1)
        self._nonce_prefix = secrets.token_hex(4)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        _prepare_socket_dir(self.socket_path)
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 1 << 20)])
        sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(_Servicer(self), server)
        server.add_insecure_port(f"unix:{self.socket_path}")
        await server.start()
        # The 0700 directory already keeps others out; this narrows the socket itself too.
        os.chmod(self.socket_path, 0o600)
        self._server = server
        log.info("SDS server listening", extra={"socket": str(self.socket_path)})

    async def stop(self, grace: float = 1.0) -> None:
        for stream in self._streams:
            stream.closed = True
            stream.wake.set()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self.socket_path.is_socket():
            self.socket_path.unlink()

    async def __aenter__(self) -> SdsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- secrets --------------------------------------------------------------------------------

    def update(
        self,
        certificate: CertificateSecret | None = None,
        trust_bundle: TrustBundle | SpiffeTrustBundle | None = None,
    ) -> dict[str, str]:
        """Serve new secrets and push them to every subscribed stream.

        Returns the version each given secret now has (unchanged content keeps its version).
        Validation happens before anything changes: on InvalidSecret nothing was pushed.
        """
        staged: dict[str, Any] = {}
        if certificate is not None:
            staged[CERT_SECRET] = _pack(certificate_proto(CERT_SECRET, certificate))
        if trust_bundle is not None:
            staged[BUNDLE_SECRET] = _pack(bundle_proto(BUNDLE_SECRET, trust_bundle))
        changed = {
            name: packed
            for name, packed in staged.items()
            if name not in self._resources or self._resources[name].packed.value != packed.value
        }
        if changed:
            self._generation += 1
            for name, packed in changed.items():
                self._resources[name] = _Resource(self._generation, packed)
            self._wake_subscribers(changed)
            log.info(
                "SDS secrets updated",
                extra={"secrets": sorted(changed), "version": str(self._generation)},
            )
        return {name: str(self._resources[name].version) for name in staged}

    def _wake_subscribers(self, names: Iterable[str]) -> None:
        names = list(names)
        for stream in self._streams:
            if any(stream.subscribes(name) for name in names):
                stream.wake.set()

    def current_version(self, name: str) -> str | None:
        resource = self._resources.get(name)
        return None if resource is None else str(resource.version)

    # -- what Envoy has -------------------------------------------------------------------------

    def acked_version(self, name: str) -> str | None:
        """The version of `name` every connected stream subscribed to it has ACKed (the lowest
        if they differ); None if no stream subscribes or one has ACKed nothing yet."""
        versions = [s.acked.get(name) for s in self._streams if s.subscribes(name)]
        if not versions or any(v is None for v in versions):
            return None
        return str(min(v for v in versions if v is not None))

    async def wait_acked(self, name: str, version: str, timeout: float) -> None:
        """Wait until every subscribed stream has ACKed `version` of `name` (or later)."""
        async with asyncio.timeout(timeout):
            while not self._acked_at_least(name, int(version)):
                event = self._acked
                await event.wait()

    def _acked_at_least(self, name: str, version: int) -> bool:
        acked = self.acked_version(name)
        return acked is not None and int(acked) >= version

    def last_nack(self, name: str) -> Nack | None:
        return self._nacks.get(name)

    def streams(self) -> list[StreamStatus]:
        return [
            StreamStatus(
                node_id=s.node_id,
                peer=s.peer,
                resource_names=tuple(sorted(s.names or ())),
                acked={n: str(v) for n, v in s.acked.items()},
            )
            for s in self._streams
            if s.names is not None
        ]

    # -- protocol -------------------------------------------------------------------------------

    async def serve_stream(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        stream = _Stream(peer=context.peer())
        self._streams.add(stream)
        reader = asyncio.create_task(self._read_requests(stream, requests))
        try:
            while True:
                await stream.wake.wait()
                stream.wake.clear()
                if stream.error is not None:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, stream.error)
                if stream.closed:
                    return
                response = self._response_for(stream)
                if response is not None:
                    yield response
        finally:
            reader.cancel()
            self._streams.discard(stream)
            self._notify_acked()  # a leaving stream can complete what others already ACKed

    async def _read_requests(self, stream: _Stream, requests: AsyncIterator[Any]) -> None:
        try:
            async for request in requests:
                self._on_request(stream, request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the peer went away mid-read: the stream is over
            log.debug(
                "SDS stream ended", extra={"node": stream.node_id, "reason": type(exc).__name__}
            )
        finally:
            stream.closed = True
            stream.wake.set()

    def _on_request(self, stream: _Stream, request: Any) -> None:
        if request.node.id:
            stream.node_id = request.node.id
        if request.type_url and request.type_url != SECRET_TYPE_URL:
            stream.error = f"this server serves only {SECRET_TYPE_URL}"
            stream.wake.set()
            return
        first = stream.sent_nonce is None
        if request.response_nonce and not first:
            if request.response_nonce != stream.sent_nonce:
                return  # a reply to a superseded response: the protocol says ignore it
            self._on_reply(stream, request)
        names = frozenset(request.resource_names)
        if first or names != stream.names:
            stream.names = names
            stream.must_respond = True
            stream.wake.set()

    def _on_reply(self, stream: _Stream, request: Any) -> None:
        if request.HasField("error_detail"):
            self._record_nack(stream, request.error_detail.code, request.error_detail.message)
            return
        stream.acked.update(stream.sent_versions)
        self._notify_acked()

    def _record_nack(self, stream: _Stream, code: int, message: str) -> None:
        names = tuple(sorted(stream.sent_versions))
        nack = Nack(
            secret_names=names,
            rejected_version=str(max(stream.sent_versions.values(), default=0)),
            node_id=stream.node_id,
            code=code,
            message=scrub_key_material(message)[:MAX_NACK_MESSAGE],
        )
        for name in names:
            self._nacks[name] = nack
        log.warning(
            "Envoy rejected SDS secrets",
            extra={
                "node": nack.node_id,
                "secrets": list(names),
                "version": nack.rejected_version,
                "error": nack.message,
            },
        )

    def _notify_acked(self) -> None:
        self._acked.set()
        self._acked = asyncio.Event()

    def _response_for(self, stream: _Stream) -> Any | None:
        names = stream.names or frozenset(self._resources)
        available = {n: self._resources[n] for n in sorted(names) if n in self._resources}
        versions = {n: r.version for n, r in available.items()}
        if not available or (not stream.must_respond and versions == stream.sent_versions):
            return None
        stream.must_respond = False
        stream.sent_nonce = f"{self._nonce_prefix}-{next(self._nonces)}"
        stream.sent_versions = versions
        return self._discovery_response(available, stream.sent_nonce)

    def _discovery_response(self, resources: Mapping[str, _Resource], nonce: str) -> Any:
        return discovery_pb2.DiscoveryResponse(
            version_info=str(max(r.version for r in resources.values())),
            resources=[r.packed for r in resources.values()],
            type_url=SECRET_TYPE_URL,
            nonce=nonce,
        )

    async def fetch(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        names = request.resource_names or sorted(self._resources)
        available = {n: self._resources[n] for n in sorted(names) if n in self._resources}
        if not available:
            await context.abort(grpc.StatusCode.NOT_FOUND, "none of the named secrets exist")
        nonce = f"{self._nonce_prefix}-{next(self._nonces)}"
        return self._discovery_response(available, nonce)


class _Servicer:
    """The gRPC face of SdsServer (duck-typed: the generated base class is untyped)."""

    def __init__(self, server: SdsServer) -> None:
        self._server = server

    async def StreamSecrets(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        # grpc.aio picks the streaming mode by inspecting this function: it must itself be an
        # async generator, not return one.
        async for response in self._server.serve_stream(requests, context):
            yield response

    async def FetchSecrets(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await self._server.fetch(request, context)

    async def DeltaSecrets(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "use state-of-the-world SDS")


def _prepare_socket_dir(socket_path: Path) -> None:
    """Create the socket's directory 0700, or refuse one others can enter; clear a stale socket."""
    directory = socket_path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise PermissionError(f"SDS socket directory {directory} must be a directory we own")
    if info.st_mode & 0o077:
        raise PermissionError(
            f"SDS socket directory {directory} is open to others "
            f"(mode {stat.S_IMODE(info.st_mode):o}); it must be 0700"
        )
    if socket_path.is_socket():
        if _someone_listens(socket_path):
            raise FileExistsError(f"another SDS server is serving on {socket_path}")
        socket_path.unlink()  # left by a previous agent that did not stop cleanly
    elif socket_path.exists():
        raise FileExistsError(f"{socket_path} exists and is not a socket")


def _someone_listens(socket_path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(socket_path))
        except OSError:
            return False
    return True
