"""The Envoy building blocks both directions share: TLS contexts fed by SDS, and the small
pieces every listener and cluster is made of (addresses, filter wrappers, the ADS source,
HTTP/2 upstream options).

Secrets never travel in this configuration: listeners and clusters only *name* the workload
certificate and the trust bundle, and Envoy fetches them from the agent's local SDS server
(a Unix socket reached through the bootstrap's static cluster `SDS_CLUSTER`). The three names
and the shape of the SDS config are the agent's (`verity.dataplane.sds`); xds may not import
the agent, so they are repeated here and a unit test keeps the two equal.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    grpc_service_pb2,
    protocol_pb2,
)
from envoy.config.listener.v3 import listener_components_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, wrappers_pb2
from google.protobuf.message import Message

from verity.resources.verity_kinds import MODERN_CIPHER_SUITES, MeshTls

CERT_SECRET = "verity-svid"  # noqa: S105 - a secret's name, not a secret
BUNDLE_SECRET = "verity-trust-bundle"  # noqa: S105 - a name
SDS_CLUSTER = "verity-sds"

TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ALPN_HTTP = ("h2", "http/1.1")
ALPN_H2 = ("h2",)
ALPN_HTTP11 = ("http/1.1",)
# A URI no certificate of the mesh carries: an empty SAN list would mean "accept any SAN".
NO_IDENTITY = "spiffe://verity.invalid/no-allowed-identity"

_TLS_VERSION = common_pb2.TlsParameters.TlsProtocol


# --- SDS -------------------------------------------------------------------------------------


def sds_secret_config(name: str) -> Message:
    """An `SdsSecretConfig` that fetches `name` from the agent's local SDS server."""
    return secret_pb2.SdsSecretConfig(
        name=name,
        sds_config=config_source_pb2.ConfigSource(
            resource_api_version=config_source_pb2.V3,
            api_config_source=config_source_pb2.ApiConfigSource(
                api_type=config_source_pb2.ApiConfigSource.GRPC,
                transport_api_version=config_source_pb2.V3,
                set_node_on_first_message_only=True,
                grpc_services=[
                    grpc_service_pb2.GrpcService(
                        envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=SDS_CLUSTER)
                    )
                ],
            ),
        ),
    )


# --- TLS contexts ----------------------------------------------------------------------------


def tls_params(tls: MeshTls) -> Message:
    """Protocol versions and TLS 1.2 suites from the Mesh.

    Both ends set the maximum explicitly: Envoy's client default is TLS 1.2. TLS 1.3 suites are
    not configurable in BoringSSL, so the list only matters when 1.2 is allowed; it is the
    Mesh's list or the modern (ECDHE, AEAD) defaults, never anything weaker.
    """
    params = common_pb2.TlsParameters(
        tls_minimum_protocol_version=_TLS_VERSION.Value(tls.min_version),
        tls_maximum_protocol_version=_TLS_VERSION.Value(tls.max_version),
    )
    if tls.min_version == "TLSv1_2":
        params.cipher_suites.extend(tls.cipher_suites or MODERN_CIPHER_SUITES)
    return params


def _common_context(tls: MeshTls, alpn: Sequence[str]) -> Message:
    return tls_pb2.CommonTlsContext(
        tls_params=tls_params(tls),
        tls_certificate_sds_secret_configs=[sds_secret_config(CERT_SECRET)],
        alpn_protocols=list(alpn),
    )


def downstream_tls(tls: MeshTls, alpn: Sequence[str] = ()) -> Message:
    """Server side of mTLS: our SVID, and a client certificate the trust bundle verifies.

    No SAN matcher here on purpose: any SAN matcher makes a client certificate mandatory
    even where it should be optional, and who the peer is is RBAC's decision, not TLS's.
    """
    common = _common_context(tls, alpn)
    common.validation_context_sds_secret_config.CopyFrom(sds_secret_config(BUNDLE_SECRET))
    return tls_pb2.DownstreamTlsContext(
        common_tls_context=common, require_client_certificate=wrappers_pb2.BoolValue(value=True)
    )


def upstream_tls(
    tls: MeshTls, *, sni: str, peer_ids: Iterable[str], alpn: Sequence[str] = ()
) -> Message:
    """Client side of mTLS: our SVID, the bundle, and the server must be one of `peer_ids`.

    The SAN list sits in the default half of a combined validation context, so it is merged
    with whatever validator (plain roots or SPIFFE per trust domain) the SDS bundle carries.
    """
    ids = sorted(set(peer_ids)) or [NO_IDENTITY]
    common = _common_context(tls, alpn)
    combined = common.combined_validation_context
    combined.default_validation_context.match_typed_subject_alt_names.extend(
        common_pb2.SubjectAltNameMatcher(
            san_type=common_pb2.SubjectAltNameMatcher.URI,
            matcher=string_pb2.StringMatcher(exact=peer),
        )
        for peer in ids
    )
    combined.validation_context_sds_secret_config.CopyFrom(sds_secret_config(BUNDLE_SECRET))
    return tls_pb2.UpstreamTlsContext(common_tls_context=common, sni=sni)


def tls_transport_socket(context: Message) -> Message:
    return base_pb2.TransportSocket(name=TLS_TRANSPORT_SOCKET, typed_config=pack(context))


# --- small pieces ----------------------------------------------------------------------------


def pack(message: Message) -> Message:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def socket_address(host: str, port: int) -> Message:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def network_filter(name: str, config: Message) -> Message:
    return listener_components_pb2.Filter(name=name, typed_config=pack(config))


def listener_filter(name: str, config: Message) -> Message:
    return listener_components_pb2.ListenerFilter(name=name, typed_config=pack(config))


def http_filter(name: str, config: Message) -> Message:
    return hcm_pb2.HttpFilter(name=name, typed_config=pack(config))


def router_filter() -> Message:
    return http_filter("envoy.filters.http.router", router_pb2.Router())


def tcp_proxy(stat_prefix: str, cluster: str) -> Message:
    config = tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix, cluster=cluster)
    return network_filter("envoy.filters.network.tcp_proxy", config)


def ads_source() -> Message:
    """RDS and EDS come over the same ADS stream as everything else."""
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def http2_upstream_options() -> dict[str, Message]:
    """`typed_extension_protocol_options` for a cluster that speaks HTTP/2 to its upstream."""
    options = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    return {HTTP_PROTOCOL_OPTIONS: pack(options)}
