"""Warnings `verity apply` prints: policies whose HTTP-only fields meet a TCP port.

On a TCP port Istio drops an ALLOW rule that needs HTTP attributes (it never matches) and
widens DENY/AUDIT/CUSTOM rules (they ignore those fields); the operator should hear about it,
naming the rule, when the policy is applied.
"""

from __future__ import annotations

from collections.abc import Iterable

from verity.policy import selects, tcp_warnings
from verity.resources import AuthorizationPolicy, Dataplane, Resource


def apply_warnings(
    applied: Iterable[Resource], stored: Iterable[Resource], root_namespaces: dict[str, str]
) -> list[str]:
    """Warnings for the AuthorizationPolicies being applied, against every known Dataplane
    (stored ones and those in the same apply). `root_namespaces` maps mesh -> root namespace."""
    applied = list(applied)
    dataplanes = {d.key(): d for d in [*stored, *applied] if isinstance(d, Dataplane)}
    warnings: list[str] = []
    for policy in (p for p in applied if isinstance(p, AuthorizationPolicy)):
        spec = policy.spec
        targets = [*(spec.target_refs or []), *([spec.target_ref] if spec.target_ref else [])]
        for workload in sorted(dataplanes.values(), key=lambda d: d.key()):
            root = root_namespaces.get(workload.spec.mesh, "verity-system")
            if selects(policy.namespace, spec.selector, targets, workload, root):
                warnings += [
                    f"{w} (Dataplane {workload.subject})" for w in tcp_warnings(policy, workload)
                ]
    return warnings
