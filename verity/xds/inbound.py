"""What a proxy receives: one listener per inbound port, its route and its cluster to the app.

Each inbound port gets its effective mTLS mode (`verity.policy.mtls`):

- STRICT: one filter chain, TLS with a required client certificate;
- PERMISSIVE: a `tls_inspector` listener filter and two chains on the same port, one for
  `transport_protocol: tls` (mTLS, as STRICT) and one for `raw_buffer` (plaintext);
- DISABLE: one plaintext chain.

Who may call is decided by RBAC, not by TLS (a server-side SAN matcher would make client
certificates mandatory even on the plaintext-capable chain). `inbound_authz_filters` gives
each chain the authorization filters of the policies that select the workload
(`verity.xds.rbac`: revoked identities first, JWT, AUDIT, CUSTOM, DENY, ALLOW, and the Mesh's
default action when no ALLOW policy selects it); a STRICT listener also gets the TLS
inspector when a policy tests `connection.sni`, which only the inspector records.

HTTP ports (http, http2, grpc) use HTTP RBAC, which answers a refused request with 403 instead
of resetting the connection (callers, tests and logs can tell a refusal from a failure), and
tell the app who called in `x-forwarded-client-cert`, with only the peer's URI SAN; a header
of that name from the client is always removed first. TCP ports use network RBAC.

Routes travel over RDS so that route changes take effect without draining the listener.
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import duration_pb2, wrappers_pb2
from google.protobuf.message import Message

from verity.policy import MtlsMode
from verity.resources import Dataplane
from verity.resources.verity_kinds import DataplaneInbound
from verity.xds.accesslog import refusal_access_log
from verity.xds.rbac import http_authz_filters, network_authz_filters, uses_server_name
from verity.xds.snapshot import MeshSnapshot
from verity.xds.tlsconfig import (
    ALPN_HTTP,
    ads_source,
    downstream_tls,
    http2_upstream_options,
    is_ip,
    listener_filter,
    network_filter,
    router_filter,
    socket_address,
    tcp_proxy,
    tls_transport_socket,
)

APP_HOST = "127.0.0.1"
HTTP_PROTOCOLS = frozenset({"http", "http2", "grpc"})
H2_PROTOCOLS = frozenset({"http2", "grpc"})

_HCM = hcm_pb2.HttpConnectionManager


def listener_name(port: int) -> str:
    return f"inbound:{port}"


def cluster_name(port: int) -> str:
    """Also the name of the port's RouteConfiguration."""
    return f"inbound|{port}"


def stat_prefix(port: int) -> str:
    return f"inbound_{port}"


# --- authorization ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthzFilters:
    """The authorization filters of one inbound filter chain: network filters for TCP ports
    (run before tcp_proxy), HTTP filters for HTTP ports (run before the router)."""

    network: tuple[Message, ...] = ()
    http: tuple[Message, ...] = ()


def inbound_authz_filters(
    snapshot: MeshSnapshot, dataplane: Dataplane, inbound: DataplaneInbound, *, mtls: bool
) -> AuthzFilters:
    """The authorization filters of `inbound`'s chain (`mtls`: the chain terminates mTLS):
    the policies that select the workload, as `verity.xds.rbac` writes them."""
    policies = snapshot.authorization(dataplane)
    if inbound.protocol in HTTP_PROTOCOLS:
        return AuthzFilters(http=tuple(http_authz_filters(policies, mtls=mtls)))
    return AuthzFilters(
        network=tuple(network_authz_filters(policies, port=inbound.port, mtls=mtls))
    )


def _needs_server_name(snapshot: MeshSnapshot, dataplane: Dataplane) -> bool:
    """Whether a policy of the workload reads the SNI, which only the TLS inspector records."""
    return uses_server_name(snapshot.authorization(dataplane))


# --- listeners -------------------------------------------------------------------------------


def inbound_listeners(
    snapshot: MeshSnapshot, dataplane: Dataplane, *, transparent: bool
) -> list[Message]:
    """One listener per inbound port, on the Dataplane's address.

    With a transparent proxy the listeners do not bind: iptables sends inbound traffic to the
    inbound redirect port, whose listener hands each connection to the listener of its
    original destination (the app may itself listen on the same port number).
    """
    modes = snapshot.mtls(dataplane)
    return [
        _listener(snapshot, dataplane, inbound, modes.port_mode(inbound.port).mode, transparent)
        for inbound in sorted(dataplane.spec.inbound, key=lambda i: i.port)
    ]


def _listener(
    snapshot: MeshSnapshot,
    dataplane: Dataplane,
    inbound: DataplaneInbound,
    mode: MtlsMode,
    transparent: bool,
) -> Message:
    # Envoy binds IP literals only: a Dataplane registered by host name listens everywhere.
    host = dataplane.spec.address if is_ip(dataplane.spec.address) else "0.0.0.0"  # noqa: S104
    listener = listener_pb2.Listener(
        name=listener_name(inbound.port),
        address=socket_address(host, inbound.port),
        traffic_direction=base_pb2.INBOUND,
        filter_chains=_filter_chains(snapshot, dataplane, inbound, mode),
    )
    if mode == "PERMISSIVE" or (mode == "STRICT" and _needs_server_name(snapshot, dataplane)):
        inspector = tls_inspector_pb2.TlsInspector()
        listener.listener_filters.append(
            listener_filter("envoy.filters.listener.tls_inspector", inspector)
        )
    if transparent:
        listener.bind_to_port.value = False
    return listener


def _filter_chains(
    snapshot: MeshSnapshot, dataplane: Dataplane, inbound: DataplaneInbound, mode: MtlsMode
) -> list[Message]:
    if mode == "STRICT":
        return [_chain(snapshot, dataplane, inbound, mtls=True)]
    if mode == "DISABLE":
        return [_chain(snapshot, dataplane, inbound, mtls=False)]
    tls = _chain(snapshot, dataplane, inbound, mtls=True)
    tls.filter_chain_match.transport_protocol = "tls"
    plain = _chain(snapshot, dataplane, inbound, mtls=False)
    plain.filter_chain_match.transport_protocol = "raw_buffer"
    return [tls, plain]


def _chain(
    snapshot: MeshSnapshot, dataplane: Dataplane, inbound: DataplaneInbound, *, mtls: bool
) -> Message:
    authz = inbound_authz_filters(snapshot, dataplane, inbound, mtls=mtls)
    is_http = inbound.protocol in HTTP_PROTOCOLS
    terminal = (
        _http_manager(inbound.port, authz.http)
        if is_http
        else tcp_proxy(stat_prefix(inbound.port), cluster_name(inbound.port))
    )
    chain = listener_components_pb2.FilterChain(
        name="mtls" if mtls else "plaintext", filters=[*authz.network, terminal]
    )
    if mtls:
        alpn = ALPN_HTTP if is_http else ()
        chain.transport_socket.CopyFrom(
            tls_transport_socket(downstream_tls(snapshot.mesh.tls, alpn))
        )
    return chain


def _http_manager(port: int, authz: tuple[Message, ...]) -> Message:
    manager = _HCM(
        stat_prefix=stat_prefix(port),
        codec_type=_HCM.AUTO,
        rds=hcm_pb2.Rds(config_source=ads_source(), route_config_name=cluster_name(port)),
        http_filters=[*authz, router_filter()],
        # The peer is the direct caller: its address is the truth, not X-Forwarded-For.
        use_remote_address=wrappers_pb2.BoolValue(value=True),
        # The app learns the caller's SPIFFE ID, and only from Envoy: the client's own
        # x-forwarded-client-cert is dropped (on plaintext chains nothing is set).
        forward_client_cert_details=_HCM.SANITIZE_SET,
        set_current_client_cert_details=_HCM.SetCurrentClientCertDetails(uri=True),
        # Authorization on paths needs one spelling of each path.
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
        # Every refusal leaves a line naming the policy, the caller and the request.
        access_log=[refusal_access_log()],
    )
    return network_filter("envoy.filters.network.http_connection_manager", manager)


# --- routes and clusters -----------------------------------------------------------------------


def inbound_routes(dataplane: Dataplane) -> list[Message]:
    """The RouteConfiguration of each HTTP inbound port: everything to the app."""
    return [
        _route(inbound.port)
        for inbound in sorted(dataplane.spec.inbound, key=lambda i: i.port)
        if inbound.protocol in HTTP_PROTOCOLS
    ]


def _route(port: int) -> Message:
    name = cluster_name(port)
    action = route_components_pb2.RouteAction(
        cluster=name,
        # No proxy-imposed deadline (Envoy's default is 15 s): the app and its caller decide,
        # and gRPC streams may be long-lived.
        timeout=duration_pb2.Duration(seconds=0),
    )
    route = route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix="/"), route=action
    )
    host = route_components_pb2.VirtualHost(name=name, domains=["*"], routes=[route])
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[host])


def inbound_clusters(dataplane: Dataplane) -> list[Message]:
    """One STATIC cluster per inbound port, to the app on loopback (HTTP/2 for http2/grpc)."""
    return [_cluster(inbound) for inbound in sorted(dataplane.spec.inbound, key=lambda i: i.port)]


def _cluster(inbound: DataplaneInbound) -> Message:
    name = cluster_name(inbound.port)
    endpoint = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=socket_address(APP_HOST, inbound.target_port)
        )
    )
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=5),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[endpoint])],
        ),
    )
    if inbound.protocol in H2_PROTOCOLS:
        for key, value in http2_upstream_options().items():
            cluster.typed_extension_protocol_options[key].CopyFrom(value)
    return cluster
