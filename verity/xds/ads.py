"""The ADS server: state-of-the-world xDS v3 on grpc.aio, one stream per connected proxy.

Each stream has a reader task (DiscoveryRequests: subscriptions, ACKs, NACKs) and a writer
(the RPC's own task) woken by the reader or by the cache when the proxy's resources change.
The first request must name the proxy's node; the credentials of the call are checked
against it with the `authenticate` hook before anything is served, and the stream is then
bound to that node id: it only ever gets that proxy's resources.

The protocol rules, per type URL:
- the first request (no nonce) gets the current resources, even if there are none;
- a request whose nonce is not the last one sent is stale and ignored;
- the first request carrying the last nonce answers it: an ACK, or a NACK (error_detail),
  which is recorded scrubbed and never answered by resending the same version;
- a later request with that same, already answered nonce asks again and gets the current
  resources again. Envoy does this for EDS after a CDS update (the updated clusters need
  their endpoints to finish warming, even if the endpoints did not change); left
  unanswered, those clusters wait 15 s for their initial fetch;
- a request that changes the subscribed names (EDS, RDS, SDS) gets the newly named ones.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from verity.xds import typeurls
from verity.xds.cache import SnapshotCache
from verity.xds.status import StatusBoard

log = logging.getLogger("verity.xds.ads")

# Envoy uses five type URLs at most; a stream asking for many more is not an Envoy.
MAX_TYPES_PER_STREAM = 32

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
METHOD = "StreamAggregatedResources"

# Options for the grpc.aio server the ADS service runs on (all verified to exist in gRPC
# core). A connect storm of proxies queues calls beyond max_pending_requests and cancels
# them past the hard limit, and the cancelled proxies reconnect and add to the storm. Port
# reuse would let a second server silently share the port. Keepalive pings find proxies
# that vanished without closing their connection; ADS streams are idle most of the time,
# so pings must be allowed without data and without calls.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.so_reuseport", 0),
    ("grpc.server.max_pending_requests", 100_000),
    ("grpc.server.max_pending_requests_hard_limit", 200_000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
)

Metadata = Sequence[tuple[str, str]]
Authenticate = Callable[[Metadata, str], Awaitable[str]]
NodeCallback = Callable[[str], Awaitable[None] | None]


class Unauthenticated(LookupError):
    """The call's credentials are missing, unknown or expired (-> UNAUTHENTICATED)."""


class Forbidden(PermissionError):
    """The credentials are valid but may not act as the requested node (-> PERMISSION_DENIED)."""


class _Verdict(enum.Enum):
    STALE = "stale"
    INITIAL = "initial"
    ACK = "ack"
    NACK = "nack"
    ASKS_AGAIN = "asks-again"


@dataclass(slots=True)
class _TypeState:
    """One stream's protocol state for one type URL."""

    wildcard: bool
    names: frozenset[str] | None = None
    nonce: str = ""
    version: str = ""
    sent_names: frozenset[str] | None = None
    answered: bool = False
    nacked: bool = False

    def names_changed(self) -> bool:
        return self.names != self.sent_names


def classify(state: _TypeState, request: Any) -> _Verdict:
    """What a DiscoveryRequest means, given what this stream last sent for its type."""
    if not request.response_nonce or not state.nonce:
        # No nonce, or a nonce from an earlier stream: a (re)subscription.
        return _Verdict.INITIAL
    if request.response_nonce != state.nonce:
        return _Verdict.STALE
    if state.answered:
        return _Verdict.ASKS_AGAIN
    return _Verdict.NACK if request.HasField("error_detail") else _Verdict.ACK


@dataclass(frozen=True, slots=True)
class _Refusal:
    code: grpc.StatusCode
    details: str


async def _abort(context: Any, code: grpc.StatusCode, details: str) -> NoReturn:
    await context.abort(code, details)
    raise AssertionError("context.abort returned")  # it raises; this keeps the type checker honest


async def _call_hook(hook: NodeCallback | None, name: str, node_id: str) -> None:
    if hook is None:
        return
    try:
        result = hook(node_id)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("the %s callback failed", name, extra={"node": node_id})


class _Session:
    """One ADS stream, bound to one authenticated node id."""

    def __init__(self, server: AdsServer, node_id: str, context: Any) -> None:
        self._server = server
        self._cache = server.cache
        self._status = server.status
        self.node_id = node_id
        self._context = context
        self._types: dict[str, _TypeState] = {}
        self._pending: set[str] = set()
        self._wake = asyncio.Event()
        self._nonce = 0
        self._closed = False
        self._refusal: _Refusal | None = None

    def refuse(self, code: grpc.StatusCode, details: str) -> None:
        """End the stream with this status (from any task of the loop)."""
        if self._refusal is None:
            self._refusal = _Refusal(code, details)
        self._wake.set()

    async def run(self, first: Any) -> None:
        unwatch = self._cache.watch(self.node_id, self._on_change)
        reader = asyncio.create_task(self._read_loop())
        try:
            self._handle(first)
            await self._write_loop()
        except grpc.RpcError as exc:  # the client is gone; nothing to tell it
            log.debug("ADS stream write failed: %s", exc.__class__.__name__)
        finally:
            unwatch()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if self._refusal is not None:
            await _abort(self._context, self._refusal.code, self._refusal.details)

    def _on_change(self, type_urls: frozenset[str]) -> None:
        subscribed = type_urls & self._types.keys()
        if subscribed:
            self._pending |= subscribed
            self._wake.set()

    def _ended(self) -> bool:
        return self._closed or self._refusal is not None

    async def _read_loop(self) -> None:
        try:
            while not self._ended():
                request = await self._context.read()
                if request is grpc.aio.EOF:
                    return
                self._handle(request)
        except Exception as exc:  # a broken stream ends the writer too
            log.debug(
                "ADS stream read failed: %s", type(exc).__name__, extra={"node": self.node_id}
            )
        finally:
            self._closed = True
            self._wake.set()

    async def _write_loop(self) -> None:
        while not self._ended():
            await self._flush()
            await self._wake.wait()
            self._wake.clear()

    async def _flush(self) -> None:
        while not self._ended():
            type_url = self._next_ready()
            if type_url is None:
                return
            await self._send(type_url)

    def _next_ready(self) -> str | None:
        # Nothing is sent before the control plane has set this proxy's resources once.
        if not self._pending or self.node_id not in self._cache:
            return None
        return min(self._pending, key=typeurls.push_rank)

    async def _send(self, type_url: str) -> None:
        self._pending.discard(type_url)
        resources = self._cache.get(self.node_id, type_url)
        if resources is None:
            return
        state = self._types[type_url]
        self._nonce += 1
        nonce = str(self._nonce)
        body = resources.response(state.names, nonce)
        # The state changes before the write, so an ACK that arrives during it matches.
        state.nonce, state.version, state.sent_names = nonce, resources.version, state.names
        state.answered = state.nacked = False
        self._status.sent(self.node_id, type_url, resources.version, nonce)
        self._server.responses_sent += 1
        await self._context.write(body)

    def _handle(self, request: Any) -> None:
        self._server.requests_received += 1
        if request.HasField("node") and request.node.id != self.node_id:
            self.refuse(grpc.StatusCode.PERMISSION_DENIED, "a stream serves the node it began with")
            return
        type_url = request.type_url
        state = self._types.get(type_url) or self._new_type(type_url)
        if state is None:
            return
        self._status.requested(self.node_id, type_url)
        verdict = classify(state, request)
        if verdict is _Verdict.STALE:
            return
        state.names = None if state.wildcard else frozenset(request.resource_names)
        if self._needs_response(type_url, state, verdict, request):
            self._pending.add(type_url)
            self._wake.set()

    def _new_type(self, type_url: str) -> _TypeState | None:
        if not type_url:
            self.refuse(grpc.StatusCode.INVALID_ARGUMENT, "an ADS request needs a type_url")
            return None
        if len(self._types) >= MAX_TYPES_PER_STREAM:
            self.refuse(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many type URLs on one stream")
            return None
        state = self._types[type_url] = _TypeState(type_url in typeurls.WILDCARD_TYPES)
        return state

    def _needs_response(
        self, type_url: str, state: _TypeState, verdict: _Verdict, request: Any
    ) -> bool:
        if verdict is _Verdict.INITIAL:
            return True
        if verdict is _Verdict.ASKS_AGAIN:
            # Asking again for exactly what was rejected would only be rejected again.
            unchanged = self._cache.version(self.node_id, type_url) == state.version
            return not (state.nacked and unchanged and not state.names_changed())
        state.answered = True
        if verdict is _Verdict.ACK:
            self._record_ack(type_url, state, request)
        else:
            self._record_nack(type_url, state, request)
        return state.names_changed()

    def _record_ack(self, type_url: str, state: _TypeState, request: Any) -> None:
        if request.version_info == state.version:
            self._status.acked(self.node_id, type_url, state.version)
        else:
            log.debug(
                "ACK of nonce %s names version %r, not the %r sent",
                state.nonce,
                request.version_info,
                state.version,
                extra={"node": self.node_id, "type": typeurls.short_name(type_url)},
            )

    def _record_nack(self, type_url: str, state: _TypeState, request: Any) -> None:
        state.nacked = True
        nack = self._status.nacked(
            self.node_id, type_url, state.version, request.error_detail.message
        )
        log.warning(
            "proxy rejected %s version %s: %s",
            typeurls.short_name(type_url),
            nack.version,
            nack.error,
            extra={"node": self.node_id},
        )


class AdsServer:
    """StreamAggregatedResources (state of the world, v3) for proxies in a SnapshotCache.

    `authenticate(invocation_metadata, node_id)` returns the node id the call's credentials
    allow; it raises `Unauthenticated` or another LookupError (-> UNAUTHENTICATED) or
    `Forbidden` or another PermissionError (-> PERMISSION_DENIED). A stream whose first
    request names another node than the one allowed is refused. `on_connect(node_id)` runs
    before a proxy's first stream is served and `on_disconnect(node_id)` after its last
    stream ends; either may be a coroutine function.
    """

    def __init__(
        self,
        cache: SnapshotCache,
        authenticate: Authenticate,
        *,
        status: StatusBoard | None = None,
        on_connect: NodeCallback | None = None,
        on_disconnect: NodeCallback | None = None,
        first_request_timeout: float = 30.0,
    ) -> None:
        self.cache = cache
        self.status = status if status is not None else StatusBoard()
        self._authenticate = authenticate
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._first_request_timeout = first_request_timeout
        self._sessions: dict[str, set[_Session]] = {}
        self.responses_sent = 0
        self.requests_received = 0

    async def stream_aggregated_resources(self, request_iterator: Any, context: Any) -> None:
        """The gRPC method handler; `request_iterator` is unused (requests come by read())."""
        first = await self._first_request(context)
        node_id = await self._authenticated_node(first, context)
        await self._serve(node_id, first, context)

    def disconnect(self, node_id: str, reason: str = "disconnected by the control plane") -> int:
        """End every stream of a proxy (e.g. its token was revoked); returns how many."""
        sessions = tuple(self._sessions.get(node_id, ()))
        for session in sessions:
            session.refuse(grpc.StatusCode.UNAVAILABLE, reason)
        return len(sessions)

    def connected_nodes(self) -> frozenset[str]:
        return frozenset(self._sessions)

    async def _first_request(self, context: Any) -> Any:
        try:
            async with asyncio.timeout(self._first_request_timeout):
                request = await context.read()
        except TimeoutError:
            await _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, "no request arrived in time")
        if request is grpc.aio.EOF:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "the stream ended unopened")
        if not request.HasField("node") or not request.node.id:
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "the first request needs a node id"
            )
        return request

    async def _authenticated_node(self, first: Any, context: Any) -> str:
        requested: str = first.node.id
        metadata = [(k, v) for k, v in context.invocation_metadata() or () if isinstance(v, str)]
        try:
            allowed = await self._authenticate(metadata, requested)
        except (Unauthenticated, Forbidden) as exc:
            code = _status_of(exc)
            await _abort(context, code, str(exc) or code.name.lower())
        except (LookupError, PermissionError) as exc:
            code = _status_of(exc)
            await _abort(context, code, code.name.lower().replace("_", " "))
        except Exception as exc:
            # Fail closed; the message may quote the credentials, so only the type is logged.
            log.error("authentication failed: %s", type(exc).__name__, extra={"node": requested})
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "authentication failed")
        if allowed != requested:
            log.warning(
                "credentials for another node", extra={"node": requested, "allowed": allowed}
            )
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED, "not allowed as this node")
        return requested

    async def _serve(self, node_id: str, first: Any, context: Any) -> None:
        session = _Session(self, node_id, context)
        self._sessions.setdefault(node_id, set()).add(session)
        connected = self.status.stream_opened(node_id)
        try:
            if connected:
                log.info("proxy connected", extra={"node": node_id})
                await _call_hook(self._on_connect, "on_connect", node_id)
            await session.run(first)
        finally:
            self._forget(session)
            if self.status.stream_closed(node_id):
                log.info("proxy disconnected", extra={"node": node_id})
                await _call_hook(self._on_disconnect, "on_disconnect", node_id)

    def _forget(self, session: _Session) -> None:
        sessions = self._sessions.get(session.node_id)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._sessions[session.node_id]


def _status_of(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, PermissionError):
        return grpc.StatusCode.PERMISSION_DENIED
    return grpc.StatusCode.UNAUTHENTICATED


def serve_ads(server: grpc.aio.Server, ads: AdsServer) -> None:
    """Add the ADS service to a grpc.aio server the caller owns (port, TLS, other services)."""
    handlers = {
        METHOD: grpc.stream_stream_rpc_method_handler(
            ads.stream_aggregated_resources,
            request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            # Responses are already serialized (see SnapshotCache): written as they are.
            response_serializer=None,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
