"""jwt_authn from the RequestAuthentications that select a workload (Istio's semantics).

One provider per jwtRule; one requirement for every path: any of the providers, or no token
at all (`allow_missing`). So a request without a token goes on (RequestAuthentication alone
never requires one; an AuthorizationPolicy does that), while a token that no provider
verifies (bad signature, expired, unknown issuer, wrong audience) is refused with 401.

A verified token's payload is written to dynamic metadata (`envoy.filters.http.jwt_authn`,
key `payload`), where the RBAC filters match `requestPrincipals` and `request.auth.*`.

Keys come from `jwks` inline, or are fetched from `jwksUri` through the cluster
`jwks_cluster_name(uri)`, which the integrator adds (`jwks_clusters`). A rule with neither
refuses every token of its issuer (no OpenID discovery here).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import urlparse

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, http_uri_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import duration_pb2, empty_pb2
from google.protobuf.message import Message

from verity.resources import RequestAuthentication
from verity.resources.istio import JwtRule
from verity.xds.tlsconfig import http_filter, socket_address, tls_transport_socket

JWT_FILTER = "envoy.filters.http.jwt_authn"
JWT_PAYLOAD_KEY = "payload"
DEFAULT_JWKS_TIMEOUT_S = 5
# Where a JWKS over https is verified from: the system's CA bundle.
SYSTEM_CA_FILE = "/etc/ssl/certs/ca-certificates.crt"
# For a jwtRule with neither jwks nor jwksUri. Istio would discover the keys from the issuer
# (OpenID discovery); a pure translation cannot, so the issuer's tokens are all refused
# (fail closed) with this key set: a P-256 public key whose private key was thrown away.
NO_KEYS_JWKS = (
    '{"keys": [{"kty": "EC", "crv": "P-256", "kid": "verity-no-keys", "use": "sig", '
    '"x": "qRMk47qJzLPMscy-TBiy9ekorRSWsUCxWd8_bDCvdns", '
    '"y": "CtP7C3j4yaHS6U4bt7I1kM-g9XdBDABNnWRMPkkpnw4"}]}'
)


def jwt_rules_of(request_authentications: Iterable[RequestAuthentication]) -> list[JwtRule]:
    return [rule for ra in request_authentications for rule in ra.spec.jwt_rules]


def provider_name(index: int) -> str:
    return f"origins-{index}"


def jwt_authn_filter(request_authentications: Sequence[RequestAuthentication]) -> Message | None:
    """The jwt_authn HTTP filter, or None when no jwtRule selects the workload."""
    rules = jwt_rules_of(request_authentications)
    if not rules:
        return None
    config = jwt_pb2.JwtAuthentication()
    for index, rule in enumerate(rules):
        config.providers[provider_name(index)].CopyFrom(jwt_provider(rule))
    requirements = [
        *(jwt_pb2.JwtRequirement(provider_name=provider_name(i)) for i in range(len(rules))),
        jwt_pb2.JwtRequirement(allow_missing=empty_pb2.Empty()),
    ]
    config.rules.append(
        jwt_pb2.RequirementRule(
            match=route_components_pb2.RouteMatch(prefix="/"),
            requires=jwt_pb2.JwtRequirement(
                requires_any=jwt_pb2.JwtRequirementOrList(requirements=requirements)
            ),
        )
    )
    return http_filter(JWT_FILTER, config)


def jwt_provider(rule: JwtRule) -> Message:
    provider = jwt_pb2.JwtProvider(
        issuer=rule.issuer,
        audiences=rule.audiences,
        forward=rule.forward_original_token,
        payload_in_metadata=JWT_PAYLOAD_KEY,
        from_headers=[
            jwt_pb2.JwtHeader(name=h.name, value_prefix=h.prefix) for h in rule.from_headers
        ],
        from_params=rule.from_params,
        from_cookies=rule.from_cookies,
        claim_to_headers=[
            jwt_pb2.JwtClaimToHeader(header_name=c.header, claim_name=c.claim)
            for c in rule.output_claim_to_headers
        ],
    )
    if rule.output_payload_to_header:
        provider.forward_payload_header = rule.output_payload_to_header
    if rule.jwks is not None:
        provider.local_jwks.inline_string = rule.jwks
    elif rule.effective_jwks_uri is not None:
        provider.remote_jwks.CopyFrom(_remote_jwks(rule))
    else:
        provider.local_jwks.inline_string = NO_KEYS_JWKS
    return provider


def _remote_jwks(rule: JwtRule) -> Message:
    uri = rule.effective_jwks_uri or ""
    timeout = rule.timeout.total_seconds() if rule.timeout else DEFAULT_JWKS_TIMEOUT_S
    seconds = int(timeout)
    return jwt_pb2.RemoteJwks(
        http_uri=http_uri_pb2.HttpUri(
            uri=uri,
            cluster=jwks_cluster_name(uri),
            timeout=duration_pb2.Duration(seconds=seconds, nanos=int((timeout - seconds) * 1e9)),
        ),
        cache_duration=duration_pb2.Duration(seconds=300),
        # Fetch in the background: the listener does not wait for the key server.
        async_fetch=jwt_pb2.JwksAsyncFetch(),
    )


def _host_port(uri: str) -> tuple[str, int, bool]:
    parsed = urlparse(uri)
    tls = parsed.scheme == "https"
    return parsed.hostname or "", parsed.port or (443 if tls else 80), tls


def jwks_cluster_name(uri: str) -> str:
    host, port, _ = _host_port(uri)
    return f"jwks|{host}:{port}"


def jwks_clusters(
    request_authentications: Iterable[RequestAuthentication], *, ca_file: str = SYSTEM_CA_FILE
) -> list[Message]:
    """The clusters the remote JWKS of these RequestAuthentications are fetched through."""
    rules = jwt_rules_of(request_authentications)
    uris = sorted({r.effective_jwks_uri or "" for r in rules if r.jwks is None} - {""})
    clusters = {jwks_cluster_name(u): _jwks_cluster(u, ca_file) for u in uris}
    return [clusters[name] for name in sorted(clusters)]


def _jwks_cluster(uri: str, ca_file: str) -> Message:
    host, port, tls = _host_port(uri)
    name = jwks_cluster_name(uri)
    endpoint = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(address=socket_address(host, port))
    )
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STRICT_DNS,
        connect_timeout=duration_pb2.Duration(seconds=5),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[endpoint])],
        ),
    )
    if tls:
        context = tls_pb2.UpstreamTlsContext(
            sni=host,
            common_tls_context=tls_pb2.CommonTlsContext(
                validation_context=common_pb2.CertificateValidationContext(
                    trusted_ca=base_pb2.DataSource(filename=ca_file),
                    match_typed_subject_alt_names=[
                        common_pb2.SubjectAltNameMatcher(
                            san_type=common_pb2.SubjectAltNameMatcher.DNS,
                            matcher=string_pb2.StringMatcher(exact=host),
                        )
                    ],
                )
            ),
        )
        cluster.transport_socket.CopyFrom(tls_transport_socket(context))
    return cluster
