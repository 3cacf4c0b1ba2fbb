"""What a proxy sends: a listener, route, cluster and endpoints per `spec.outbound` entry.

A destination is a (service, namespace, port) the Dataplane declared it calls. Its serving
Dataplanes are those registered with that service in that namespace and an inbound `port`
equal to the destination port. From them come:

- the endpoints (EDS): only serving Dataplanes that are connected and ready, and not revoked;
  Envoy's EDS takes IP literals only, so Dataplanes registered by host name are left out;
- the client TLS: derived from the servers' effective mode on that port, never configured
  separately. mTLS unless *every* serving Dataplane has DISABLE there (a mix of modes gets
  the safe choice: mTLS works against STRICT and PERMISSIVE alike); with no serving Dataplane
  at all, also mTLS (fail closed). The server certificate must carry the SPIFFE ID of one of
  the serving Dataplanes (registered, not revoked), connected or not, so that readiness
  changes only touch EDS;
- the protocol: the serving Dataplanes' protocol on that port when they agree, else (or with
  none registered) tcp, which carries any protocol.

Names: listener `outbound:<localPort>`, cluster, ClusterLoadAssignment and RouteConfiguration
`outbound|<port>|<service>.<namespace>`; with a transparent proxy, one listener per serving
address `outbound:<ip>:<port>` that does not bind (iptables delivers to it via the outbound
redirect listener).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from verity.resources import Dataplane
from verity.resources.verity_kinds import MeshTls, Protocol
from verity.xds.inbound import H2_PROTOCOLS, HTTP_PROTOCOLS
from verity.xds.snapshot import MeshSnapshot
from verity.xds.tlsconfig import (
    ALPN_H2,
    ALPN_HTTP11,
    ads_source,
    http2_upstream_options,
    is_ip,
    network_filter,
    router_filter,
    socket_address,
    tcp_proxy,
    tls_transport_socket,
    upstream_tls,
)

LOCAL_HOST = "127.0.0.1"
HostPort = tuple[str, int]


@dataclass(frozen=True)
class Destination:
    """One service this proxy calls, with everything its config is derived from."""

    service: str
    namespace: str
    port: int
    local_port: int | None
    protocol: Protocol
    mtls: bool
    peer_ids: tuple[str, ...]
    endpoints: tuple[HostPort, ...]
    addresses: tuple[HostPort, ...]

    @property
    def cluster_name(self) -> str:
        """Also the name of its ClusterLoadAssignment and RouteConfiguration."""
        return f"outbound|{self.port}|{self.service}.{self.namespace}"

    @property
    def stat_prefix(self) -> str:
        return f"outbound_{self.port}_{self.service}.{self.namespace}"

    @property
    def sni(self) -> str:
        return f"outbound_.{self.port}_.{self.service}.{self.namespace}"

    @property
    def is_http(self) -> bool:
        return self.protocol in HTTP_PROTOCOLS


def destinations(snapshot: MeshSnapshot, dataplane: Dataplane) -> list[Destination]:
    """The Dataplane's outbound entries, resolved against the snapshot, in a stable order."""
    found = [
        _destination(
            snapshot,
            out.service,
            dataplane.outbound_namespace(out),
            out.port,
            out.local_port,
        )
        for out in dataplane.spec.outbound
    ]
    return sorted(found, key=lambda d: (d.namespace, d.service, d.port))


def _destination(
    snapshot: MeshSnapshot, service: str, namespace: str, port: int, local_port: int | None
) -> Destination:
    serving = snapshot.serving(service, namespace, port)
    trusted = [dp for dp in serving if not snapshot.is_revoked(dp)]
    modes = {snapshot.mtls(dp).port_mode(port).mode for dp in serving}
    return Destination(
        service=service,
        namespace=namespace,
        port=port,
        local_port=local_port,
        protocol=_protocol(serving, port),
        mtls=modes != {"DISABLE"},
        peer_ids=tuple(sorted({snapshot.spiffe_id(dp) for dp in trusted})),
        endpoints=_host_ports((dp for dp in trusted if snapshot.is_ready(dp)), port),
        addresses=_host_ports(serving, port),
    )


def _protocol(serving: Sequence[Dataplane], port: int) -> Protocol:
    protocols = {i.protocol for dp in serving for i in dp.spec.inbound if i.port == port}
    return protocols.pop() if len(protocols) == 1 else "tcp"


def _host_ports(dataplanes: Iterable[Dataplane], port: int) -> tuple[HostPort, ...]:
    return tuple(sorted({(dp.spec.address, port) for dp in dataplanes if is_ip(dp.spec.address)}))


# --- clusters and endpoints --------------------------------------------------------------------


def outbound_clusters(destinations: Iterable[Destination], tls: MeshTls) -> list[Message]:
    return [_cluster(destination, tls) for destination in destinations]


def _cluster(destination: Destination, tls: MeshTls) -> Message:
    cluster = cluster_pb2.Cluster(
        name=destination.cluster_name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source()),
        connect_timeout=duration_pb2.Duration(seconds=5),
    )
    h2 = destination.protocol in H2_PROTOCOLS
    if h2:
        for key, value in http2_upstream_options().items():
            cluster.typed_extension_protocol_options[key].CopyFrom(value)
    if destination.mtls:
        alpn = ALPN_H2 if h2 else ALPN_HTTP11 if destination.is_http else ()
        context = upstream_tls(tls, sni=destination.sni, peer_ids=destination.peer_ids, alpn=alpn)
        cluster.transport_socket.CopyFrom(tls_transport_socket(context))
    return cluster


def outbound_endpoints(destinations: Iterable[Destination]) -> list[Message]:
    """A ClusterLoadAssignment per destination, empty when no endpoint is ready (so that
    Envoy does not wait for it)."""
    return [_load_assignment(destination) for destination in destinations]


def _load_assignment(destination: Destination) -> Message:
    endpoints = [
        endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(address=socket_address(host, port))
        )
        for host, port in destination.endpoints
    ]
    assignment = endpoint_pb2.ClusterLoadAssignment(cluster_name=destination.cluster_name)
    if endpoints:
        assignment.endpoints.append(
            endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=endpoints)
        )
    return assignment


# --- routes and listeners ----------------------------------------------------------------------


def outbound_routes(destinations: Iterable[Destination]) -> list[Message]:
    return [_route(d) for d in destinations if d.is_http]


def _route(destination: Destination) -> Message:
    name = destination.cluster_name
    action = route_components_pb2.RouteAction(
        cluster=name, timeout=duration_pb2.Duration(seconds=0)
    )
    route = route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix="/"), route=action
    )
    host = route_components_pb2.VirtualHost(name=name, domains=["*"], routes=[route])
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[host])


def outbound_listeners(destinations: Iterable[Destination]) -> list[Message]:
    """A loopback listener per destination with a `localPort`, where the app connects."""
    return [
        _listener(
            f"outbound:{d.local_port}", socket_address(LOCAL_HOST, d.local_port), d, bind=True
        )
        for d in destinations
        if d.local_port is not None
    ]


def transparent_listeners(
    destinations: Iterable[Destination], taken: Iterable[HostPort]
) -> list[Message]:
    """Non-binding listeners on every serving address of every destination.

    The outbound redirect listener hands an intercepted connection to the listener of its
    original destination, so a connection to any instance of a service is carried by that
    service's cluster (and its mTLS). Addresses in `taken` (the proxy's own listeners) and
    addresses already claimed by an earlier destination are skipped: Envoy refuses two
    listeners on one address.
    """
    seen = set(taken)
    listeners = []
    for destination in destinations:
        for host, port in destination.addresses:
            if (host, port) in seen:
                continue
            seen.add((host, port))
            name = f"outbound:{_host_port(host, port)}"
            listeners.append(_listener(name, socket_address(host, port), destination, bind=False))
    return listeners


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listener(name: str, address: Message, destination: Destination, *, bind: bool) -> Message:
    listener = listener_pb2.Listener(
        name=name,
        address=address,
        traffic_direction=base_pb2.OUTBOUND,
        filter_chains=[
            listener_components_pb2.FilterChain(filters=[_terminal_filter(destination)])
        ],
    )
    if not bind:
        listener.bind_to_port.value = False
    return listener


def _terminal_filter(destination: Destination) -> Message:
    if not destination.is_http:
        return tcp_proxy(destination.stat_prefix, destination.cluster_name)
    # The defaults are right for the app side: the downstream is the local app, so its
    # address means nothing (use_remote_address off), and an x-forwarded-client-cert the
    # app sends is removed (SANITIZE); the server side sets the real one.
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=destination.stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=ads_source(), route_config_name=destination.cluster_name),
        http_filters=[router_filter()],
    )
    return network_filter("envoy.filters.network.http_connection_manager", manager)
