"""A Python ADS client that speaks state-of-the-world xDS the way Envoy does.

It is driven step by step by the tests (subscribe, receive, ACK or NACK, re-request), over a
real grpc.aio channel to a real AdsServer. Real Envoy is exercised in tests/e2e; this double
exists because the protocol corner cases (stale nonces, the EDS re-request after CDS) cannot
be provoked on demand with a real Envoy.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

DiscoveryRequest = discovery_pb2.DiscoveryRequest
DiscoveryResponse = discovery_pb2.DiscoveryResponse


class StreamEnded(Exception):
    """The server ended the stream; `code` is its gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass
class Subscription:
    names: list[str] = field(default_factory=list)
    accepted_version: str = ""
    last_nonce: str = ""


class FakeEnvoy:
    """One ADS stream. Responses are queued by a background reader; nothing is auto-ACKed."""

    def __init__(
        self, channel: grpc.aio.Channel, node_id: str, metadata: Sequence[tuple[str, str]] = ()
    ) -> None:
        self.node_id = node_id
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        self._call: Any = stub.StreamAggregatedResources(metadata=tuple(metadata))
        self._responses: asyncio.Queue[Any] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())
        self.subscriptions: dict[str, Subscription] = {}
        self._node_sent = False

    async def _read(self) -> None:
        try:
            async for response in self._call:
                await self._responses.put(response)
            await self._responses.put(StreamEnded(grpc.StatusCode.OK, ""))
        except grpc.aio.AioRpcError as exc:
            await self._responses.put(StreamEnded(exc.code(), exc.details() or ""))

    async def close(self) -> None:
        self._call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    # Requests.

    async def send(
        self,
        type_url: str,
        names: Iterable[str] = (),
        *,
        version: str = "",
        nonce: str = "",
        error: str | None = None,
        node_id: str | None = None,
    ) -> None:
        """Send one DiscoveryRequest exactly as given (the node only on the first request)."""
        request = DiscoveryRequest(
            type_url=type_url,
            resource_names=list(names),
            version_info=version,
            response_nonce=nonce,
        )
        if node_id is not None or not self._node_sent:
            request.node.id = node_id if node_id is not None else self.node_id
            self._node_sent = True
        if error is not None:
            request.error_detail.code = 3  # INVALID_ARGUMENT, as Envoy sends
            request.error_detail.message = error
        await self._call.write(request)

    async def subscribe(self, type_url: str, names: Iterable[str] = ()) -> None:
        """The first request for a type, as Envoy sends it."""
        sub = self.subscriptions.setdefault(type_url, Subscription())
        sub.names = list(names)
        await self.send(type_url, sub.names, version=sub.accepted_version)

    async def ack(self, response: Any) -> None:
        sub = self.subscriptions.setdefault(response.type_url, Subscription())
        sub.accepted_version, sub.last_nonce = response.version_info, response.nonce
        await self.send(
            response.type_url, sub.names, version=sub.accepted_version, nonce=sub.last_nonce
        )

    async def nack(self, response: Any, error: str) -> None:
        sub = self.subscriptions.setdefault(response.type_url, Subscription())
        sub.last_nonce = response.nonce
        await self.send(
            response.type_url,
            sub.names,
            version=sub.accepted_version,
            nonce=sub.last_nonce,
            error=error,
        )

    async def re_request(self, type_url: str, names: Iterable[str] | None = None) -> None:
        """Ask again with the last nonce seen, as Envoy does for EDS after a CDS update."""
        sub = self.subscriptions[type_url]
        if names is not None:
            sub.names = list(names)
        await self.send(type_url, sub.names, version=sub.accepted_version, nonce=sub.last_nonce)

    # Responses.

    async def receive(self, timeout: float = 5.0) -> Any:
        item = await asyncio.wait_for(self._responses.get(), timeout)
        if isinstance(item, StreamEnded):
            raise item
        return item

    async def receive_and_ack(self, timeout: float = 5.0) -> Any:
        response = await self.receive(timeout)
        await self.ack(response)
        return response

    async def expect_nothing(self, within: float = 0.3) -> None:
        """Assert that no response arrives for a while."""
        try:
            item = await asyncio.wait_for(self._responses.get(), within)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected message from the server: {item}")

    async def ended(self, timeout: float = 5.0) -> StreamEnded:
        """Wait for the stream's end, skipping responses; returns how it ended."""
        async with asyncio.timeout(timeout):
            while True:
                item = await self._responses.get()
                if isinstance(item, StreamEnded):
                    return item


def names_of(response: Any) -> list[str]:
    """The names of the resources in a DiscoveryResponse (unpacked as Envoy would)."""
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.route.v3 import route_pb2

    kinds: dict[str, Any] = {
        "Listener": listener_pb2.Listener,
        "Cluster": cluster_pb2.Cluster,
        "ClusterLoadAssignment": endpoint_pb2.ClusterLoadAssignment,
        "RouteConfiguration": route_pb2.RouteConfiguration,
    }
    names = []
    for packed in response.resources:
        message = kinds[packed.type_url.rsplit(".", 1)[-1]]()
        assert packed.Unpack(message)
        names.append(getattr(message, "cluster_name", "") or message.name)
    return sorted(names)
