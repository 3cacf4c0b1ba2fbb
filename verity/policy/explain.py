"""Why a check held or failed, in words a user of `verity check --explain` can act on."""

from __future__ import annotations

from verity.policy.authz_rules import Check, CompiledRule, claim_path
from verity.policy.matchers import Attributes, claim_value


def observed(attribute: str, attrs: Attributes) -> str:
    """The request's value of `attribute` (as a Check names it), for messages."""
    request = attrs.request
    values: dict[str, object] = {
        "source.principal": request.source_principal,
        "source.ip": request.source_ip,
        "remote.ip": request.peer_address,
        "host": request.host,
        "method": request.method,
        "path": attrs.path,
        "destination.port": request.destination_port,
        "destination.ip": request.destination_ip,
        "connection.sni": request.sni,
        "request.auth.principal": _jwt_principal(attrs),
        "request.auth.audiences": claim_value(attrs.jwt, ("aud",)),
        "request.auth.presenter": claim_value(attrs.jwt, ("azp",)),
    }
    if attribute in values:
        return _shown(values[attribute])
    if attribute.startswith(("request.headers[", "request.experimental.inline.headers[")):
        name = attribute[attribute.index("[") + 1 : -1].lower()
        return _shown(request.headers.get(name))
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
