"""AuthorizationPolicy and TrafficPermission rules as the Conditions istiod would generate.

Each rule becomes `sources` (one entry per `from`, or a single entry without `from`) and
`operations` (one per `to`), each a list of `Check`s that must all hold; `when` conditions are
added to every source (principal-side keys) or every operation (permission-side keys), as
istiod does. A rule matches when one source and one operation hold. This is exactly the
shape of an Envoy RBAC Policy (principals OR-ed, permissions OR-ed, each an AND), so the
evaluator and `verity.xds.rbac` read the same structure.

Istio semantics carried here:
- principals (and `source.principal`) match the peer's SPIFFE ID without `spiffe://`; a
  principal whose trust domain is `cluster.local` or one of the mesh's trust domains is
  expanded to every trust domain of the mesh (the domain and its aliases);
- namespaces match `.*/ns/<ns>/.*` on the peer principal (`*` inside becomes `.*`), so
  neither principals nor namespaces ever match a plaintext peer;
- serviceAccounts (`sa` or `ns/sa`, the policy's namespace by default) match
  `spiffe://.+/ns/<ns>/(.+/|)sa/<sa>(/.+)?`;
- requestPrincipals are `iss/sub` split at the last `/` and matched on the verified JWT;
- `notX` is the negation of "one of X matches", so it holds when the attribute is absent;
- on TCP, fields and keys that need HTTP make an ALLOW rule match nothing, and are dropped
  from DENY, AUDIT and CUSTOM rules (which then match more), as istiod does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

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
    cidr_of,
    header_string,
    istio_path_template,
    istio_string,
    regex_literal,
)
from verity.policy.request import SPIFFE_PREFIX, RequestProtocol
from verity.resources import AuthorizationPolicy, TrafficPermission
from verity.resources.istio import Condition as WhenCondition
from verity.resources.istio import Operation, Rule, Source

Action = Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"]
Side = Literal["principal", "permission"]

DRY_RUN_ANNOTATION = "istio.io/dry-run"
LOCAL_TRUST_DOMAIN = "cluster.local"
_ANY = StringMatch("regex", ".+")


@dataclass(frozen=True)
class PolicyId:
    """Which resource a rule comes from; a TrafficPermission's `namespace` is its mesh."""

    kind: Literal["AuthorizationPolicy", "TrafficPermission"]
    namespace: str
    name: str

    def describe(self) -> str:
        if self.kind == "TrafficPermission":
            return f"TrafficPermission {self.name} (mesh {self.namespace})"
        return f"AuthorizationPolicy {self.namespace}/{self.name}"

    def envoy_name(self, rule: int) -> str:
        """The Envoy RBAC policy name of rule `rule`: what deny logs and stats show."""
        if self.kind == "TrafficPermission":
            return f"mesh[{self.namespace}]-trafficpermission[{self.name}]-rule[{rule}]"
        return f"ns[{self.namespace}]-policy[{self.name}]-rule[{rule}]"


@dataclass(frozen=True)
class Check:
    """One field of one `from`/`to`, or one `when` condition: holds when `condition` does.

    `label` says where it is written (`from[0].source.notPrincipals`, `when[1]`), `field` what
    it tests, `observe` which request attribute it reads (for explanations).
    """

    label: str
    field: str
    values: tuple[str, ...]
    negated: bool
    side: Side
    condition: Condition
    observe: str

    def describe(self) -> str:
        verb = "none of" if self.negated else "one of"
        return f"{self.label}: {self.observe} must match {verb} {list(self.values)}"


@dataclass(frozen=True)
class CompiledRule:
    """`rules[index]`: matches when all checks of one source and one operation hold.

    `never` says why the rule can match nothing (an HTTP-only field in an ALLOW rule on TCP);
    `ignored` lists the HTTP-only fields a DENY/AUDIT/CUSTOM rule drops on TCP.
    """

    index: int
    sources: tuple[tuple[Check, ...], ...]
    operations: tuple[tuple[Check, ...], ...]
    never: str | None = None
    ignored: tuple[str, ...] = ()


@dataclass(frozen=True)
class CompiledPolicy:
    id: PolicyId
    action: Action
    dry_run: bool
    provider: str | None
    rules: tuple[CompiledRule, ...]


def is_dry_run(policy: AuthorizationPolicy) -> bool:
    return policy.annotations.get(DRY_RUN_ANNOTATION, "").lower() == "true"


def parse_envoy_policy_name(name: str) -> tuple[PolicyId, int] | None:
    """The policy and rule index an Envoy policy name (from a log line) stands for."""
    for kind, head in (
        ("AuthorizationPolicy", "ns["),
        ("TrafficPermission", "mesh["),
    ):
        if not name.startswith(head) or not name.endswith("]"):
            continue
        middle = "]-policy[" if kind == "AuthorizationPolicy" else "]-trafficpermission["
        namespace, _, rest = name[len(head) :].partition(middle)
        policy, _, rule = rest.rpartition("]-rule[")
        if namespace and policy and rule[:-1].isdigit():
            return PolicyId(kind, namespace, policy), int(rule[:-1])  # type: ignore[arg-type]
    return None


# --- AuthorizationPolicy ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    protocol: RequestProtocol
    action: Action
    trust_domains: tuple[str, ...]
    namespace: str


@dataclass(frozen=True)
class _Field:
    """A field (or `when` key) before compilation: its values and how one value reads."""

    label: str
    field: str
    values: tuple[str, ...]
    negated: bool
    side: Side
    make: Callable[[str], Condition]
    observe: str
    http_only: bool


def compile_authorization_policy(
    policy: AuthorizationPolicy, protocol: RequestProtocol, trust_domains: Sequence[str]
) -> CompiledPolicy:
    spec = policy.spec
    context = _Context(protocol, spec.action, tuple(trust_domains), policy.namespace)
    rules = tuple(_compile_rule(i, rule, context) for i, rule in enumerate(spec.rules or []))
    return CompiledPolicy(
        id=PolicyId("AuthorizationPolicy", policy.namespace, policy.name),
        action=spec.action,
        dry_run=is_dry_run(policy),
        provider=spec.provider.name if spec.provider else None,
        rules=rules,
    )


def _compile_rule(index: int, rule: Rule, context: _Context) -> CompiledRule:
    when = [f for i, c in enumerate(rule.when) for f in _when_fields(i, c, context)]
    source_sets = [_source_fields(i, f.source, context) for i, f in enumerate(rule.from_ or [])]
    operation_sets = [_operation_fields(i, t.operation) for i, t in enumerate(rule.to or [])]
    every = [f for group in (when, *source_sets, *operation_sets) for f in group]
    http_only = [f for f in every if f.http_only]
    never: str | None = None
    ignored: tuple[str, ...] = ()
    if context.protocol == "tcp" and http_only:
        if context.action == "ALLOW":
            never = f"{http_only[0].field} is HTTP-only"
        else:
            ignored = tuple(dict.fromkeys(f.field for f in http_only))
    keep = context.protocol != "tcp"
    when_principal = [f for f in when if f.side == "principal"]
    when_permission = [f for f in when if f.side == "permission"]
    sources = [fields + when_principal for fields in source_sets or [[]]]
    operations = [fields + when_permission for fields in operation_sets or [[]]]
    return CompiledRule(
        index=index,
        sources=tuple(_checks(fields, keep) for fields in sources),
        operations=tuple(_checks(fields, keep) for fields in operations),
        never=never,
        ignored=ignored,
    )


def _checks(fields: Sequence[_Field], keep_http: bool) -> tuple[Check, ...]:
    return tuple(_check(f) for f in fields if keep_http or not f.http_only)


def _check(field: _Field) -> Check:
    # One AnyOf over every value's alternatives (a principal stands for one per trust domain).
    alternatives: list[Condition] = []
    for value in field.values:
        made = field.make(value)
        alternatives += made.items if isinstance(made, AnyOf) else [made]
    matched = AnyOf(tuple(alternatives))
    condition: Condition = Not(matched) if field.negated else matched
    return Check(
        field.label,
        field.field,
        field.values,
        field.negated,
        field.side,
        condition,
        field.observe,
    )


_Row = tuple[str, Sequence[str], Sequence[str], Callable[[str], Condition], str, bool]
"""(field name, values, notValues, value -> Condition, attribute read, HTTP-only)."""


def _fields(label: str, side: Side, rows: Sequence[_Row]) -> list[_Field]:
    """Each row's `name` and `notName` fields that have values."""
    found = []
    for name, values, not_values, make, observe, http_only in rows:
        not_name = "not" + name[0].upper() + name[1:]
        for field, given, negated in ((name, values, False), (not_name, not_values, True)):
            if given:
                found.append(
                    _Field(label + field, field, tuple(given), negated, side, make, observe,
                           http_only)
                )  # fmt: skip
    return found


def _source_fields(index: int, source: Source, context: _Context) -> list[_Field]:
    s = source
    rows: list[_Row] = [
        ("principals", s.principals, s.not_principals,
         _principal_maker(context.trust_domains), "source.principal", False),
        ("requestPrincipals", s.request_principals, s.not_request_principals,
         request_principal, "request.auth.principal", True),
        ("namespaces", s.namespaces, s.not_namespaces, namespace_condition,
         "source.principal", False),
        ("serviceAccounts", s.service_accounts, s.not_service_accounts,
         _service_account_maker(context.namespace), "source.principal", False),
        ("ipBlocks", s.ip_blocks, s.not_ip_blocks, lambda v: DirectRemoteIp(cidr_of(v)),
         "source.ip", False),
        ("remoteIpBlocks", s.remote_ip_blocks, s.not_remote_ip_blocks,
         lambda v: RemoteIp(cidr_of(v)), "remote.ip", False),
    ]  # fmt: skip
    return _fields(f"from[{index}].source.", "principal", rows)


def _operation_fields(index: int, operation: Operation) -> list[_Field]:
    o = operation
    rows: list[_Row] = [
        ("hosts", o.hosts, o.not_hosts,
         lambda v: Header(":authority", header_string(v, ignore_case=True)), "host", True),
        ("ports", o.ports, o.not_ports, lambda v: DestinationPort(int(v)), "destination.port",
         False),
        ("methods", o.methods, o.not_methods, lambda v: Header(":method", header_string(v)),
         "method", True),
        ("paths", o.paths, o.not_paths, path_condition, "path", True),
    ]  # fmt: skip
    return _fields(f"to[{index}].operation.", "permission", rows)


def _when_fields(index: int, condition: WhenCondition, context: _Context) -> list[_Field]:
    key = condition.key
    side, make, http_only = _when_key(key, context)
    parts = (("values", condition.values, False), ("notValues", condition.not_values, True))
    return [
        _Field(f"when[{index}].{part}", key, tuple(values), negated, side, make, key, http_only)
        for part, values, negated in parts
        if values
    ]


def _when_key(key: str, context: _Context) -> tuple[Side, Callable[[str], Condition], bool]:
    """(side, value -> Condition, HTTP-only) of a `when` key, as istiod maps it."""
    plain: dict[str, tuple[Side, Callable[[str], Condition], bool]] = {
        "source.ip": ("principal", lambda v: DirectRemoteIp(cidr_of(v)), False),
        "remote.ip": ("principal", lambda v: RemoteIp(cidr_of(v)), False),
        "source.namespace": ("principal", namespace_condition, False),
        "source.serviceAccount": ("principal", _service_account_maker(context.namespace), False),
        "source.principal": ("principal", _principal_maker(context.trust_domains), False),
        "request.auth.principal": ("principal", request_principal, True),
        "request.auth.audiences": ("principal", lambda v: _claim(("aud",), v), True),
        "request.auth.presenter": ("principal", lambda v: _claim(("azp",), v), True),
        "destination.ip": ("permission", lambda v: DestinationIp(cidr_of(v)), False),
        "destination.port": ("permission", lambda v: DestinationPort(int(v)), False),
        "connection.sni": ("permission", lambda v: ServerName(istio_string(v)), False),
    }
    if key in plain:
        return plain[key]
    for prefix in ("request.headers[", "request.experimental.inline.headers["):
        if key.startswith(prefix):
            return "principal", _header_maker(key[len(prefix) : -1].lower()), True
    if key.startswith("request.auth.claims["):
        path = claim_path(key[len("request.auth.claims") :])
        return "principal", lambda v: _claim(path, v), True
    filter_name, _, metadata_key = key[len("experimental.") : -1].partition("[")
    return "permission", lambda v: _filter_metadata(filter_name, metadata_key, v), False


# --- value -> Condition -----------------------------------------------------------------------


def expand_trust_domains(principal: str, trust_domains: Sequence[str]) -> list[str]:
    """Istio's trust-domain aliasing: `cluster.local/ns/a/sa/b` (or any of the mesh's trust
    domains) stands for the same identity in every trust domain of the mesh."""
    parts = principal.split("/")
    if len(parts) != 5 or "*" in parts[0]:
        return [principal]
    if parts[0] != LOCAL_TRUST_DOMAIN and parts[0] not in trust_domains:
        return [principal]
    return list(dict.fromkeys("/".join([domain, *parts[1:]]) for domain in trust_domains))


def _principal_maker(trust_domains: Sequence[str]) -> Callable[[str], Condition]:
    def make(value: str) -> Condition:
        found = [
            PeerPrincipal(istio_string(v, prefix=SPIFFE_PREFIX))
            for v in expand_trust_domains(value, trust_domains)
        ]
        return found[0] if len(found) == 1 else AnyOf(tuple(found))

    return make


def _header_maker(name: str) -> Callable[[str], Condition]:
    return lambda value: Header(name, header_string(value))


def _wildcard_regex(value: str) -> str:
    return ".*".join(regex_literal(part) for part in value.split("*"))


def namespace_condition(value: str) -> Condition:
    return PeerPrincipal(StringMatch("regex", f".*/ns/{_wildcard_regex(value)}/.*"))


def _service_account_maker(policy_namespace: str) -> Callable[[str], Condition]:
    def make(value: str) -> Condition:
        namespace, _, account = value.rpartition("/")
        ns, sa = regex_literal(namespace or policy_namespace), regex_literal(account)
        return PeerPrincipal(StringMatch("regex", f"spiffe://.+/ns/{ns}/(.+/|)sa/{sa}(/.+)?"))

    return make


def request_principal(value: str) -> Condition:
    """`iss/sub` (split at the last `/`) on the verified JWT, with Istio's wildcards."""
    at = value.rfind("/")
    issuer, subject = (value[:at], value[at + 1 :]) if at >= 0 else (value, "")
    if value == "*":
        match_iss, match_sub = _ANY, _ANY
    elif value.startswith("*"):
        if at >= 0:
            match_iss = _ANY if issuer == "*" else StringMatch("suffix", issuer[1:])
            match_sub = StringMatch("exact", subject)
        else:
            match_iss, match_sub = _ANY, StringMatch("suffix", value[1:])
    elif value.endswith("*"):
        if at >= 0:
            match_iss = StringMatch("exact", issuer)
            match_sub = _ANY if subject == "*" else StringMatch("prefix", subject[:-1])
        else:
            match_iss, match_sub = StringMatch("prefix", value[:-1]), _ANY
    else:
        match_iss, match_sub = StringMatch("exact", issuer), StringMatch("exact", subject)
    return AllOf(
        (
            JwtClaim(("iss",), (match_iss,), lists=False),
            JwtClaim(("sub",), (match_sub,), lists=False),
        )
    )


def path_condition(value: str) -> Condition:
    if "{*}" in value or "{**}" in value:
        return PathTemplate(istio_path_template(value))
    return UrlPath(istio_string(value))


def _claim(path: tuple[str, ...], value: str) -> Condition:
    return JwtClaim(path, (istio_string(value),))


def _filter_metadata(filter_name: str, key: str, value: str) -> Condition:
    if value.startswith("[") and value.endswith("]"):
        return FilterMetadata(filter_name, key, ((istio_string(value[1:-1]), True),))
    return FilterMetadata(filter_name, key, ((istio_string(value), False),))


def claim_path(brackets: str) -> tuple[str, ...]:
    """`[a][b]` -> ("a", "b"); `[a.b]` -> ("a.b",) (Istio's nested claim syntax)."""
    names: list[str] = []
    begin = 0
    while begin < len(brackets):
        end = _closing_bracket(brackets, begin)
        if end < 0:
            return (brackets[1:-1],)
        names.append(brackets[begin + 1 : end])
        begin = end + 1
    return tuple(names)


def _closing_bracket(text: str, begin: int) -> int:
    if begin >= len(text) or text[begin] != "[":
        return -1
    for index in range(begin + 1, len(text)):
        if text[index] == "[":
            return -1
        if text[index] == "]":
            return index
    return -1


# --- TrafficPermission -----------------------------------------------------------------------


def compile_traffic_permission(
    permission: TrafficPermission,
    service_identities: dict[str, tuple[str, ...]] | None,
    trust_domains: Sequence[str],
) -> CompiledPolicy:
    """An ALLOW rule for the identities running the source services ('*': any identity of the
    mesh's trust domains)."""
    sources, _ = permission.allowed_services()
    identities = service_identities or {}
    principals: list[Condition]
    if "*" in sources:
        principals = [
            PeerPrincipal(StringMatch("prefix", f"{SPIFFE_PREFIX}{domain}/"))
            for domain in trust_domains
        ]
    else:
        ids = sorted({i for service in sources for i in identities.get(service, ())})
        principals = [PeerPrincipal(StringMatch("exact", i)) for i in ids]
    condition: Condition = AnyOf(tuple(principals)) if principals else Never()
    check = Check(
        "spec.sources",
        "sources",
        tuple(sources),
        False,
        "principal",
        condition,
        "source.principal",
    )
    rule = CompiledRule(0, sources=((check,),), operations=((),))
    return CompiledPolicy(
        PolicyId("TrafficPermission", permission.mesh, permission.name),
        "ALLOW",
        False,
        None,
        (rule,),
    )
