"""ADS at scale: push-to-ACK latency, server CPU per pushed response, server memory per client.

The ADS server runs in this process; N simulated proxies run in a child process (asyncio,
many streams over a few gRPC channels, each stream subscribing to CDS, EDS, LDS and RDS and
ACKing every response as Envoy does). For each N, after every proxy has ACKed its initial
configuration, the benchmark pushes a listener change to all N proxies several times, then
a full change (all four types), and reports:

- push-to-ACK: from the first `set_resources` of a push to the last proxy's ACK (p50, p99);
- server CPU per pushed response: process CPU time over the pushes (gRPC threads included),
  minus the time spent in `set_resources`, divided by the responses sent (each response
  includes handling its ACK); `set_resources` is reported separately per proxy;
- server RSS per connected client: RSS growth from before the proxies connect to after they
  have all ACKed, divided by N. Streams share connections here (see `--per-channel`), so this
  is the cost of a stream, not of a TLS connection per proxy.

Run: python bench/ads.py [--clients 1,100,1000] [--pushes 10] [--per-channel 100]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
from envoy.config.cluster.v3 import cluster_pb2  # noqa: E402
from envoy.config.core.v3 import address_pb2, config_source_pb2  # noqa: E402
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2  # noqa: E402
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2  # noqa: E402
from envoy.config.route.v3 import route_components_pb2, route_pb2  # noqa: E402
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: E402
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: E402
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2  # noqa: E402
from google.protobuf import any_pb2  # noqa: E402

from verity.xds import typeurls  # noqa: E402
from verity.xds.ads import SERVER_OPTIONS, AdsServer, serve_ads  # noqa: E402
from verity.xds.cache import SnapshotCache  # noqa: E402
from verity.xds.status import StatusBoard  # noqa: E402

CLUSTERS = 10
ROUTE_NAME = "outbound"
TYPES = (typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.LISTENER, typeurls.ROUTE)
Resources = dict[str, dict[str, Any]]


# ---------------------------------------------------------------------------------------------
# A proxy's configuration: CLUSTERS EDS clusters, their endpoints, two HTTP listeners, routes.


def _ads_source() -> Any:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )


def _address(port: int) -> Any:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
    )


def _packed(message: Any) -> Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _cluster(name: str, generation: int) -> Any:
    made = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    made.connect_timeout.seconds = 1 + generation % 5
    made.eds_cluster_config.eds_config.CopyFrom(_ads_source())
    return made


def _assignment(name: str, generation: int) -> Any:
    components = endpoint_components_pb2
    lbs = [
        components.LbEndpoint(endpoint=components.Endpoint(address=_address(8000 + i + generation)))
        for i in range(3)
    ]
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name, endpoints=[components.LocalityLbEndpoints(lb_endpoints=lbs)]
    )


def _listener(name: str, port: int, generation: int) -> Any:
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=f"{name}-{generation}",
        rds=hcm_pb2.Rds(route_config_name=ROUTE_NAME, config_source=_ads_source()),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=_packed(router_pb2.Router())
            )
        ],
    )
    chain = listener_components_pb2.FilterChain(
        filters=[
            listener_components_pb2.Filter(
                name="envoy.filters.network.http_connection_manager", typed_config=_packed(manager)
            )
        ]
    )
    return listener_pb2.Listener(name=name, address=_address(port), filter_chains=[chain])


def _routes(generation: int) -> Any:
    components = route_components_pb2
    rules = [
        components.Route(
            match=components.RouteMatch(prefix=f"/svc-{i}/{generation}"),
            route=components.RouteAction(cluster=f"svc-{i}"),
        )
        for i in range(CLUSTERS)
    ]
    host = components.VirtualHost(name="all", domains=["*"], routes=rules)
    return route_pb2.RouteConfiguration(name=ROUTE_NAME, virtual_hosts=[host])


def proxy_config(cds: int = 0, eds: int = 0, lds: int = 0, rds: int = 0) -> Resources:
    """One proxy's resources; bumping a generation changes that type's content."""
    names = [f"svc-{i}" for i in range(CLUSTERS)]
    listeners = [_listener("outbound", 15001, lds), _listener("inbound", 15006, lds)]
    return {
        typeurls.CLUSTER: {n: _cluster(n, cds) for n in names},
        typeurls.ENDPOINT: {n: _assignment(n, eds) for n in names},
        typeurls.LISTENER: {li.name: li for li in listeners},
        typeurls.ROUTE: {ROUTE_NAME: _routes(rds)},
    }


# ---------------------------------------------------------------------------------------------
# The simulated proxies (child process)


def _subscriptions(node_id: str) -> list[Any]:
    requests = []
    for type_url in TYPES:
        names: list[str] = []
        if type_url == typeurls.ENDPOINT:
            names = [f"svc-{i}" for i in range(CLUSTERS)]
        elif type_url == typeurls.ROUTE:
            names = [ROUTE_NAME]
        requests.append(discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names))
    requests[0].node.id = node_id
    return requests


async def _proxy(stub: Any, node_id: str) -> None:
    """One Envoy-like stream: subscribe to four types, ACK every response."""
    call = stub.StreamAggregatedResources(metadata=(("authorization", "Bearer bench"),))
    subscriptions = {r.type_url: r for r in _subscriptions(node_id)}
    for request in subscriptions.values():
        await call.write(request)
    async for response in call:
        ack = discovery_pb2.DiscoveryRequest()
        ack.CopyFrom(subscriptions[response.type_url])
        ack.ClearField("node")
        ack.version_info, ack.response_nonce = response.version_info, response.nonce
        await call.write(ack)


async def run_proxies(port: int, clients: int, per_channel: int) -> None:
    channel_count = max(1, math.ceil(clients / per_channel))
    # A local subchannel pool gives each channel its own connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
        for _ in range(channel_count)
    ]
    stubs = [ads_pb2_grpc.AggregatedDiscoveryServiceStub(c) for c in channels]
    tasks = [
        asyncio.create_task(_proxy(stubs[i % channel_count], node_name(i))) for i in range(clients)
    ]
    await asyncio.gather(*tasks, return_exceptions=True)


def node_name(index: int) -> str:
    return f"proxy-{index:05d}"


# ---------------------------------------------------------------------------------------------
# The server side and the measurements (this process)


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


@dataclass
class PushFigures:
    latencies: list[float]
    cpu_seconds: float = 0.0
    set_seconds: float = 0.0
    responses: int = 0
    set_calls: int = 0

    def line(self, label: str) -> str:
        per_response = (self.cpu_seconds - self.set_seconds) / max(1, self.responses) * 1e6
        per_set = self.set_seconds / max(1, self.set_calls) * 1e6
        return (
            f"  {label:<32} push-to-ACK p50 {percentile(self.latencies, 0.5) * 1e3:8.1f} ms"
            f"  p99 {percentile(self.latencies, 0.99) * 1e3:8.1f} ms"
            f"  | server CPU {per_response:6.0f} us/response"
            f"  | set_resources {per_set:6.0f} us/proxy"
        )


@dataclass
class Server:
    cache: SnapshotCache
    status: StatusBoard
    ads: AdsServer
    grpc_server: Any
    port: int


async def start_server() -> Server:
    async def authenticate(metadata: Sequence[tuple[str, str]], node_id: str) -> str:
        return node_id

    cache, status = SnapshotCache(), StatusBoard()
    ads = AdsServer(cache, authenticate, status=status)
    grpc_server = grpc.aio.server(options=SERVER_OPTIONS)
    serve_ads(grpc_server, ads)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    return Server(cache, status, ads, grpc_server, port)


async def push(
    server: Server, nodes: Sequence[str], config: Resources, figures: PushFigures
) -> None:
    cpu_before, sent_before = time.process_time(), server.ads.responses_sent
    started = time.perf_counter()
    changed: frozenset[str] = frozenset()
    for node in nodes:
        changed |= server.cache.set_resources(node, config)
    figures.set_seconds += time.process_time() - cpu_before
    figures.set_calls += len(nodes)
    acked = await server.status.wait_acked(nodes, changed, server.cache.version, timeout=60)
    figures.latencies.append(time.perf_counter() - started)
    if not acked:
        raise RuntimeError("not every proxy ACKed the push within 60 s")
    figures.cpu_seconds += time.process_time() - cpu_before
    figures.responses += server.ads.responses_sent - sent_before


async def measure(clients: int, pushes: int, per_channel: int) -> list[str]:
    server = await start_server()
    nodes = [node_name(i) for i in range(clients)]
    for node in nodes:
        server.cache.set_resources(node, proxy_config())
    rss_before = rss_kb()
    started = time.perf_counter()
    script = str(Path(__file__).resolve())
    options = [
        "--proxies",
        str(clients),
        "--port",
        str(server.port),
        "--per-channel",
        str(per_channel),
    ]
    child = subprocess.Popen([sys.executable, script, *options])
    try:
        if not await server.status.wait_acked(nodes, TYPES, server.cache.version, timeout=60):
            raise RuntimeError("the proxies did not all ACK their initial configuration")
        connected = time.perf_counter() - started
        rss_per_client = (rss_kb() - rss_before) / clients
        lds, full = PushFigures([]), PushFigures([])
        for generation in range(1, pushes + 1):
            await push(server, nodes, proxy_config(lds=generation), lds)
        for generation in range(pushes + 1, pushes + 1 + max(1, pushes // 2)):
            g = generation
            await push(server, nodes, proxy_config(cds=g, eds=g, lds=g, rds=g), full)
    finally:
        child.terminate()
        child.wait(10)
        await server.grpc_server.stop(None)
    channels = max(1, math.ceil(clients / per_channel))
    return [
        f"{clients} clients over {channels} connection(s): all connected and initial config "
        f"(4 types) ACKed in {connected:.2f} s; server RSS {rss_per_client:.1f} KB per client",
        lds.line(f"LDS change, {len(lds.latencies)} pushes"),
        full.line(f"full change, {len(full.latencies)} pushes"),
    ]


async def main(clients: Sequence[int], pushes: int, per_channel: int) -> None:
    print(f"command: python bench/ads.py --clients {','.join(map(str, clients))} "
          f"--pushes {pushes} --per-channel {per_channel}")  # fmt: skip
    print(f"{CLUSTERS} clusters + {CLUSTERS} endpoint sets + 2 listeners + 1 route table per proxy")
    for count in clients:
        for line in await measure(count, pushes, per_channel):
            print(line, flush=True)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", default="1,100,1000", help="comma-separated client counts")
    parser.add_argument("--pushes", type=int, default=10, help="listener pushes per count")
    parser.add_argument("--per-channel", type=int, default=100, help="streams per connection")
    parser.add_argument("--proxies", type=int, help=argparse.SUPPRESS)  # child process mode
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    if args.proxies is not None:
        asyncio.run(run_proxies(args.port, args.proxies, args.per_channel))
    else:
        counts = [int(c) for c in args.clients.split(",")]
        asyncio.run(main(counts, args.pushes, args.per_channel))
