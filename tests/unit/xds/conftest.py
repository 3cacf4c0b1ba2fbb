"""Fixtures for the xDS tests: a real AdsServer on a loopback port, and small resources.

The channel is plaintext: these tests are about the protocol; TLS is wired by the control
plane, which owns the gRPC server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2

from tests.unit.xds.fakeenvoy import FakeEnvoy
from verity.xds import typeurls
from verity.xds.ads import SERVER_OPTIONS, AdsServer, Forbidden, Unauthenticated, serve_ads
from verity.xds.cache import SnapshotCache
from verity.xds.status import StatusBoard

# Test credentials: token -> the node it may act as.
TOKENS = {"token-a": "node-a", "token-b": "node-b", "token-c": "node-c"}
FORBIDDEN_TOKEN = "token-suspended"


def listener(name: str, port: int = 10000) -> Any:
    address = address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
    )
    return listener_pb2.Listener(name=name, address=address)


def cluster(name: str, timeout_s: int = 1) -> Any:
    made = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    made.connect_timeout.seconds = timeout_s
    made.eds_cluster_config.eds_config.ads.SetInParent()
    return made


def endpoints(name: str, port: int = 8080) -> Any:
    address = address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
    )
    components = endpoint_components_pb2
    lb = components.LbEndpoint(endpoint=components.Endpoint(address=address))
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name, endpoints=[components.LocalityLbEndpoints(lb_endpoints=[lb])]
    )


def route(name: str, cluster_name: str = "app") -> Any:
    components = route_components_pb2
    action = components.Route(
        match=components.RouteMatch(prefix="/"),
        route=components.RouteAction(cluster=cluster_name),
    )
    host = components.VirtualHost(name="all", domains=["*"], routes=[action])
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[host])


def config(
    listeners: Sequence[Any] = (),
    clusters: Sequence[Any] = (),
    assignments: Sequence[Any] = (),
    routes: Sequence[Any] = (),
) -> dict[str, dict[str, Any]]:
    """A proxy's resources in the shape SnapshotCache.set_resources takes."""
    return {
        typeurls.LISTENER: {r.name: r for r in listeners},
        typeurls.CLUSTER: {r.name: r for r in clusters},
        typeurls.ENDPOINT: {r.cluster_name: r for r in assignments},
        typeurls.ROUTE: {r.name: r for r in routes},
    }


@dataclass
class AdsHarness:
    cache: SnapshotCache
    status: StatusBoard
    ads: AdsServer
    channel: grpc.aio.Channel
    connects: list[str] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)
    clients: list[FakeEnvoy] = field(default_factory=list)

    def envoy(self, node_id: str, token: str | None = None) -> FakeEnvoy:
        token = token if token is not None else _token_of(node_id)
        client = FakeEnvoy(self.channel, node_id, [("authorization", f"Bearer {token}")])
        self.clients.append(client)
        return client


def _token_of(node_id: str) -> str:
    return next(t for t, n in TOKENS.items() if n == node_id)


async def authenticate(metadata: Sequence[tuple[str, str]], node_id: str) -> str:
    headers = dict(metadata)
    token = headers.get("authorization", "").removeprefix("Bearer ")
    if token == FORBIDDEN_TOKEN:
        raise Forbidden("this token is suspended")
    if token not in TOKENS:
        raise Unauthenticated("unknown token")
    return TOKENS[token]


OnConnect = Callable[[AdsHarness, str], None]


@pytest.fixture
def on_connect() -> Mapping[str, OnConnect]:
    """Per-test hook run on connect, keyed by node id (tests fill it in)."""
    return {}


@pytest.fixture
async def harness(on_connect: Mapping[str, OnConnect]) -> AsyncIterator[AdsHarness]:
    cache, status = SnapshotCache(), StatusBoard()
    holder: list[AdsHarness] = []

    def connected(node_id: str) -> None:
        holder[0].connects.append(node_id)
        hook = on_connect.get(node_id)
        if hook is not None:
            hook(holder[0], node_id)

    def disconnected(node_id: str) -> None:
        holder[0].disconnects.append(node_id)

    ads = AdsServer(
        cache, authenticate, status=status, on_connect=connected, on_disconnect=disconnected
    )
    server = grpc.aio.server(options=SERVER_OPTIONS)
    serve_ads(server, ads)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    holder.append(AdsHarness(cache, status, ads, channel))
    try:
        yield holder[0]
    finally:
        for client in holder[0].clients:
            await client.close()
        await channel.close()
        await server.stop(None)
        await asyncio.sleep(0)
