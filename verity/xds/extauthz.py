"""ext_authz filters for CUSTOM AuthorizationPolicies, from the Mesh's providers.

Only requests a CUSTOM policy's rules match go to the provider: an RBAC filter with the
CUSTOM rules as shadow rules runs first and records `<prefix>shadow_engine_result: denied`
for the requests they match (`verity.xds.rbac`), and the ext_authz filter is enabled by that
metadata only (Istio's design). The provider is reached through the cluster
`ext_authz_cluster_name(provider)`, which the integrator adds (`ext_authz_cluster`).
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2, grpc_service_pb2, http_uri_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.network.ext_authz.v3 import ext_authz_pb2 as network_ext_authz_pb2
from envoy.type.matcher.v3 import metadata_pb2, regex_pb2, string_pb2, value_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from verity.resources.verity_kinds import ExtAuthzGrpc, ExtAuthzHttp, ExtAuthzProvider
from verity.xds.tlsconfig import http2_upstream_options, http_filter, network_filter, socket_address

HTTP_EXT_AUTHZ = "envoy.filters.http.ext_authz"
NETWORK_EXT_AUTHZ = "envoy.filters.network.ext_authz"
HTTP_RBAC = "envoy.filters.http.rbac"
NETWORK_RBAC = "envoy.filters.network.rbac"
DEFAULT_TIMEOUT_S = 0.6  # Istio's default for ext-authz providers


def ext_authz_cluster_name(provider: ExtAuthzProvider) -> str:
    return f"ext-authz|{provider.name}"


def _marked(rbac_filter: str, prefix: str) -> Message:
    """Metadata that is set when the CUSTOM rules (shadow rules, action DENY) matched."""
    return metadata_pb2.MetadataMatcher(
        filter=rbac_filter,
        path=[metadata_pb2.MetadataMatcher.PathSegment(key=f"{prefix}shadow_engine_result")],
        value=value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(exact="denied")),
    )


def _timeout(seconds: float | None) -> Message:
    value = DEFAULT_TIMEOUT_S if seconds is None else seconds
    whole = int(value)
    return duration_pb2.Duration(seconds=whole, nanos=round((value - whole) * 1e9))


def _grpc_service(provider: ExtAuthzProvider, settings: ExtAuthzGrpc) -> Message:
    seconds = settings.timeout.total_seconds() if settings.timeout else None
    return grpc_service_pb2.GrpcService(
        envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(
            cluster_name=ext_authz_cluster_name(provider)
        ),
        timeout=_timeout(seconds),
    )


def ext_authz_filters(provider: ExtAuthzProvider, prefix: str) -> list[Message]:
    """The HTTP ext_authz filter for `provider`, enabled by the CUSTOM marker `prefix`."""
    config = ext_authz_pb2.ExtAuthz(
        transport_api_version=config_source_pb2.V3,
        filter_enabled_metadata=_marked(HTTP_RBAC, prefix),
    )
    settings: ExtAuthzGrpc | ExtAuthzHttp | None = (
        provider.envoy_ext_authz_grpc or provider.envoy_ext_authz_http
    )
    assert settings is not None  # validation: exactly one of the two
    config.failure_mode_allow = settings.fail_open
    if settings.status_on_error:
        config.status_on_error.CopyFrom(
            http_status_pb2.HttpStatus(code=int(settings.status_on_error))
        )
    if isinstance(settings, ExtAuthzGrpc):
        config.grpc_service.CopyFrom(_grpc_service(provider, settings))
    else:
        _http_service(config, provider, settings)
    return [http_filter(HTTP_EXT_AUTHZ, config)]


def _patterns(values: list[str]) -> list[Message]:
    found = []
    for value in values:
        if value == "*":
            found.append(string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=".*")))
        elif value.startswith("*"):
            found.append(string_pb2.StringMatcher(suffix=value[1:], ignore_case=True))
        elif value.endswith("*"):
            found.append(string_pb2.StringMatcher(prefix=value[:-1], ignore_case=True))
        else:
            found.append(string_pb2.StringMatcher(exact=value, ignore_case=True))
    return found


def _http_service(config: Message, provider: ExtAuthzProvider, settings: ExtAuthzHttp) -> None:
    host = settings.service.rpartition("/")[2]
    seconds = settings.timeout.total_seconds() if settings.timeout else None
    service = config.http_service
    service.server_uri.CopyFrom(
        http_uri_pb2.HttpUri(
            uri=f"http://{host}:{settings.port}",
            cluster=ext_authz_cluster_name(provider),
            timeout=_timeout(seconds),
        )
    )
    if settings.path_prefix:
        service.path_prefix = settings.path_prefix
    for name, value in sorted(settings.include_additional_headers_in_check.items()):
        header = service.authorization_request.headers_to_add.add()
        header.header.key, header.header.value = name, value
    response = service.authorization_response
    for matcher, values in (
        (response.allowed_upstream_headers, settings.headers_to_upstream_on_allow),
        (response.allowed_client_headers, settings.headers_to_downstream_on_deny),
        (response.allowed_client_headers_on_success, settings.headers_to_downstream_on_allow),
        (config.allowed_headers, settings.include_request_headers_in_check),
    ):
        # An empty list is refused by Envoy: leave the matcher unset (Envoy's defaults).
        if values:
            matcher.patterns.extend(_patterns(values))


def ext_authz_network_filter(provider: ExtAuthzProvider, prefix: str, stat_prefix: str) -> Message:
    """The network ext_authz filter of a gRPC provider, enabled by the CUSTOM marker."""
    settings = provider.envoy_ext_authz_grpc
    assert settings is not None  # HTTP providers add no TCP check
    config = network_ext_authz_pb2.ExtAuthz(
        stat_prefix=f"{stat_prefix}{prefix}",
        grpc_service=_grpc_service(provider, settings),
        failure_mode_allow=settings.fail_open,
        transport_api_version=config_source_pb2.V3,
        filter_enabled_metadata=_marked(NETWORK_RBAC, prefix),
    )
    return network_filter(NETWORK_EXT_AUTHZ, config)


def ext_authz_cluster(provider: ExtAuthzProvider) -> Message:
    """A DNS cluster to the provider's service (HTTP/2 for gRPC providers)."""
    settings: ExtAuthzGrpc | ExtAuthzHttp | None = (
        provider.envoy_ext_authz_grpc or provider.envoy_ext_authz_http
    )
    assert settings is not None
    name = ext_authz_cluster_name(provider)
    endpoint = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=socket_address(settings.service.rpartition("/")[2], settings.port)
        )
    )
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STRICT_DNS,
        connect_timeout=duration_pb2.Duration(seconds=1),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[endpoint])],
        ),
    )
    if provider.envoy_ext_authz_grpc is not None:
        for key, value in http2_upstream_options().items():
            cluster.typed_extension_protocol_options[key].CopyFrom(value)
    return cluster
