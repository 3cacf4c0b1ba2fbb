"""`translate(snapshot, dataplane_key)`: the Envoy resources of one proxy, by type URL and name.

Pure and deterministic: no I/O, no clock, no globals; the same snapshot gives the same
messages, in the same order (sorted by name), whatever order the snapshot's facts came in.
The output holds listeners, routes, clusters and endpoints, never a secret: certificates
reach Envoy only from the agent's local SDS server, and only the proxy's own.

Naming (see inbound.py and outbound.py):

    inbound:<port>                     listener on <address>:<port>
    inbound|<port>                     STATIC cluster to 127.0.0.1:<appPort>; RDS name
    outbound:<localPort>               listener on 127.0.0.1:<localPort>
    outbound|<port>|<service>.<ns>     EDS cluster, its ClusterLoadAssignment; RDS name
    outbound:<ip>:<port>               transparent proxy: non-binding, per serving address
    virtual-outbound, virtual-inbound  transparent proxy: the redirect listeners
    passthrough, blackhole             transparent proxy: where unknown destinations go

Transparent proxy (`spec.transparentProxy.enabled`), kept simple:
- `virtual-outbound` listens on `redirectPortOutbound` (0.0.0.0, 15001 by default), restores
  each connection's original destination and hands it to the listener bound to it: the
  `outbound:<ip>:<port>` listener of a known service instance (there are no service VIPs,
  so every instance address is a listener). Anything else goes to `passthrough` (an
  ORIGINAL_DST cluster: straight to where the app was going) if `Mesh.spec.egress
  .defaultAction` is ALLOW, else to `blackhole` (no endpoints: the connection is closed).
  A connection whose destination is the redirect port itself was not redirected (someone
  dialled 15001, or virtual-inbound handed over a connection to <address>:15001): it goes to
  `blackhole` whatever the egress policy, else passthrough would dial 15001 again, forever.
- `virtual-inbound` listens on `redirectPortInbound` (15006 by default) and hands each
  connection to its `inbound:<port>` listener, which then does not bind itself (the app
  may listen on the same port). Ports the Dataplane did not declare go to `blackhole`:
  nothing reaches the workload unmediated.
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from verity.policy.authz import compiled_policies
from verity.resources import Dataplane
from verity.xds import typeurls
from verity.xds.authn import jwks_clusters
from verity.xds.extauthz import ext_authz_cluster
from verity.xds.inbound import inbound_clusters, inbound_listeners, inbound_routes
from verity.xds.outbound import (
    LOCAL_HOST,
    destinations,
    outbound_clusters,
    outbound_endpoints,
    outbound_listeners,
    outbound_routes,
    transparent_listeners,
)
from verity.xds.snapshot import MeshSnapshot
from verity.xds.tlsconfig import is_ip, listener_filter, socket_address, tcp_proxy

Resources = dict[str, dict[str, Message]]

VIRTUAL_OUTBOUND = "virtual-outbound"
VIRTUAL_INBOUND = "virtual-inbound"
PASSTHROUGH = "passthrough"
BLACKHOLE = "blackhole"
ANY_ADDRESS = "0.0.0.0"  # noqa: S104 - iptables redirects to the redirect ports on any address


def translate(snapshot: MeshSnapshot, dataplane_key: str) -> Resources:
    """The listeners, routes, clusters and endpoints of the proxy of `dataplane_key`
    (`<namespace>/<name>`), keyed by type URL, then by resource name in sorted order."""
    dataplane = snapshot.dataplane(dataplane_key)
    transparent = dataplane.spec.transparent_proxy.enabled
    wanted = destinations(snapshot, dataplane)
    listeners = [
        *inbound_listeners(snapshot, dataplane, transparent=transparent),
        *outbound_listeners(wanted),
    ]
    clusters = [
        *inbound_clusters(dataplane),
        *outbound_clusters(wanted, snapshot.mesh.tls),
        *_authorization_clusters(snapshot, dataplane),
    ]
    if transparent:
        listeners += [
            *transparent_listeners(wanted, _own_addresses(dataplane)),
            *_virtual_listeners(snapshot, dataplane),
        ]
        clusters += _catch_all_clusters(snapshot)
    return {
        typeurls.CLUSTER: _by_name(clusters),
        typeurls.ENDPOINT: _by_name(outbound_endpoints(wanted)),
        typeurls.LISTENER: _by_name(listeners),
        typeurls.ROUTE: _by_name([*inbound_routes(dataplane), *outbound_routes(wanted)]),
    }


def _authorization_clusters(snapshot: MeshSnapshot, dataplane: Dataplane) -> list[Message]:
    """Clusters the inbound filters call out to: the ext-authz providers of the CUSTOM policies
    that select this workload, and the remote JWKS of its RequestAuthentications."""
    policies = snapshot.authorization(dataplane)
    names = {
        p.provider
        for protocol in ("http", "tcp")
        for p in compiled_policies(policies, protocol)
        if p.provider
    }
    providers = [snapshot.mesh.authorization.provider(name) for name in sorted(names)]
    return [
        *(ext_authz_cluster(p) for p in providers if p is not None),  # unknown: fails closed
        *jwks_clusters(policies.request_authentications),
    ]


def _by_name(messages: Iterable[Message]) -> dict[str, Message]:
    named: dict[str, Message] = {}
    for message in messages:
        # A ClusterLoadAssignment is named by its cluster; every other type has `name`.
        is_assignment = "cluster_name" in message.DESCRIPTOR.fields_by_name
        name = message.cluster_name if is_assignment else message.name
        if name in named:
            raise ValueError(f"two resources named {name!r}")
        named[name] = message
    return dict(sorted(named.items()))


def _own_addresses(dataplane: Dataplane) -> list[tuple[str, int]]:
    """Addresses this proxy's own listeners use: no per-destination listener may take them."""
    address = dataplane.spec.address
    inbound = [(address, i.port) for i in dataplane.spec.inbound if is_ip(address)]
    local = [(LOCAL_HOST, o.local_port) for o in dataplane.spec.outbound if o.local_port]
    return inbound + local


# --- transparent proxy ---------------------------------------------------------------------


def _virtual_listeners(snapshot: MeshSnapshot, dataplane: Dataplane) -> list[Message]:
    proxy = dataplane.spec.transparent_proxy
    egress = PASSTHROUGH if snapshot.mesh.egress.default_action == "ALLOW" else BLACKHOLE
    return [
        _redirect_listener(
            VIRTUAL_OUTBOUND,
            proxy.redirect_port_outbound,
            egress,
            base_pb2.OUTBOUND,
            refuse_own_port=True,
        ),
        _redirect_listener(
            VIRTUAL_INBOUND, proxy.redirect_port_inbound, BLACKHOLE, base_pb2.INBOUND
        ),
    ]


def _redirect_listener(
    name: str, port: int, fallback: str, direction: int, *, refuse_own_port: bool = False
) -> Message:
    chains = [
        listener_components_pb2.FilterChain(
            name=fallback, filters=[tcp_proxy(f"{name}_{fallback}", fallback)]
        )
    ]
    if refuse_own_port:
        own_port = listener_components_pb2.FilterChain(
            name=f"{BLACKHOLE}-own-port", filters=[tcp_proxy(f"{name}_own_port", BLACKHOLE)]
        )
        own_port.filter_chain_match.destination_port.value = port
        chains.append(own_port)
    listener = listener_pb2.Listener(
        name=name,
        address=socket_address(ANY_ADDRESS, port),
        traffic_direction=direction,
        # original_dst restores the pre-iptables destination; use_original_dst then hands
        # the connection to the listener bound to it.
        listener_filters=[
            listener_filter("envoy.filters.listener.original_dst", original_dst_pb2.OriginalDst())
        ],
        filter_chains=chains,
    )
    listener.use_original_dst.value = True
    return listener


def _catch_all_clusters(snapshot: MeshSnapshot) -> list[Message]:
    clusters = [
        cluster_pb2.Cluster(
            name=BLACKHOLE,
            type=cluster_pb2.Cluster.STATIC,
            connect_timeout=duration_pb2.Duration(seconds=1),
            load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=BLACKHOLE),
        )
    ]
    if snapshot.mesh.egress.default_action == "ALLOW":
        clusters.append(
            cluster_pb2.Cluster(
                name=PASSTHROUGH,
                type=cluster_pb2.Cluster.ORIGINAL_DST,
                lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
                connect_timeout=duration_pb2.Duration(seconds=5),
            )
        )
    return clusters
