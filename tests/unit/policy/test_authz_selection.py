"""Which policies apply to a workload, Kuma TrafficPermissions, and TCP ports."""

from __future__ import annotations

import textwrap

from tests.unit.policy.test_authz import (
    ROOT,
    SLEEP,
    decide,
    for_workload,
    get,
    mesh,
    policy,
    resources,
    verdict,
    workload,
)
from verity.policy import Request, evaluate, tcp_warnings
from verity.resources import AuthorizationPolicy

# --- selection --------------------------------------------------------------------------------


def names(text: str, **options: object) -> list[str]:
    return [p.name for p in for_workload(text, **options).authorization_policies]  # type: ignore[arg-type]


def test_selector_target_ref_namespace_and_mesh_wide() -> None:
    text = (
        policy("rules: [{}]", name="ns-wide")
        + policy("{selector: {matchLabels: {app: httpbin}}, rules: [{}]}", name="by-label")
        + policy("{selector: {matchLabels: {app: other}}, rules: [{}]}", name="other-label")
        + policy("{selector: {matchLabels: {}}, rules: [{}]}", name="empty-selector")
        + policy("{targetRef: {kind: Service, name: httpbin}, rules: [{}]}", name="by-service")
        + policy(
            "{targetRefs: [{group: core, kind: Service, name: other}], rules: [{}]}",
            name="other-service",
        )
        + policy(
            "{targetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: httpbin}, "
            "rules: [{}]}",
            name="gateway",
        )
        + policy("rules: [{}]", name="elsewhere", namespace="bar")
        + policy("rules: [{}]", name="mesh-wide", namespace=ROOT)
        + policy(
            "{selector: {matchLabels: {app: httpbin}}, rules: [{}]}",
            name="root-sel",
            namespace=ROOT,
        )
        + policy(
            "{targetRef: {kind: Service, name: httpbin}, rules: [{}]}",
            name="root-ref",
            namespace=ROOT,
        )
    )
    assert names(text) == [
        "by-label",
        "by-service",
        "empty-selector",
        "ns-wide",
        "mesh-wide",
        "root-sel",
    ]


def test_labels_are_a_subset_match() -> None:
    text = policy("{selector: {matchLabels: {app: httpbin, tier: web}}, rules: [{}]}")
    assert names(text, target=workload(labels={"app": "httpbin"})) == []
    assert names(text, target=workload(labels={"app": "httpbin", "tier": "web", "v": "2"})) == [
        "httpbin"
    ]


def test_request_authentications_are_selected_the_same_way() -> None:
    text = textwrap.dedent(
        """
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {name: mine, namespace: foo}
        spec: {selector: {matchLabels: {app: httpbin}}, jwtRules: [{issuer: a}]}
        ---
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {name: theirs, namespace: foo}
        spec: {selector: {matchLabels: {app: other}}, jwtRules: [{issuer: b}]}
        """
    )
    assert [r.name for r in for_workload(text).request_authentications] == ["mine"]


# --- Kuma TrafficPermission -------------------------------------------------------------------

KUMA = textwrap.dedent(
    """
    type: TrafficPermission
    name: web-to-backend
    mesh: default
    sources: [{match: {kuma.io/service: web}}]
    destinations: [{match: {kuma.io/service: httpbin}}]
    ---
    type: TrafficPermission
    name: other-mesh
    mesh: other
    sources: [{match: {kuma.io/service: '*'}}]
    destinations: [{match: {kuma.io/service: '*'}}]
    """
)
WEB = [
    workload("front", name="web-1", service="web", account="web-sa"),
    workload("front", name="web-2", service="web", account="web-sa2"),
]


def test_traffic_permission_allows_the_identities_that_run_the_source_service() -> None:
    policies = for_workload(KUMA, dataplanes=WEB)
    assert [t.name for t in policies.traffic_permissions] == ["web-to-backend"]
    for account in ("web-sa", "web-sa2"):
        result = evaluate(policies, get(who=f"cluster.local/ns/front/sa/{account}"))
        assert result.verdict == "ALLOW"
        assert result.envoy_policy_id == "mesh[default]-trafficpermission[web-to-backend]-rule[0]"
    assert evaluate(policies, get()).verdict == "DENY"


def test_traffic_permission_without_source_instances_allows_nobody() -> None:
    result = evaluate(for_workload(KUMA), get(who="cluster.local/ns/front/sa/web-sa"))
    assert result.verdict == "DENY"


def test_traffic_permission_star_is_any_identity_of_the_mesh() -> None:
    text = textwrap.dedent(
        """
        type: TrafficPermission
        name: all
        mesh: default
        sources: [{match: {kuma.io/service: '*'}}]
        destinations: [{match: {kuma.io/service: '*'}}]
        """
    )
    spec = mesh(aliases=["old.example"])
    assert verdict(text, get(), mesh_spec=spec) == "ALLOW"
    assert verdict(text, get(who="spiffe://old.example/ns/a/sa/b"), mesh_spec=spec) == "ALLOW"
    assert verdict(text, get(who="spiffe://evil.example/ns/a/sa/b"), mesh_spec=spec) == "DENY"
    assert verdict(text, get(who=None), mesh_spec=spec) == "DENY"


# --- TCP ---------------------------------------------------------------------------------------

TCP_WORKLOAD = workload(ports=((8000, "http"), (5432, "tcp")))


def tcp(who: str | None = SLEEP, port: int = 5432) -> Request:
    return Request(source_principal=who, protocol="tcp", destination_port=port)


def test_allow_rule_with_http_fields_never_matches_on_tcp() -> None:
    text = policy(
        """
        rules:
        - from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]
          to: [{operation: {methods: ["GET"]}}]
        """
    )
    assert verdict(text, get(), target=TCP_WORKLOAD) == "ALLOW"
    result = decide(text, tcp(), target=TCP_WORKLOAD)
    assert result.verdict == "DENY"
    assert "methods is HTTP-only" in result.policies[0].rules[0].reason


def test_deny_rule_drops_http_fields_on_tcp_and_matches_more() -> None:
    text = policy(
        """
        action: DENY
        rules:
        - from: [{source: {namespaces: ["default"]}}]
          to: [{operation: {paths: ["/admin"]}}]
          when: [{key: "request.headers[x-user]", values: ["bob"]}]
        """,
        name="deny-admin",
    ) + policy("rules: [{}]", name="allow-all")
    assert verdict(text, get("/public"), target=TCP_WORKLOAD) == "ALLOW"
    assert verdict(text, tcp(), target=TCP_WORKLOAD) == "DENY"
    assert verdict(text, tcp(who="cluster.local/ns/dev/sa/x"), target=TCP_WORKLOAD) == "ALLOW"


def test_tcp_keeps_ports_ips_and_principals() -> None:
    text = policy(
        """
        rules:
        - from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]
          to: [{operation: {ports: ["5432"]}}]
          when: [{key: source.ip, values: ["127.0.0.0/8"]}]
        """
    )
    assert verdict(text, tcp(), target=TCP_WORKLOAD) == "ALLOW"
    assert verdict(text, tcp(port=5433), target=TCP_WORKLOAD) == "DENY"
    assert verdict(text, tcp(who=None), target=TCP_WORKLOAD) == "DENY"


def test_tcp_warnings_name_the_rule_field_and_port() -> None:
    (allow,) = resources(
        policy(
            """
            rules:
            - to: [{operation: {methods: ["GET"], paths: ["/x"]}}]
            - to: [{operation: {ports: ["8000"], methods: ["GET"]}}]
            - from: [{source: {principals: ["*"]}}]
            """
        )
    )
    assert isinstance(allow, AuthorizationPolicy)
    assert tcp_warnings(allow, TCP_WORKLOAD) == [
        "AuthorizationPolicy foo/httpbin rules[0]: methods is HTTP-only; "
        "on TCP port 5432 this ALLOW rule never matches"
    ]
    (deny,) = resources(
        policy('{action: DENY, rules: [{when: [{key: "request.headers[x]", values: ["1"]}]}]}')
    )
    assert isinstance(deny, AuthorizationPolicy)
    assert tcp_warnings(deny, TCP_WORKLOAD) == [
        "AuthorizationPolicy foo/httpbin rules[0]: request.headers[x] is HTTP-only; "
        "on TCP port 5432 this DENY rule ignores it and matches more connections"
    ]
    assert tcp_warnings(allow, workload()) == []


def test_tokens_are_not_read_on_tcp() -> None:
    text = policy('rules: [{from: [{source: {notRequestPrincipals: ["*"]}}]}]')
    assert verdict(text, tcp(), target=TCP_WORKLOAD) == "DENY"  # ALLOW rule dropped on TCP
