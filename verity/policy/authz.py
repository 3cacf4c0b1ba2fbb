"""The reference evaluator: is this request to this workload allowed, by which policy, and why.

The order is the order of the filters the sidecar runs (`verity.xds.rbac`):

1. revoked identities are refused (403, `verity-deny-revoked`);
2. JWT authentication (HTTP): a token is checked against the RequestAuthentications that
   select the workload; an invalid token, or one from an issuer (or for an audience) none of
   them accepts, is refused with 401. No token is fine: RequestAuthentication alone never
   requires one. A token is ignored when no RequestAuthentication selects the workload;
3. AUDIT policies that match mark the request as audited (never a decision);
4. CUSTOM: if a CUSTOM policy matches, its provider decides; without the provider's answer
   the result is DEPENDS (with what happens if the provider allows);
5. DENY: any matching DENY policy refuses (403);
6. ALLOW: if ALLOW policies (or Kuma TrafficPermissions) select the workload, one must
   match; if none select it, the Mesh's `authorization.defaultAction` decides (Verity's
   default is DENY; ALLOW is Istio's behaviour).

Dry-run policies (`istio.io/dry-run: "true"`) are evaluated and reported as what would have
happened (`dry_run_verdict`: the decision if they were enforced) but never change the
decision. When several rules match, the one named is the one Envoy reports: the first by
Envoy policy name (`ns[<ns>]-policy[<name>]-rule[<i>]`, compared as strings).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from verity.policy.authz_rules import (
    Action,
    CompiledPolicy,
    PolicyId,
    compile_authorization_policy,
    compile_traffic_permission,
)
from verity.policy.explain import rule_failure, rule_matches
from verity.policy.matchers import Attributes
from verity.policy.request import Request, RequestProtocol, Token
from verity.policy.selection import WorkloadPolicies
from verity.resources import AuthorizationPolicy, Dataplane
from verity.resources.istio import JwtRule

Verdict = Literal["ALLOW", "DENY", "DEPENDS"]
ProviderAnswer = Literal["ALLOW", "DENY"]

REVOKED_POLICY = "verity-deny-revoked"


@dataclass(frozen=True)
class RuleResult:
    index: int
    matched: bool
    reason: str


@dataclass(frozen=True)
class PolicyResult:
    """One policy against one request: each rule's result, and the rule Envoy would report."""

    policy: PolicyId
    action: Action
    dry_run: bool
    provider: str | None
    rules: tuple[RuleResult, ...]
    matched_rule: int | None

    @property
    def matched(self) -> bool:
        return self.matched_rule is not None

    @property
    def envoy_id(self) -> str | None:
        return None if self.matched_rule is None else self.policy.envoy_name(self.matched_rule)

    def summary(self) -> str:
        mode = ", dry-run" if self.dry_run else ""
        head = f"{self.policy.describe()} ({self.action}{mode})"
        if self.matched_rule is not None:
            return f"{head}: rules[{self.matched_rule}] matched"
        if not self.rules:
            return f"{head}: has no rules, matches nothing"
        return f"{head}: no rule matched ({'; '.join(r.reason for r in self.rules)})"


@dataclass(frozen=True)
class Decision:
    """The answer for one request.

    - `verdict`: ALLOW, DENY, or DEPENDS (a CUSTOM policy matched; `provider` decides, and
      `if_provider_allows` is the verdict if it allows);
    - `status`: what the client sees: 200 (allowed), 403 (RBAC), 401 (bad token), or None
      for DEPENDS;
    - `decided_by`: the deciding policy and rule, or "default action", in words; `deciding`
      and `rule` the same as data; `envoy_policy_id` the name a deny log line shows;
    - `policies`: every policy that applies, evaluated; `audited_by`: AUDIT policies that
      matched; `dry_run`: dry-run policies, and `dry_run_verdict` the verdict had they been
      enforced (None without dry-run policies);
    - `steps`: the evaluation step by step (`--explain`).
    """

    verdict: Verdict
    status: int | None
    decided_by: str
    deciding: PolicyResult | None = None
    rule: int | None = None
    envoy_policy_id: str | None = None
    provider: str | None = None
    if_provider_allows: Verdict | None = None
    policies: tuple[PolicyResult, ...] = ()
    audited_by: tuple[PolicyResult, ...] = ()
    dry_run: tuple[PolicyResult, ...] = ()
    dry_run_verdict: Verdict | None = None
    steps: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.verdict == "ALLOW"


# --- compiled policies ----------------------------------------------------------------------


def compiled_policies(
    policies: WorkloadPolicies, protocol: RequestProtocol
) -> tuple[CompiledPolicy, ...]:
    """Every AuthorizationPolicy and TrafficPermission of the workload, compiled for `protocol`
    (memoized on `policies`)."""
    key = f"compiled-{protocol}"
    if key not in policies.cache:
        domains = policies.trust_domains
        policies.cache[key] = (
            *(
                compile_authorization_policy(p, protocol, domains)
                for p in policies.authorization_policies
            ),
            *(
                compile_traffic_permission(t, dict(policies.service_identities), domains)
                for t in policies.traffic_permissions
            ),
        )
    found: tuple[CompiledPolicy, ...] = policies.cache[key]
    return found


def jwt_rules(policies: WorkloadPolicies) -> list[JwtRule]:
    return [r for ra in policies.request_authentications for r in ra.spec.jwt_rules]


# --- evaluation -------------------------------------------------------------------------------


def evaluate(
    policies: WorkloadPolicies,
    request: Request,
    *,
    provider_answers: Mapping[str, ProviderAnswer] | None = None,
    explain: bool = True,
) -> Decision:
    """The decision for `request` to the workload of `policies` (see the module docstring).

    `provider_answers` gives ext-authz providers' answers (by provider name) when known.
    With `explain=False` the rules that do not match get no reason (a few times faster, for
    callers that only want the verdict and the deciding rule).
    """
    steps = [f"request: {request.describe()}"]
    if request.source_principal in policies.revoked:
        steps.append(f"{request.source_principal} is revoked: refused before any policy")
        return Decision(
            "DENY",
            403,
            f"revoked identity ({REVOKED_POLICY})",
            envoy_policy_id=REVOKED_POLICY,
            steps=(*steps, "decision: DENY (403)"),
        )
    payload, refusal = _authenticate(policies, request, steps)
    if refusal is not None:
        return Decision("DENY", 401, refusal, steps=(*steps, "decision: DENY (401)"))
    attrs = Attributes.of(request, payload)
    compiled = compiled_policies(policies, request.protocol)
    results = tuple(_evaluate_policy(p, attrs, explain) for p in compiled)
    return _decide(policies, results, provider_answers or {}, steps, request.protocol)


def _authenticate(
    policies: WorkloadPolicies, request: Request, steps: list[str]
) -> tuple[Mapping[str, object] | None, str | None]:
    """(the verified JWT payload or None, the reason for a 401 or None)."""
    token = request.token
    if request.protocol != "http":
        return None, None
    rules = jwt_rules(policies)
    if token is None:
        steps.append("JWT: no token (allowed: RequestAuthentication does not require one)")
        return None, None
    if not rules:
        steps.append("JWT: token ignored (no RequestAuthentication selects the workload)")
        return None, None
    reason = token_refusal(token, rules)
    if reason is not None:
        steps.append(f"JWT: token rejected: {reason}")
        return None, f"invalid JWT: {reason}"
    steps.append(f"JWT: token from {token.issuer} accepted")
    return token.claims, None


def token_refusal(token: Token, rules: Sequence[JwtRule]) -> str | None:
    """Why the JWT authentication filter rejects `token` (None if it accepts it)."""
    rule = next((r for r in rules if r.issuer == token.issuer), None)
    if rule is None:
        return f"issuer {token.issuer!r} is not accepted by any RequestAuthentication"
    if rule.jwks is None and rule.effective_jwks_uri is None:
        return f"no jwks or jwksUri for issuer {rule.issuer!r}: its tokens cannot be verified"
    if not token.valid:
        return "signature or lifetime does not verify"
    if rule.audiences and not set(rule.audiences) & set(token.audiences):
        return f"audiences {list(token.audiences)} are not among {rule.audiences}"
    return None


def _evaluate_policy(policy: CompiledPolicy, attrs: Attributes, explain: bool) -> PolicyResult:
    results = []
    for rule in policy.rules:
        if explain:
            failure = rule_failure(rule, attrs)
            results.append(RuleResult(rule.index, failure is None, failure or "matched"))
        else:
            hit = rule_matches(rule, attrs)
            results.append(RuleResult(rule.index, hit, "matched" if hit else ""))
    matched = [r.index for r in results if r.matched]
    first = min(matched, key=policy.id.envoy_name, default=None)
    return PolicyResult(
        policy.id, policy.action, policy.dry_run, policy.provider, tuple(results), first
    )


def _first(results: Sequence[PolicyResult]) -> PolicyResult | None:
    """The matched policy Envoy reports: the first by Envoy policy name."""
    matched = [r for r in results if r.envoy_id is not None]
    return min(matched, key=lambda r: r.envoy_id or "", default=None)


@dataclass
class _Outcome:
    verdict: Verdict
    status: int | None
    decided_by: str
    deciding: PolicyResult | None = None
    provider: str | None = None
    if_provider_allows: Verdict | None = None
    steps: list[str] = field(default_factory=list)


def _decide(
    policies: WorkloadPolicies,
    results: tuple[PolicyResult, ...],
    answers: Mapping[str, ProviderAnswer],
    steps: list[str],
    protocol: RequestProtocol,
) -> Decision:
    enforced = _outcome(policies, [r for r in results if not r.dry_run], answers, protocol)
    audited = tuple(r for r in results if r.action == "AUDIT" and not r.dry_run and r.matched)
    dry = tuple(r for r in results if r.dry_run)
    steps += [f"AUDIT: {r.summary()}: the request is audited" for r in audited]
    steps += enforced.steps
    dry_verdict = None
    if dry:
        dry_verdict = _outcome(policies, list(results), answers, protocol).verdict
        steps += [f"dry-run: {_would_have(r)}" for r in dry]
        steps.append(f"dry-run: with the dry-run policies enforced: {dry_verdict}")
    steps.append(f"decision: {enforced.verdict} ({enforced.decided_by})")
    deciding = enforced.deciding
    return Decision(
        verdict=enforced.verdict,
        status=enforced.status,
        decided_by=enforced.decided_by,
        deciding=deciding,
        rule=deciding.matched_rule if deciding else None,
        envoy_policy_id=deciding.envoy_id if deciding else None,
        provider=enforced.provider,
        if_provider_allows=enforced.if_provider_allows,
        policies=results,
        audited_by=audited,
        dry_run=dry,
        dry_run_verdict=dry_verdict,
        steps=tuple(steps),
    )


def _would_have(result: PolicyResult) -> str:
    if not result.matched:
        return f"{result.summary()}: would not have applied"
    effect = {"DENY": "denied", "ALLOW": "allowed", "AUDIT": "audited"}.get(
        result.action, f"asked provider {result.provider}"
    )
    return f"{result.summary()}: would have {effect} the request"


def _outcome(
    policies: WorkloadPolicies,
    results: list[PolicyResult],
    answers: Mapping[str, ProviderAnswer],
    protocol: RequestProtocol,
) -> _Outcome:
    """CUSTOM, then DENY, then ALLOW over `results` (the policies taken as enforced)."""
    custom = _custom_outcome(
        policies, [r for r in results if r.action == "CUSTOM"], answers, protocol
    )
    if custom is not None and custom.verdict == "DENY":
        return custom
    rest = _deny_allow_outcome(policies, results)
    if custom is None:
        return rest
    if custom.verdict == "DEPENDS":
        custom.if_provider_allows = rest.verdict
        custom.steps.append(f"if {custom.provider} allows: {rest.verdict} ({rest.decided_by})")
        return custom
    rest.steps[:0] = custom.steps
    return rest


def _custom_outcome(
    policies: WorkloadPolicies,
    results: list[PolicyResult],
    answers: Mapping[str, ProviderAnswer],
    protocol: RequestProtocol,
) -> _Outcome | None:
    """Each provider whose CUSTOM rules match is asked in turn (by provider name, as the
    filters run): a denial ends it, an unknown answer makes the verdict DEPENDS."""
    results = [r for r in results if _provider_checks(policies, r.provider, protocol)]
    if not results:
        return None
    steps: list[str] = []
    for provider in sorted({r.provider or "" for r in results}):
        first = _first([r for r in results if r.provider == provider and r.matched])
        if first is None:
            continue
        steps.append(f"CUSTOM: {first.summary()}: provider {provider} decides")
        if policies.mesh.authorization.provider(provider) is None:
            reason = f"provider {provider} is not defined in the Mesh: refused (fail closed)"
            return _Outcome("DENY", 403, reason, first, provider, steps=[*steps, reason])
        answer = answers.get(provider)
        if answer is None:
            reason = f"{first.summary()}: depends on provider {provider}"
            return _Outcome("DEPENDS", None, reason, first, provider, steps=steps)
        steps.append(f"provider {provider} {answer.lower()}s")
        if answer == "DENY":
            return _Outcome(
                "DENY", 403, f"provider {provider} denied", first, provider, steps=steps
            )
    if not steps:
        steps.append("CUSTOM: no CUSTOM policy matched")
    return _Outcome("ALLOW", 200, "CUSTOM providers allowed", steps=steps)


def _provider_checks(
    policies: WorkloadPolicies, provider: str | None, protocol: RequestProtocol
) -> bool:
    """Whether a CUSTOM policy of `provider` is checked on `protocol`: an HTTP ext-authz
    provider adds no check to TCP connections."""
    found = policies.mesh.authorization.provider(provider or "")
    return protocol == "http" or found is None or found.envoy_ext_authz_grpc is not None


def _deny_allow_outcome(policies: WorkloadPolicies, results: list[PolicyResult]) -> _Outcome:
    steps: list[str] = []
    denies = [r for r in results if r.action == "DENY"]
    steps += [f"DENY: {r.summary()}" for r in denies]
    deny = _first(denies)
    if deny is not None:
        return _Outcome("DENY", 403, _by(deny), deny, steps=steps)
    allows = [r for r in results if r.action == "ALLOW"]
    steps += [f"ALLOW: {r.summary()}" for r in allows]
    if not allows:
        action = policies.mesh.authorization.default_action
        reason = f"default action {action}: no ALLOW policy selects the workload"
        steps.append(reason)
        return _Outcome(action, 200 if action == "ALLOW" else 403, reason, steps=steps)
    allow = _first(allows)
    if allow is None:
        return _Outcome("DENY", 403, "no ALLOW policy matched", steps=steps)
    return _Outcome("ALLOW", 200, _by(allow), allow, steps=steps)


def _by(result: PolicyResult) -> str:
    return f"{result.policy.describe()} rules[{result.matched_rule}] ({result.action})"


# --- warnings for `verity apply` ---------------------------------------------------------------


def tcp_warnings(policy: AuthorizationPolicy, workload: Dataplane) -> list[str]:
    """What an HTTP-only field means on each TCP port of `workload` (which the policy is
    assumed to select): an ALLOW rule never matches, other rules ignore the field."""
    compiled = compile_authorization_policy(policy, "tcp", ("cluster.local",))
    warnings = []
    for inbound in sorted(workload.spec.inbound, key=lambda i: i.port):
        if inbound.protocol != "tcp":
            continue
        for rule in compiled.rules:
            if not _may_apply_to_port(policy, rule.index, inbound.port):
                continue
            warnings += _rule_warnings(compiled, rule.index, inbound.port, rule.never, rule.ignored)
    return warnings


def _rule_warnings(
    policy: CompiledPolicy, index: int, port: int, never: str | None, ignored: Sequence[str]
) -> list[str]:
    where = f"{policy.id.describe()} rules[{index}]"
    if never is not None:
        return [f"{where}: {never}; on TCP port {port} this ALLOW rule never matches"]
    return [
        f"{where}: {name} is HTTP-only; on TCP port {port} this {policy.action} rule ignores it "
        "and matches more connections"
        for name in ignored
    ]


def _may_apply_to_port(policy: AuthorizationPolicy, index: int, port: int) -> bool:
    """False when every `to` of the rule lists ports and none is `port`."""
    rule = (policy.spec.rules or [])[index]
    if not rule.to:
        return True
    return any(
        (not t.operation.ports or str(port) in t.operation.ports)
        and str(port) not in t.operation.not_ports
        for t in rule.to
    )
