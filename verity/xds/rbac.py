"""Envoy authorization filters of one inbound port, from the same rules the evaluator reads.

`verity.policy.authz` compiles AuthorizationPolicies and TrafficPermissions into Conditions;
this module writes each Condition as the Envoy RBAC matcher of the same meaning, so what the
sidecar enforces is what `verity check` answers (a differential test holds the two together).

HTTP ports get these filters, in this order, before the router (TCP ports get the network
filters of the same name before tcp_proxy, without the HTTP-only parts):

1. `revoked.`: revoked identities (DENY), on chains that terminate mTLS;
2. jwt_authn from the RequestAuthentications (`verity.xds.authn`), HTTP only;
3. `audit_`: AUDIT policies, action LOG (sets `envoy.common` `access_log_hint`);
4. per ext-authz provider of a CUSTOM policy: `ext_authz_<provider>_`, an RBAC filter with
   only shadow rules that marks the requests the CUSTOM rules match, then the ext_authz
   filter, enabled by that mark only (Istio's design);
5. `deny.`: DENY policies; dry-run DENY policies as shadow rules (`dry_run_deny_`);
6. `allow.`: ALLOW policies and TrafficPermissions; dry-run ALLOW ones as shadow rules
   (`dry_run_allow_`). When nothing selects the workload: with the Mesh's defaultAction DENY
   an ALLOW filter without policies (deny all), with ALLOW no enforced rules.

Envoy policy names are `ns[<namespace>]-policy[<name>]-rule[<index>]` (TrafficPermissions:
`mesh[<mesh>]-trafficpermission[<name>]-rule[0]`); `verity.policy.parse_envoy_policy_name`
reads them back. A refused request's response code details are
`rbac_access_denied_matched_policy[<name>]` (`[none]` when no ALLOW policy matched), and the
HTTP filters record dynamic metadata under `envoy.filters.http.rbac` with the keys in
`DENY_LOG_METADATA_KEYS`, so a deny log line names its policy and rule.

The integrator's part: the HTTP connection manager must keep `normalize_path` and
`merge_slashes` on (paths are matched normalized), and Envoy refuses methods it does not know
unless `http_protocol_options.allow_custom_methods` is set, so policies on such methods need
it. Providers of CUSTOM policies need their clusters (`ext_authz_cluster`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from envoy.config.core.v3 import address_pb2, extension_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.path.match.uri_template.v3 import uri_template_match_pb2
from envoy.type.matcher.v3 import metadata_pb2, path_pb2, regex_pb2, string_pb2, value_pb2
from google.protobuf import wrappers_pb2
from google.protobuf.message import Message

from verity.policy import REVOKED_POLICY, CompiledPolicy, CompiledRule, WorkloadPolicies
from verity.policy.authz import compiled_policies
from verity.policy.matchers import (
    AllOf,
    AnyOf,
    Condition,
    DestinationIp,
    DestinationPort,
    DirectRemoteIp,
    FilterMetadata,
    Header,
    JwtClaim,
    Never,
    Not,
    PathTemplate,
    PeerPrincipal,
    RemoteIp,
    ServerName,
    StringMatch,
    UrlPath,
)
from verity.xds.authn import JWT_FILTER, JWT_PAYLOAD_KEY, jwt_authn_filter
from verity.xds.extauthz import ext_authz_filters, ext_authz_network_filter
from verity.xds.tlsconfig import http_filter, network_filter

HTTP_RBAC = "envoy.filters.http.rbac"
NETWORK_RBAC = "envoy.filters.network.rbac"
URI_TEMPLATE = "envoy.path.match.uri_template.uri_template_matcher"

# rules_stat_prefix / shadow_rules_stat_prefix of each filter: they prefix its stats and the
# keys of the dynamic metadata it records.
REVOKED_PREFIX = "revoked."
AUDIT_PREFIX = "audit_"
DENY_PREFIX = "deny."
ALLOW_PREFIX = "allow."
DRY_RUN_DENY_PREFIX = "dry_run_deny_"
DRY_RUN_ALLOW_PREFIX = "dry_run_allow_"

DENY_LOG_METADATA_KEYS = (
    f"{REVOKED_PREFIX}enforced_effective_policy_id",
    f"{DENY_PREFIX}enforced_effective_policy_id",
    f"{ALLOW_PREFIX}enforced_effective_policy_id",
)
"""Keys under `envoy.filters.http.rbac` naming the policy that denied (or allowed) a request,
e.g. `%DYNAMIC_METADATA(envoy.filters.http.rbac:deny.enforced_effective_policy_id)%`.
`%RESPONSE_CODE_DETAILS%` names it for every RBAC refusal in one field."""
DRY_RUN_METADATA_KEYS = (
    f"{DRY_RUN_DENY_PREFIX}shadow_effective_policy_id",
    f"{DRY_RUN_DENY_PREFIX}shadow_engine_result",
    f"{DRY_RUN_ALLOW_PREFIX}shadow_effective_policy_id",
    f"{DRY_RUN_ALLOW_PREFIX}shadow_engine_result",
)

_ACTION = {"ALLOW": rbac_pb2.RBAC.ALLOW, "DENY": rbac_pb2.RBAC.DENY, "LOG": rbac_pb2.RBAC.LOG}


# --- filters of one port ----------------------------------------------------------------------


def http_authz_filters(policies: WorkloadPolicies, *, mtls: bool) -> list[Message]:
    """The HTTP filters (before the router) that authorize requests to the workload."""
    compiled = compiled_policies(policies, "http")
    filters: list[Message] = []
    if mtls and policies.revoked:
        filters.append(_http_rbac(RbacConfig(revoked_rules(policies.revoked), REVOKED_PREFIX)))
    jwt = jwt_authn_filter(policies.request_authentications)
    if jwt is not None:
        filters.append(jwt)
    audit, *deny_allow = rbac_configs(policies, compiled)
    if audit is not None:
        filters.append(_http_rbac(audit))
    filters += _custom_http_filters(policies, compiled)
    filters += [_http_rbac(config) for config in deny_allow if config is not None]
    return filters


def network_authz_filters(policies: WorkloadPolicies, *, port: int, mtls: bool) -> list[Message]:
    """The network filters (before tcp_proxy) that authorize connections to TCP `port`."""
    compiled = compiled_policies(policies, "tcp")
    prefix = f"inbound_{port}."
    filters: list[Message] = []
    if mtls and policies.revoked:
        config = RbacConfig(revoked_rules(policies.revoked), REVOKED_PREFIX)
        filters.append(_network_rbac(prefix, config))
    audit, *deny_allow = rbac_configs(policies, compiled)
    if audit is not None:
        filters.append(_network_rbac(prefix, audit))
    filters += _custom_network_filters(policies, compiled, prefix)
    filters += [_network_rbac(prefix, config) for config in deny_allow if config is not None]
    return filters


@dataclass(frozen=True)
class RbacConfig:
    """One RBAC filter: enforced rules and/or shadow rules, each with its prefix."""

    rules: Message | None
    prefix: str
    shadow: Message | None = None
    shadow_prefix: str = ""


def rbac_configs(
    policies: WorkloadPolicies, compiled: Sequence[CompiledPolicy]
) -> tuple[RbacConfig | None, RbacConfig | None, RbacConfig | None]:
    """The audit, deny and allow RBAC filters; None for one that would have nothing to do."""
    enforced = [p for p in compiled if not p.dry_run]
    dry = [p for p in compiled if p.dry_run]
    audit_policies = [p for p in enforced if p.action == "AUDIT"]
    audit = RbacConfig(rbac_rules(audit_policies, "LOG"), AUDIT_PREFIX) if audit_policies else None
    deny = RbacConfig(
        _rules_if_any([p for p in enforced if p.action == "DENY"], "DENY"),
        DENY_PREFIX,
        _rules_if_any([p for p in dry if p.action == "DENY"], "DENY"),
        DRY_RUN_DENY_PREFIX,
    )
    allowing = [p for p in enforced if p.action == "ALLOW"]
    allow_rules: Message | None = rbac_rules(allowing, "ALLOW")
    if not allowing and policies.mesh.authorization.default_action == "ALLOW":
        allow_rules = None
    allow = RbacConfig(
        allow_rules,
        ALLOW_PREFIX,
        _rules_if_any([p for p in dry if p.action == "ALLOW"], "ALLOW"),
        DRY_RUN_ALLOW_PREFIX,
    )
    return audit, _unless_empty(deny), _unless_empty(allow)


def _unless_empty(config: RbacConfig) -> RbacConfig | None:
    return None if config.rules is None and config.shadow is None else config


def _rules_if_any(policies: Sequence[CompiledPolicy], action: str) -> Message | None:
    return rbac_rules(policies, action) if policies else None


def rbac_rules(policies: Iterable[CompiledPolicy], action: str) -> Message:
    """An RBAC with one Envoy policy per rule that can match (named after policy and rule)."""
    rules = rbac_pb2.RBAC(action=_ACTION[action])
    for policy in policies:
        for rule in policy.rules:
            if rule.never is None:
                rules.policies[policy.id.envoy_name(rule.index)].CopyFrom(envoy_policy(rule))
    return rules


def revoked_rules(revoked: Iterable[str]) -> Message:
    principals = [_peer(StringMatch("exact", spiffe_id)) for spiffe_id in sorted(revoked)]
    policy = rbac_pb2.Policy(permissions=[rbac_pb2.Permission(any=True)], principals=principals)
    return rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY, policies={REVOKED_POLICY: policy})


def _http_rbac(config: RbacConfig) -> Message:
    # Per-rule stats count each policy's decisions; the filter records the matched policy in
    # its dynamic metadata and response code details, so no shadow copy is needed for logs.
    message = http_rbac_pb2.RBAC(track_per_rule_stats=True)
    if config.rules is not None:
        message.rules.CopyFrom(config.rules)
        message.rules_stat_prefix = config.prefix
    if config.shadow is not None:
        message.shadow_rules.CopyFrom(config.shadow)
        message.shadow_rules_stat_prefix = config.shadow_prefix
    return http_filter(HTTP_RBAC, message)


def _network_rbac(port_prefix: str, config: RbacConfig) -> Message:
    message = network_rbac_pb2.RBAC(stat_prefix=port_prefix + config.prefix)
    if config.rules is not None:
        message.rules.CopyFrom(config.rules)
    if config.shadow is not None:
        message.shadow_rules.CopyFrom(config.shadow)
        message.shadow_rules_stat_prefix = config.shadow_prefix
    return network_filter(NETWORK_RBAC, message)


# --- CUSTOM -----------------------------------------------------------------------------------


def custom_prefix(provider: str) -> str:
    return f"ext_authz_{provider}_"


def _custom_by_provider(
    compiled: Sequence[CompiledPolicy],
) -> dict[str, list[CompiledPolicy]]:
    found: dict[str, list[CompiledPolicy]] = {}
    for policy in compiled:
        if policy.action == "CUSTOM" and not policy.dry_run and policy.provider:
            found.setdefault(policy.provider, []).append(policy)
    return dict(sorted(found.items()))


def _custom_http_filters(
    policies: WorkloadPolicies, compiled: Sequence[CompiledPolicy]
) -> list[Message]:
    filters: list[Message] = []
    for name, custom in _custom_by_provider(compiled).items():
        provider = policies.mesh.authorization.provider(name)
        if provider is None:
            # Fail closed, as istiod does: the requests the CUSTOM rules match are refused.
            filters.append(_http_rbac(RbacConfig(rbac_rules(custom, "DENY"), custom_prefix(name))))
            continue
        marker = RbacConfig(None, "", rbac_rules(custom, "DENY"), custom_prefix(name))
        filters += [_http_rbac(marker), *ext_authz_filters(provider, custom_prefix(name))]
    return filters


def _custom_network_filters(
    policies: WorkloadPolicies, compiled: Sequence[CompiledPolicy], port_prefix: str
) -> list[Message]:
    filters: list[Message] = []
    for name, custom in _custom_by_provider(compiled).items():
        provider = policies.mesh.authorization.provider(name)
        prefix = custom_prefix(name)
        if provider is None:
            filters.append(
                _network_rbac(port_prefix, RbacConfig(rbac_rules(custom, "DENY"), prefix))
            )
        elif provider.envoy_ext_authz_grpc is not None:
            # An HTTP-only provider adds no TCP check (Istio's rule).
            marker = RbacConfig(None, prefix, rbac_rules(custom, "DENY"), prefix)
            filters += [
                _network_rbac(port_prefix, marker),
                ext_authz_network_filter(provider, prefix, port_prefix),
            ]
    return filters


# --- rules -> Envoy policies ------------------------------------------------------------------


def envoy_policy(rule: CompiledRule) -> Message:
    """One rule as an Envoy Policy: one principal per source, one permission per operation."""
    return rbac_pb2.Policy(
        principals=[_principal_all([c.condition for c in s]) for s in rule.sources],
        permissions=[_permission_all([c.condition for c in o]) for o in rule.operations],
    )


def _principal_all(conditions: Sequence[Condition]) -> Message:
    items = [principal(c) for c in conditions]
    if not items:
        return rbac_pb2.Principal(any=True)
    if len(items) == 1:
        return items[0]
    return rbac_pb2.Principal(and_ids=rbac_pb2.Principal.Set(ids=items))


def _permission_all(conditions: Sequence[Condition]) -> Message:
    items = [permission(c) for c in conditions]
    if not items:
        return rbac_pb2.Permission(any=True)
    if len(items) == 1:
        return items[0]
    return rbac_pb2.Permission(and_rules=rbac_pb2.Permission.Set(rules=items))


def principal(condition: Condition) -> Message:
    """A principal-side Condition as an Envoy RBAC Principal."""
    P = rbac_pb2.Principal
    match condition:
        case PeerPrincipal(match=m):
            return _peer(m)
        case DirectRemoteIp(cidr=cidr):
            return P(direct_remote_ip=cidr_range(cidr))
        case RemoteIp(cidr=cidr):
            return P(remote_ip=cidr_range(cidr))
        case Header(name=name, match=m):
            return P(header=header_matcher(name, m))
        case UrlPath(match=m):
            return P(url_path=path_pb2.PathMatcher(path=string_matcher(m)))
        case JwtClaim() | FilterMetadata():
            return P(metadata=metadata_matcher(condition))
        case AnyOf(items=items):
            return P(or_ids=P.Set(ids=[principal(i) for i in items]))
        case AllOf(items=items):
            return P(and_ids=P.Set(ids=[principal(i) for i in items]))
        case Not(item=item):
            return P(not_id=principal(item))
        case Never():
            return P(not_id=P(any=True))
    raise ValueError(f"{type(condition).__name__} is not a principal condition")


def permission(condition: Condition) -> Message:
    """A permission-side Condition as an Envoy RBAC Permission."""
    P = rbac_pb2.Permission
    match condition:
        case Header(name=name, match=m):
            return P(header=header_matcher(name, m))
        case UrlPath(match=m):
            return P(url_path=path_pb2.PathMatcher(path=string_matcher(m)))
        case PathTemplate(template=template):
            config = uri_template_match_pb2.UriTemplateMatchConfig(path_template=template)
            extension = extension_pb2.TypedExtensionConfig(name=URI_TEMPLATE)
            extension.typed_config.Pack(config)
            return P(uri_template=extension)
        case DestinationIp(cidr=cidr):
            return P(destination_ip=cidr_range(cidr))
        case DestinationPort(port=port):
            return P(destination_port=port)
        case ServerName(match=m):
            return P(requested_server_name=string_matcher(m))
        case JwtClaim() | FilterMetadata():
            return P(metadata=metadata_matcher(condition))
        case AnyOf(items=items):
            return P(or_rules=P.Set(rules=[permission(i) for i in items]))
        case AllOf(items=items):
            return P(and_rules=P.Set(rules=[permission(i) for i in items]))
        case Not(item=item):
            return P(not_rule=permission(item))
        case Never():
            return P(not_rule=P(any=True))
    raise ValueError(f"{type(condition).__name__} is not a permission condition")


def _peer(match: StringMatch) -> Message:
    # principal_name is matched against the peer certificate's URI SAN (its SPIFFE ID).
    return rbac_pb2.Principal(
        authenticated=rbac_pb2.Principal.Authenticated(principal_name=string_matcher(match))
    )


def string_matcher(match: StringMatch) -> Message:
    if match.kind == "exact":
        return string_pb2.StringMatcher(exact=match.value, ignore_case=match.ignore_case)
    if match.kind == "prefix":
        return string_pb2.StringMatcher(prefix=match.value, ignore_case=match.ignore_case)
    if match.kind == "suffix":
        return string_pb2.StringMatcher(suffix=match.value, ignore_case=match.ignore_case)
    pattern = match.value if match.kind == "regex" else ".*"
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=pattern))


def header_matcher(name: str, match: StringMatch) -> Message:
    if match.kind == "present":
        return route_components_pb2.HeaderMatcher(name=name, present_match=True)
    return route_components_pb2.HeaderMatcher(name=name, string_match=string_matcher(match))


def cidr_range(cidr: str) -> Message:
    address, _, length = cidr.partition("/")
    return address_pb2.CidrRange(
        address_prefix=address, prefix_len=wrappers_pb2.UInt32Value(value=int(length))
    )


def metadata_matcher(condition: JwtClaim | FilterMetadata) -> Message:
    """A JWT claim (jwt_authn's payload in dynamic metadata) or another filter's metadata."""
    if isinstance(condition, JwtClaim):
        path = [JWT_PAYLOAD_KEY, *condition.path]
        strings = [
            value_pb2.ValueMatcher(string_match=string_matcher(m)) for m in condition.matches
        ]
        alternatives = list(strings)
        if condition.lists:
            alternatives.append(_list_of(strings))
        return _metadata(JWT_FILTER, path, alternatives)
    alternatives = []
    for match, in_list in condition.matches:
        string = value_pb2.ValueMatcher(string_match=string_matcher(match))
        alternatives.append(_list_of([string]) if in_list else string)
    return _metadata(condition.filter, [condition.key], alternatives)


def _list_of(strings: Sequence[Message]) -> Message:
    """Matches a list with an element one of `strings` matches."""
    one_of = strings[0] if len(strings) == 1 else _any_value(strings)
    return value_pb2.ValueMatcher(list_match=value_pb2.ListMatcher(one_of=one_of))


def _any_value(matchers: Sequence[Message]) -> Message:
    return value_pb2.ValueMatcher(or_match=value_pb2.OrMatcher(value_matchers=list(matchers)))


def _metadata(filter_name: str, path: Sequence[str], alternatives: Sequence[Message]) -> Message:
    value = alternatives[0] if len(alternatives) == 1 else _any_value(alternatives)
    return metadata_pb2.MetadataMatcher(
        filter=filter_name,
        path=[metadata_pb2.MetadataMatcher.PathSegment(key=key) for key in path],
        value=value,
    )


def uses_server_name(policies: WorkloadPolicies) -> bool:
    """Whether a rule of the workload tests the TLS SNI (Istio's `connection.sni`): Envoy
    records it only when the listener runs the TLS inspector."""
    return any(
        _mentions_server_name(check.condition)
        for policy in compiled_policies(policies, "http")
        for rule in policy.rules
        for checks in (*rule.sources, *rule.operations)
        for check in checks
    )


def _mentions_server_name(condition: Condition) -> bool:
    if isinstance(condition, ServerName):
        return True
    if isinstance(condition, AnyOf | AllOf):
        return any(_mentions_server_name(item) for item in condition.items)
    if isinstance(condition, Not):
        return _mentions_server_name(condition.item)
    return False
