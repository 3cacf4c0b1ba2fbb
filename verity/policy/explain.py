"""Why a check held or failed, in words a user of `verity check --explain` can act on."""

from __future__ import annotations

from collections.abc import Callable

from verity.policy.authz_rules import Check, CompiledRule, claim_path
from verity.policy.matchers import Attributes, claim_value

_ATTRIBUTES: dict[str, Callable[[Attributes], object]] = {
    "source.principal": lambda a: a.request.source_principal,
    "source.ip": lambda a: a.request.source_ip,
    "remote.ip": lambda a: a.request.peer_address,
    "host": lambda a: a.request.host,
    "method": lambda a: a.request.method,
    "path": lambda a: a.path,
    "destination.port": lambda a: a.request.destination_port,
    "destination.ip": lambda a: a.request.destination_ip,
    "connection.sni": lambda a: a.request.sni,
    "request.auth.principal": lambda a: _jwt_principal(a),
    "request.auth.audiences": lambda a: claim_value(a.jwt, ("aud",)),
    "request.auth.presenter": lambda a: claim_value(a.jwt, ("azp",)),
}


def observed(attribute: str, attrs: Attributes) -> str:
    """The request's value of `attribute` (as a Check names it), for messages."""
    if attribute in _ATTRIBUTES:
        return _shown(_ATTRIBUTES[attribute](attrs))
    if attribute.startswith(("request.headers[", "request.experimental.inline.headers[")):
        name = attribute[attribute.index("[") + 1 : -1].lower()
        return _shown(attrs.request.headers.get(name))
    if attribute.startswith("request.auth.claims["):
        return _shown(claim_value(attrs.jwt, claim_path(attribute[len("request.auth.claims") :])))
    return "(not known to the evaluator)"


def _jwt_principal(attrs: Attributes) -> str | None:
    issuer = claim_value(attrs.jwt, ("iss",))
    subject = claim_value(attrs.jwt, ("sub",))
    if isinstance(issuer, str) and isinstance(subject, str):
        return f"{issuer}/{subject}"
    return None


def _shown(value: object) -> str:
    return "absent" if value is None else repr(value)


def check_failure(check: Check, attrs: Attributes) -> str:
    """Why `check` does not hold for this request."""
    verb = "matches one of" if check.negated else "matches none of"
    value = observed(check.observe, attrs)
    if value == "absent" and not check.negated:
        return f"{check.label}: {check.observe} is absent (needs one of {list(check.values)})"
    return f"{check.label}: {check.observe} {value} {verb} {list(check.values)}"


def first_failure(checks: tuple[Check, ...], attrs: Attributes) -> str | None:
    for check in checks:
        if not check.condition.holds(attrs):
            return check_failure(check, attrs)
    return None


def rule_failure(rule: CompiledRule, attrs: Attributes) -> str | None:
    """Why `rule` does not match (None if it does)."""
    prefix = f"rules[{rule.index}]"
    if rule.never is not None:
        return f"{prefix}: {rule.never}; on TCP this ALLOW rule never matches"
    for entries, kind in ((rule.sources, "from"), (rule.operations, "to")):
        failures = [first_failure(checks, attrs) for checks in entries]
        if all(failures):
            detail = (
                failures[0]
                if len(failures) == 1
                else f"no `{kind}` matched: " + "; ".join(f for f in failures if f)
            )
            return f"{prefix}: {detail}"
    return None


def rule_matches(rule: CompiledRule, attrs: Attributes) -> bool:
    """Whether `rule` matches, without saying why not."""
    if rule.never is not None:
        return False
    return all(
        any(all(check.condition.holds(attrs) for check in checks) for checks in entries)
        for entries in (rule.sources, rule.operations)
    )
