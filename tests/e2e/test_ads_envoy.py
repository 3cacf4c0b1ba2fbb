"""The ADS server against a real Envoy: initial config, changes, a NACK, fast cluster warming.

The ADS connection here is plaintext on loopback: this test is about the xDS protocol with a
real Envoy. TLS (and the token check against real credentials) is added by the control
plane, which owns the gRPC server the ADS service is added to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2

from verity.dataplane.envoybinary import envoy_binary
from verity.xds import typeurls
from verity.xds.ads import SERVER_OPTIONS, AdsServer, Unauthenticated, serve_ads
from verity.xds.cache import SnapshotCache
from verity.xds.status import StatusBoard

NODE = "e2e-proxy"
TOKEN = "e2e-ads-token"
Resources = dict[str, dict[str, Any]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---------------------------------------------------------------------------------------------
# The apps behind Envoy: each answers every request with its own name.


def _app_handler(name: str) -> type[BaseHTTPRequestHandler]:
    body = name.encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def apps() -> Iterator[dict[str, int]]:
    """Two HTTP apps on loopback, by name -> port."""
    servers = {n: ThreadingHTTPServer(("127.0.0.1", 0), _app_handler(n)) for n in ("a", "b")}
    for server in servers.values():
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield {name: server.server_address[1] for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.shutdown()
            server.server_close()


# ---------------------------------------------------------------------------------------------
# Resources


def _ads_source() -> Any:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def _address(port: int, host: str = "127.0.0.1") -> Any:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def _packed(message: Any) -> Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def eds_cluster(name: str, connect_timeout_s: int = 1) -> Any:
    made = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    made.connect_timeout.seconds = connect_timeout_s
    made.eds_cluster_config.eds_config.CopyFrom(_ads_source())
    return made


def assignment(name: str, port: int) -> Any:
    components = endpoint_components_pb2
    lb = components.LbEndpoint(endpoint=components.Endpoint(address=_address(port)))
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name, endpoints=[components.LocalityLbEndpoints(lb_endpoints=[lb])]
    )


def http_listener(name: str, port: int, route_name: str, host: str = "127.0.0.1") -> Any:
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        rds=hcm_pb2.Rds(route_config_name=route_name, config_source=_ads_source()),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=_packed(router_pb2.Router())
            )
        ],
    )
    network_filter = listener_components_pb2.Filter(
        name="envoy.filters.network.http_connection_manager", typed_config=_packed(manager)
    )
    return listener_pb2.Listener(
        name=name,
        address=_address(port, host),
        filter_chains=[listener_components_pb2.FilterChain(filters=[network_filter])],
    )


def route_to(name: str, cluster_name: str) -> Any:
    components = route_components_pb2
    rule = components.Route(
        match=components.RouteMatch(prefix="/"),
        route=components.RouteAction(cluster=cluster_name),
    )
    host = components.VirtualHost(name="all", domains=["*"], routes=[rule])
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[host])


def resources(
    clusters: Sequence[Any],
    assignments: Sequence[Any],
    listeners: Sequence[Any],
    routes: Sequence[Any],
) -> Resources:
    return {
        typeurls.CLUSTER: {c.name: c for c in clusters},
        typeurls.ENDPOINT: {a.cluster_name: a for a in assignments},
        typeurls.LISTENER: {li.name: li for li in listeners},
        typeurls.ROUTE: {r.name: r for r in routes},
    }


# ---------------------------------------------------------------------------------------------
# The ADS server and Envoy


@dataclass
class Mesh:
    cache: SnapshotCache
    status: StatusBoard
    ads: AdsServer
    ads_port: int
    admin_port: int = 0

    async def push(self, config: Resources, timeout: float = 5.0) -> bool:
        """Set the proxy's resources and wait until it ACKed every changed type."""
        changed = self.cache.set_resources(NODE, config)
        return await self.status.wait_acked([NODE], changed, self.cache.version, timeout)

    async def admin(self, path: str) -> str:
        async with httpx.AsyncClient(timeout=2) as client:
            response = await client.get(f"http://127.0.0.1:{self.admin_port}{path}")
            return response.text

    async def stat(self, name: str) -> int:
        text = await self.admin(f"/stats?filter=^{name}$")
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        raise AssertionError(f"no stat {name} in {text!r}")


async def _authenticate(metadata: Sequence[tuple[str, str]], node_id: str) -> str:
    if dict(metadata).get("authorization") != f"Bearer {TOKEN}":
        raise Unauthenticated("unknown token")
    return node_id


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    cache, status = SnapshotCache(), StatusBoard()
    ads = AdsServer(cache, _authenticate, status=status)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    serve_ads(server, ads)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Mesh(cache, status, ads, port)
    finally:
        await server.stop(None)


def bootstrap(ads_port: int, admin_port: int) -> dict[str, Any]:
    ads_source = {"ads": {}, "resource_api_version": "V3"}
    xds_endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ads_port}}}
    http2 = {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
    return {
        "node": {"id": NODE, "cluster": "e2e"},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [
                    {
                        "envoy_grpc": {"cluster_name": "xds"},
                        "initial_metadata": [{"key": "authorization", "value": f"Bearer {TOKEN}"}],
                    }
                ],
            },
            "lds_config": ads_source,
            "cds_config": ads_source,
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "xds",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "xds",
                        "endpoints": [{"lb_endpoints": [{"endpoint": xds_endpoint}]}],
                    },
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": http2
                    },
                }
            ]
        },
    }


def _dying_with_this_process(command: list[str]) -> list[str]:
    # Envoy must not outlive the test (it would keep its ports). PR_SET_PDEATHSIG is armed
    # by setpriv rather than a preexec_fn: a preexec_fn forces a plain fork(), and gRPC's fork
    # handlers, with the ADS server's threads running, break the server's poller.
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *command] if setpriv else command


@pytest.fixture
async def envoy(mesh: Mesh, tmp_path: Path) -> AsyncIterator[subprocess.Popen[bytes]]:
    mesh.admin_port = free_port()
    config_path = tmp_path / "bootstrap.json"
    config_path.write_text(json.dumps(bootstrap(mesh.ads_port, mesh.admin_port)))
    log_path = tmp_path / "envoy.log"
    command = [str(envoy_binary()), "-c", str(config_path), "--disable-hot-restart"]
    command += ["--concurrency", "1", "--log-level", "warn", "--log-path", str(log_path)]
    process = subprocess.Popen(_dying_with_this_process(command))
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Poll an async check until it returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            last = await check()
            if last:
                return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"not reached in {timeout} s (last: {last!r})")


async def get_body(port: int) -> str:
    async with httpx.AsyncClient(timeout=2) as client:
        return (await client.get(f"http://127.0.0.1:{port}/")).text


async def _serves(port: int, body: str, timeout: float = 5.0) -> None:
    async def check() -> bool:
        return await get_body(port) == body

    await _eventually(check, timeout)


# ---------------------------------------------------------------------------------------------
# The tests


@dataclass
class Ports:
    main: int
    extra: int


@pytest.fixture
def ports() -> Ports:
    return Ports(free_port(), free_port())


def initial_config(apps: dict[str, int], ports: Ports) -> Resources:
    return resources(
        clusters=[eds_cluster("app-a"), eds_cluster("app-b")],
        assignments=[assignment("app-a", apps["a"]), assignment("app-b", apps["b"])],
        listeners=[http_listener("main", ports.main, "main-routes")],
        routes=[route_to("main-routes", "app-a")],
    )


async def _started(mesh: Mesh, config: Resources, ports: Ports) -> None:
    mesh.cache.set_resources(NODE, config)
    served = typeurls.PUSH_ORDER[:4]  # no secrets over ADS
    assert await mesh.status.wait_acked([NODE], served, mesh.cache.version, 10.0)
    await _serves(ports.main, "a")


async def test_envoy_serves_the_pushed_config_and_follows_changes(
    mesh: Mesh, envoy: subprocess.Popen[bytes], apps: dict[str, int], ports: Ports
) -> None:
    config = initial_config(apps, ports)
    await _started(mesh, config, ports)

    config[typeurls.ROUTE] = {"main-routes": route_to("main-routes", "app-b")}
    assert await mesh.push(config)
    await _serves(ports.main, "b")

    config[typeurls.LISTENER]["extra"] = http_listener("extra", ports.extra, "main-routes")
    assert await mesh.push(config)
    await _serves(ports.extra, "b")

    status = mesh.status.snapshot(NODE)
    assert status is not None and status.connected
    for type_url in typeurls.PUSH_ORDER[:4]:
        assert status.types[type_url].version_acked == mesh.cache.version(NODE, type_url)
        assert status.types[type_url].last_nack is None


async def test_invalid_listener_is_nacked_and_the_last_good_config_keeps_serving(
    mesh: Mesh, envoy: subprocess.Popen[bytes], apps: dict[str, int], ports: Ports
) -> None:
    config = initial_config(apps, ports)
    await _started(mesh, config, ports)
    good_lds = mesh.cache.version(NODE, typeurls.LISTENER)

    config[typeurls.LISTENER]["broken"] = http_listener(
        "broken", ports.extra, "main-routes", host="not-an-address"
    )
    assert await mesh.push(config) is False

    status = mesh.status.snapshot(NODE)
    assert status is not None
    lds = status.types[typeurls.LISTENER]
    assert lds.version_acked == good_lds
    assert lds.last_nack is not None
    assert lds.last_nack.version == mesh.cache.version(NODE, typeurls.LISTENER)
    assert "not-an-address" in lds.last_nack.error
    assert await get_body(ports.main) == "a"

    del config[typeurls.LISTENER]["broken"]
    assert await mesh.push(config)
    assert await get_body(ports.main) == "a"


async def test_updated_and_added_clusters_warm_without_waiting_for_the_fetch_timeout(
    mesh: Mesh, envoy: subprocess.Popen[bytes], apps: dict[str, int], ports: Ports
) -> None:
    config = initial_config(apps, ports)
    await _started(mesh, config, ports)
    modified_before = await mesh.stat("cluster_manager.cluster_modified")

    # Only the cluster changes, not its endpoints: Envoy asks for EDS again to warm it.
    config[typeurls.CLUSTER]["app-a"] = eds_cluster("app-a", connect_timeout_s=2)
    started = time.monotonic()
    assert await mesh.push(config)
    await _warmed(mesh, "cluster_manager.cluster_modified", modified_before + 1)
    assert time.monotonic() - started < 2.0
    assert await get_body(ports.main) == "a"

    # A new cluster with its endpoints, and a route to it, in one push.
    added_before = await mesh.stat("cluster_manager.cluster_added")
    config[typeurls.CLUSTER]["app-c"] = eds_cluster("app-c")
    config[typeurls.ENDPOINT]["app-c"] = assignment("app-c", apps["b"])
    config[typeurls.ROUTE] = {"main-routes": route_to("main-routes", "app-c")}
    started = time.monotonic()
    assert await mesh.push(config)
    await _warmed(mesh, "cluster_manager.cluster_added", added_before + 1)
    await _serves(ports.main, "b")
    assert time.monotonic() - started < 2.0


async def _warmed(mesh: Mesh, counter: str, at_least: int) -> None:
    async def check() -> bool:
        warming = await mesh.stat("cluster_manager.warming_clusters")
        return warming == 0 and await mesh.stat(counter) >= at_least

    await _eventually(check, timeout=3.0)
