"""The reference evaluator on Istio's documented AuthorizationPolicy examples, field by field.

Most examples are the httpbin/sleep ones of Istio's reference and tasks: workload httpbin in
namespace foo, callers by SPIFFE identity. The helpers here are shared by the other authz
test modules and the real-Envoy differential test.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Sequence
from typing import Any

import pytest

from verity.policy import Decision, Request, Token, WorkloadPolicies, evaluate, policies_for
from verity.resources import (
    AuthorizationPolicy,
    Dataplane,
    MeshSpec,
    RequestAuthentication,
    TrafficPermission,
    load_documents,
)

SLEEP = "cluster.local/ns/default/sa/sleep"
DEV = "cluster.local/ns/dev/sa/tester"
FOO_ADMIN = "cluster.local/ns/foo/sa/admin"
ROOT = "istio-system"


PROVIDERS = [
    {"name": "opa", "envoyExtAuthzGrpc": {"service": "opa.foo.svc.cluster.local", "port": 9191}},
    {"name": "web-authz", "envoyExtAuthzHttp": {"service": "authz.foo.svc", "port": 8000}},
]


def mesh(
    default: str = "DENY", trust_domain: str = "cluster.local", aliases: Sequence[str] = ()
) -> MeshSpec:
    return MeshSpec.model_validate(
        {
            "trustDomain": trust_domain,
            "trustDomainAliases": list(aliases),
            "rootNamespace": ROOT,
            "authorization": {"defaultAction": default, "providers": PROVIDERS},
        }
    )


def workload(
    namespace: str = "foo",
    *,
    name: str = "httpbin-1",
    service: str = "httpbin",
    account: str = "httpbin",
    labels: dict[str, str] | None = None,
    ports: Iterable[tuple[int, str]] = ((8000, "http"),),
    mesh_name: str = "default",
) -> Dataplane:
    return Dataplane.model_validate(
        {
            "api_version": "verity.dev/v1alpha1",
            "kind": "Dataplane",
            "name": name,
            "namespace": namespace,
            "spec": {
                "mesh": mesh_name,
                "service": service,
                "serviceAccount": account,
                "labels": {"app": service} if labels is None else labels,
                "address": "10.0.0.7",
                "inbound": [{"port": p, "protocol": proto} for p, proto in ports],
            },
        }
    )


def resources(text: str) -> list[Any]:
    return list(load_documents(textwrap.dedent(text)))


def policy(
    spec: str, *, name: str = "httpbin", namespace: str = "foo", dry_run: bool = False
) -> str:
    annotations = '  annotations: {istio.io/dry-run: "true"}\n' if dry_run else ""
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    return (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata:\n  name: {name}\n  namespace: {namespace}\n{annotations}spec:\n{body}\n---\n"
    )


def for_workload(
    text: str,
    *,
    target: Dataplane | None = None,
    mesh_spec: MeshSpec | None = None,
    dataplanes: Iterable[Dataplane] = (),
    revoked: Iterable[str] = (),
) -> WorkloadPolicies:
    loaded = resources(text) if text.strip() else []
    return policies_for(
        mesh_spec or mesh(),
        target or workload(),
        authorization_policies=[r for r in loaded if isinstance(r, AuthorizationPolicy)],
        request_authentications=[r for r in loaded if isinstance(r, RequestAuthentication)],
        traffic_permissions=[r for r in loaded if isinstance(r, TrafficPermission)],
        dataplanes=dataplanes,
        revoked=revoked,
    )


def decide(text: str, request: Request, **options: Any) -> Decision:
    return evaluate(for_workload(text, **options), request)


def verdict(text: str, request: Request, **options: Any) -> str:
    return decide(text, request, **options).verdict


def get(path: str = "/", who: str | None = SLEEP, **fields: Any) -> Request:
    fields.setdefault("destination_port", 8000)
    return Request(source_principal=who, path=path, **fields)


# --- no policy, allow-nothing, deny-all, allow-all ---------------------------------------------


def test_no_policy_uses_the_mesh_default_action_both_ways() -> None:
    denied = decide("", get())
    assert (denied.verdict, denied.status) == ("DENY", 403)
    assert denied.decided_by.startswith("default action DENY")
    assert denied.deciding is None and denied.rule is None
    assert verdict("", get(), mesh_spec=mesh("ALLOW")) == "ALLOW"


def test_allow_nothing_policy_denies_everything_even_with_default_allow() -> None:
    # Istio: `spec: {}` is an ALLOW policy that matches nothing.
    allow_nothing = policy("{}", name="allow-nothing")
    result = decide(allow_nothing, get(), mesh_spec=mesh("ALLOW"))
    assert (result.verdict, result.decided_by) == ("DENY", "no ALLOW policy matched")
    assert "has no rules" in result.steps[-2]
    assert verdict(policy("rules: []"), get(), mesh_spec=mesh("ALLOW")) == "DENY"


def test_allow_all_with_one_empty_rule() -> None:
    result = decide(policy("rules: [{}]", name="allow-all"), get(who=None))
    assert (result.verdict, result.rule, result.envoy_policy_id) == (
        "ALLOW",
        0,
        "ns[foo]-policy[allow-all]-rule[0]",
    )


def test_deny_all_with_one_empty_rule_beats_allow_all() -> None:
    text = policy("{action: DENY, rules: [{}]}", name="deny-all") + policy(
        "rules: [{}]", name="allow-all"
    )
    result = decide(text, get())
    assert (result.verdict, result.deciding and result.deciding.policy.name) == ("DENY", "deny-all")


# --- Istio reference example: ALLOW with from, to and when ------------------------------------

REFERENCE_ALLOW = policy(
    """
    selector: {matchLabels: {app: httpbin}}
    action: ALLOW
    rules:
    - from:
      - source: {principals: ["cluster.local/ns/default/sa/sleep"]}
      - source: {namespaces: ["test"]}
      to:
      - operation: {methods: ["GET"], paths: ["/info*"]}
      - operation: {methods: ["POST"], paths: ["/data"]}
      when:
      - key: request.auth.claims[iss]
        values: ["https://accounts.google.com"]
    """
) + textwrap.dedent(
    """
    apiVersion: security.istio.io/v1
    kind: RequestAuthentication
    metadata: {name: jwt, namespace: foo}
    spec:
      jwtRules: [{issuer: "https://accounts.google.com", jwksUri: "https://keys.example/jwks.json"}]
    """
)
GOOGLE = Token.of("https://accounts.google.com", "user-1")


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (get("/info/a", token=GOOGLE), "ALLOW"),
        (get("/data", method="POST", token=GOOGLE), "ALLOW"),
        (get("/info", who="cluster.local/ns/test/sa/any", token=GOOGLE), "ALLOW"),
        (get("/info/a"), "DENY"),  # no token: the `when` fails
        (get("/data", token=GOOGLE), "DENY"),  # GET /data is not an operation
        (get("/info/a", method="POST", token=GOOGLE), "DENY"),
        (get("/info/a", who=DEV, token=GOOGLE), "DENY"),
        (get("/info/a", who=None, token=GOOGLE), "DENY"),  # plaintext: no principal
    ],
)
def test_reference_allow_example(request_: Request, expected: str) -> None:
    assert verdict(REFERENCE_ALLOW, request_) == expected


def test_explanations_name_the_failing_field() -> None:
    result = decide(REFERENCE_ALLOW, get("/data", token=GOOGLE))
    (allow,) = result.policies
    (rule,) = allow.rules
    assert "to[0].operation.methods" in rule.reason or "to[1].operation.methods" in rule.reason
    assert "no `to` matched" in rule.reason
    result = decide(REFERENCE_ALLOW, get("/info", who=DEV, token=GOOGLE))
    assert "from[1].source.namespaces" in result.policies[0].rules[0].reason


# --- DENY ---------------------------------------------------------------------------------------

DENY_ADMIN_FROM_OTHER_NAMESPACES = policy(
    """
    action: DENY
    rules:
    - from: [{source: {notNamespaces: ["foo"]}}]
      to: [{operation: {paths: ["/admin"]}}]
    """,
    name="deny-admin",
) + policy("rules: [{}]", name="allow-all")


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (get("/admin"), "DENY"),
        (get("/admin", who=FOO_ADMIN), "ALLOW"),
        (get("/admin", who=None), "DENY"),  # notNamespaces holds when there is no principal
        (get("/admin/"), "ALLOW"),
        (get("/public"), "ALLOW"),
        (get("//admin"), "DENY"),  # merged slashes
        (get("/x/../admin"), "DENY"),  # dot segments
        (get("/admin?debug=1"), "DENY"),  # query ignored
        (get("/%61dmin"), "DENY"),  # unreserved characters decoded
    ],
)
def test_deny_admin_from_other_namespaces(request_: Request, expected: str) -> None:
    assert verdict(DENY_ADMIN_FROM_OTHER_NAMESPACES, request_) == expected


def test_deny_names_policy_rule_and_envoy_id() -> None:
    result = decide(DENY_ADMIN_FROM_OTHER_NAMESPACES, get("/admin"))
    assert result.decided_by == "AuthorizationPolicy foo/deny-admin rules[0] (DENY)"
    assert result.envoy_policy_id == "ns[foo]-policy[deny-admin]-rule[0]"
    assert result.status == 403


def test_deny_requests_without_a_jwt_with_not_request_principals() -> None:
    # Istio's "require JWT": deny if notRequestPrincipals ["*"].
    text = (
        policy(
            """
            action: DENY
            rules: [{from: [{source: {notRequestPrincipals: ["*"]}}]}]
            """,
            name="require-jwt",
        )
        + policy("rules: [{}]", name="allow-all")
        + "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
        "metadata: {name: jwt, namespace: foo}\n"
        "spec: {jwtRules: [{issuer: testing@secure.istio.io, jwksUri: 'https://k.example/j'}]}\n"
    )
    assert verdict(text, get()) == "DENY"
    assert verdict(text, get(token=Token.of("testing@secure.istio.io", "u"))) == "ALLOW"


# --- principals and trust domains --------------------------------------------------------------


@pytest.mark.parametrize(
    ("principal", "who", "expected"),
    [
        ("cluster.local/ns/default/sa/sleep", SLEEP, "ALLOW"),
        ("cluster.local/ns/default/sa/*", SLEEP, "ALLOW"),
        ("*/sa/sleep", SLEEP, "ALLOW"),
        ("*", SLEEP, "ALLOW"),
        ("*", None, "DENY"),
        ("cluster.local/ns/default/sa/sleepy", SLEEP, "DENY"),
        ("spiffe://cluster.local/ns/default/sa/sleep", SLEEP, "DENY"),  # no spiffe:// in policies
    ],
)
def test_principal_values(principal: str, who: str | None, expected: str) -> None:
    text = policy(f'rules: [{{from: [{{source: {{principals: ["{principal}"]}}}}]}}]')
    assert verdict(text, get(who=who)) == expected


def test_cluster_local_means_the_local_trust_domain_and_its_aliases() -> None:
    text = policy(
        'rules: [{from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]}]'
    )
    spec = mesh(trust_domain="prod.example", aliases=["old.example"])
    for domain in ("prod.example", "old.example"):
        request = get(who=f"spiffe://{domain}/ns/default/sa/sleep")
        assert verdict(text, request, mesh_spec=spec) == "ALLOW"
    assert verdict(text, get(who="spiffe://other.example/ns/default/sa/sleep"), mesh_spec=spec) == (
        "DENY"
    )
    # An alias written in the policy also stands for the local trust domain.
    text = policy('rules: [{from: [{source: {principals: ["old.example/ns/default/sa/sleep"]}}]}]')
    request = get(who="spiffe://prod.example/ns/default/sa/sleep")
    assert verdict(text, request, mesh_spec=spec) == "ALLOW"


def test_not_principals_star_matches_only_plaintext() -> None:
    # Istio's "deny plaintext" example: notPrincipals ["*"] matches requests without identity.
    text = policy(
        """
        action: DENY
        rules: [{from: [{source: {notPrincipals: ["*"]}}]}]
        """,
        name="deny-plaintext",
    ) + policy("rules: [{}]", name="allow-all")
    assert verdict(text, get(who=None)) == "DENY"
    assert verdict(text, get()) == "ALLOW"


def test_not_field_with_star_on_an_always_present_attribute_never_matches() -> None:
    for field in ("notMethods", "notPaths", "notHosts"):
        text = policy(f'rules: [{{to: [{{operation: {{{field}: ["*"]}}}}]}}]')
        assert verdict(text, get(host="httpbin")) == "DENY", field


def test_namespaces_are_read_from_the_principal_only() -> None:
    text = policy('rules: [{from: [{source: {namespaces: ["default", "te*"]}}]}]')
    assert verdict(text, get()) == "ALLOW"
    assert verdict(text, get(who="cluster.local/ns/test-1/sa/x")) == "ALLOW"
    assert verdict(text, get(who=DEV)) == "DENY"
    assert verdict(text, get(who=None)) == "DENY"


def test_service_accounts_default_to_the_policy_namespace() -> None:
    text = policy('rules: [{from: [{source: {serviceAccounts: ["admin", "default/sleep"]}}]}]')
    assert verdict(text, get(who=FOO_ADMIN)) == "ALLOW"
    assert verdict(text, get()) == "ALLOW"
    assert verdict(text, get(who="cluster.local/ns/default/sa/admin")) == "DENY"
    assert verdict(text, get(who="cluster.local/ns/foo/sa/admin-2")) == "DENY"


# --- request principals and JWT claims -------------------------------------------------------

JWT = (
    "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
    "metadata: {name: jwt, namespace: foo}\n"
    "spec:\n"
    "  jwtRules:\n"
    "  - {issuer: 'https://issuer.example/tenant', jwksUri: 'https://k.example/j'}\n"
    "  - {issuer: plain, jwksUri: 'https://k.example/j'}\n"
    "---\n"
)
ISSUER = "https://issuer.example/tenant"


@pytest.mark.parametrize(
    ("value", "token", "expected"),
    [
        ("https://issuer.example/tenant/alice", Token.of(ISSUER, "alice"), "ALLOW"),
        ("https://issuer.example/tenant/alice", Token.of(ISSUER, "bob"), "DENY"),
        ("https://issuer.example/tenant/*", Token.of(ISSUER, "bob"), "ALLOW"),
        ("https://issuer.example/tenant/al*", Token.of(ISSUER, "alice"), "ALLOW"),
        ("*/alice", Token.of(ISSUER, "alice"), "ALLOW"),
        ("*tenant/alice", Token.of(ISSUER, "alice"), "ALLOW"),
        ("*", Token.of("plain", "x"), "ALLOW"),
        ("*", None, "DENY"),
        ("plain*", Token.of("plain", "x"), "ALLOW"),
        ("*ice", Token.of(ISSUER, "alice"), "ALLOW"),
    ],
)
def test_request_principals_split_at_the_last_slash(
    value: str, token: Token | None, expected: str
) -> None:
    text = JWT + policy(f'rules: [{{from: [{{source: {{requestPrincipals: ["{value}"]}}}}]}}]')
    assert verdict(text, get(token=token)) == expected


def test_an_invalid_or_unknown_token_is_refused_with_401_but_no_token_is_not() -> None:
    text = JWT + policy("rules: [{}]", name="allow-all")
    assert decide(text, get()).status == 200
    assert decide(text, get(token=Token.of(ISSUER, "a"))).status == 200
    bad = decide(text, get(token=Token.of(ISSUER, "a", valid=False)))
    assert (bad.verdict, bad.status) == ("DENY", 401)
    assert decide(text, get(token=Token.of("https://elsewhere", "a"))).status == 401
    # Without a RequestAuthentication the token is not even looked at.
    assert decide(policy("rules: [{}]"), get(token=Token.of("x", "y", valid=False))).status == 200


def test_an_issuer_without_keys_has_all_its_tokens_refused() -> None:
    text = (
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
        "metadata: {name: jwt, namespace: foo}\nspec: {jwtRules: [{issuer: iss}]}\n---\n"
    ) + policy("rules: [{}]")
    result = decide(text, get(token=Token.of("iss", "s")))
    assert (result.status, "cannot be verified" in result.decided_by) == (401, True)


def test_audiences_of_the_request_authentication_are_checked() -> None:
    text = (
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
        "metadata: {name: jwt, namespace: foo}\n"
        "spec: {jwtRules: [{issuer: iss, audiences: [httpbin], jwksUri: 'https://k.example/j'}]}\n"
        "---\n"
    ) + policy("rules: [{}]")
    assert decide(text, get(token=Token.of("iss", "s", aud=["web", "httpbin"]))).status == 200
    assert decide(text, get(token=Token.of("iss", "s", aud="web"))).status == 401


def test_claims_string_and_list_and_nested() -> None:
    # Istio's authz-jwt task: a list-typed `groups` claim.
    text = JWT + policy(
        """
        rules:
        - when:
          - {key: "request.auth.claims[groups]", values: ["group1"]}
          - {key: "request.auth.claims[realm][role]", notValues: ["guest"]}
        """
    )
    assert verdict(text, get(token=Token.of("plain", "s", groups=["group1", "g2"]))) == "ALLOW"
    assert verdict(text, get(token=Token.of("plain", "s", groups="group1"))) == "ALLOW"
    assert verdict(text, get(token=Token.of("plain", "s", groups=["group2"]))) == "DENY"
    guest = Token.of("plain", "s", groups=["group1"], realm={"role": "guest"})
    assert verdict(text, get(token=guest)) == "DENY"
    admin = Token.of("plain", "s", groups=["group1"], realm={"role": "admin"})
    assert verdict(text, get(token=admin)) == "ALLOW"


def test_audiences_presenter_and_request_principal_keys() -> None:
    text = JWT + policy(
        """
        rules:
        - when:
          - {key: request.auth.audiences, values: ["books*"]}
          - {key: request.auth.presenter, values: ["web.example"]}
          - {key: request.auth.principal, values: ["plain/alice"]}
        """
    )
    good = Token.of("plain", "alice", aud=["other", "bookstore"], azp="web.example")
    assert verdict(text, get(token=good)) == "ALLOW"
    assert verdict(text, get(token=Token.of("plain", "alice", aud="x", azp="web.example"))) == (
        "DENY"
    )


# --- operations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hosts", "host", "expected"),
    [
        ('["httpbin.foo"]', "HTTPBIN.foo", "ALLOW"),  # case-insensitive
        ('["httpbin.foo"]', "httpbin.foo:8000", "DENY"),  # port-sensitive
        ('["httpbin.foo:8000"]', "httpbin.foo:8000", "ALLOW"),
        ('["*.foo"]', "httpbin.foo", "ALLOW"),
        ('["httpbin*"]', "httpbin.foo:8000", "ALLOW"),
    ],
)
def test_hosts(hosts: str, host: str, expected: str) -> None:
    text = policy(f"rules: [{{to: [{{operation: {{hosts: {hosts}}}}}]}}]")
    assert verdict(text, get(host=host)) == expected


def test_methods_are_case_sensitive() -> None:
    text = policy('rules: [{to: [{operation: {methods: ["GET", "HEAD"]}}]}]')
    assert verdict(text, get(method="GET")) == "ALLOW"
    assert verdict(text, get(method="get")) == "DENY"
    assert verdict(text, get(method="POST")) == "DENY"


@pytest.mark.parametrize(
    ("path_value", "path", "expected"),
    [
        ("/foo/{*}/bar", "/foo/x/bar", "ALLOW"),
        ("/foo/{*}/bar", "/foo/x/y/bar", "DENY"),
        ("/foo/{*}/bar", "/foo//bar", "DENY"),
        ("/foo/{*}/bar", "/foo/x/bar?q=1", "ALLOW"),
        ("/foo/{**}", "/foo/a/b/c", "ALLOW"),
        ("/foo/{**}", "/foo/", "ALLOW"),
        ("/foo/{**}", "/foo", "DENY"),
        ("/foo/{*}/bar/{**}", "/foo/x/bar/y/z", "ALLOW"),
        ("/api/*", "/api/v1", "ALLOW"),
        ("*.html", "/index.html", "ALLOW"),
        ("*", "/anything", "ALLOW"),
        ("/exact", "/exact/", "DENY"),
    ],
)
def test_paths_and_templates(path_value: str, path: str, expected: str) -> None:
    text = policy(f'rules: [{{to: [{{operation: {{paths: ["{path_value}"]}}}}]}}]')
    assert verdict(text, get(path)) == expected


def test_ports_and_not_ports() -> None:
    text = policy('rules: [{to: [{operation: {notPorts: ["9000"]}}]}]')
    assert verdict(text, get(destination_port=None)) == "ALLOW"
    assert verdict(text, Request(source_principal=SLEEP, destination_port=9000)) == "DENY"
    text = policy('rules: [{to: [{operation: {ports: ["8000"]}}]}]')
    assert verdict(text, get()) == "ALLOW"
    assert verdict(text, Request(source_principal=SLEEP, destination_port=9000)) == "DENY"


# --- sources by address -----------------------------------------------------------------------


def test_ip_blocks_use_the_peer_and_remote_ip_blocks_x_forwarded_for() -> None:
    text = policy(
        """
        rules:
        - from: [{source: {ipBlocks: ["10.1.0.0/16"], notRemoteIpBlocks: ["192.168.0.1"]}}]
        """
    )
    assert verdict(text, get(source_ip="10.1.2.3")) == "ALLOW"
    assert verdict(text, get(source_ip="10.2.2.3")) == "DENY"
    assert verdict(text, get(source_ip="10.1.2.3", remote_ip="192.168.0.1")) == "DENY"
    assert verdict(text, get(source_ip="10.1.2.3", remote_ip="192.168.0.2")) == "ALLOW"


# --- when ----------------------------------------------------------------------------------------


def test_when_keys_for_connection_attributes() -> None:
    text = policy(
        """
        rules:
        - when:
          - {key: source.ip, values: ["10.0.0.0/8"]}
          - {key: remote.ip, notValues: ["10.9.9.9"]}
          - {key: source.namespace, values: ["default"]}
          - {key: source.principal, values: ["cluster.local/ns/default/*"]}
          - {key: destination.ip, values: ["10.0.0.7"]}
          - {key: destination.port, values: ["8000"]}
          - {key: connection.sni, values: ["*.foo.svc"]}
          - {key: "request.headers[User-Agent]", values: ["curl/*"]}
        """
    )
    good = get(
        source_ip="10.0.0.1",
        destination_ip="10.0.0.7",
        sni="httpbin.foo.svc",
        headers={"user-agent": "curl/8.0"},
    )
    assert verdict(text, good) == "ALLOW"
    changes: list[dict[str, Any]] = [
        {"source_ip": "11.0.0.1"},
        {"remote_ip": "10.9.9.9"},
        {"destination_ip": "10.0.0.8"},
        {"sni": "httpbin.bar.svc"},
        {"sni": None},
        {"headers": {"user-agent": "wget"}},
        {"headers": {}},
        {"source_principal": DEV},
    ]
    for change in changes:
        changed = Request(**{**good.__dict__, **change})
        assert verdict(text, changed) == "DENY", change


def test_header_not_values_star_holds_only_when_the_header_is_absent() -> None:
    text = policy('rules: [{when: [{key: "request.headers[x-debug]", notValues: ["*"]}]}]')
    assert verdict(text, get()) == "ALLOW"
    assert verdict(text, get(headers={"X-Debug": ""})) == "DENY"


def test_multiple_rules_or_and_fields_and() -> None:
    text = policy(
        """
        rules:
        - to: [{operation: {methods: ["GET"], paths: ["/a"]}}]
        - from: [{source: {principals: ["cluster.local/ns/dev/sa/tester"]}}]
        """
    )
    assert verdict(text, get("/a")) == "ALLOW"
    assert verdict(text, get("/b")) == "DENY"
    assert verdict(text, get("/b", who=DEV)) == "ALLOW"
    result = decide(text, get("/a", who=DEV))
    assert result.rule == 0  # both match; Envoy reports the first by name


# --- AUDIT, dry-run, CUSTOM ------------------------------------------------------------------


def test_audit_never_changes_the_decision_but_is_reported() -> None:
    text = policy(
        '{action: AUDIT, rules: [{to: [{operation: {paths: ["/data*"]}}]}]}', name="audit"
    )
    result = decide(text, get("/data/1"), mesh_spec=mesh("ALLOW"))
    assert result.verdict == "ALLOW"
    assert [r.policy.name for r in result.audited_by] == ["audit"]
    assert decide(text, get("/other"), mesh_spec=mesh("ALLOW")).audited_by == ()
    assert decide(text, get("/data/1")).verdict == "DENY"  # AUDIT is not an ALLOW policy


def test_dry_run_deny_is_reported_as_would_have_denied() -> None:
    text = policy("{action: DENY, rules: [{}]}", name="deny-dry", dry_run=True) + policy(
        "rules: [{}]", name="allow-all"
    )
    result = decide(text, get())
    assert result.verdict == "ALLOW"
    assert result.dry_run_verdict == "DENY"
    assert any("would have denied" in step for step in result.steps)


def test_dry_run_allow_does_not_count_as_an_allow_policy() -> None:
    text = policy("rules: [{}]", name="allow-dry", dry_run=True)
    result = decide(text, get())
    assert (result.verdict, result.dry_run_verdict) == ("DENY", "ALLOW")
    assert decide(text, get(), mesh_spec=mesh("ALLOW")).verdict == "ALLOW"


CUSTOM = policy(
    """
    action: CUSTOM
    provider: {name: opa}
    rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
    """,
    name="ext-authz",
) + policy("rules: [{}]", name="allow-all")


def test_custom_depends_on_the_provider_when_its_rules_match() -> None:
    policies = for_workload(CUSTOM)
    result = evaluate(policies, get("/admin"))
    assert (result.verdict, result.provider, result.if_provider_allows) == (
        "DEPENDS",
        "opa",
        "ALLOW",
    )
    assert result.status is None
    assert evaluate(policies, get("/public")).verdict == "ALLOW"
    assert evaluate(policies, get("/admin"), provider_answers={"opa": "DENY"}).verdict == "DENY"
    assert evaluate(policies, get("/admin"), provider_answers={"opa": "ALLOW"}).verdict == "ALLOW"


def test_custom_with_an_unknown_provider_fails_closed() -> None:
    text = CUSTOM.replace("name: opa", "name: missing")
    result = evaluate(for_workload(text), get("/admin"))
    assert (result.verdict, result.status) == ("DENY", 403)
    assert "not defined in the Mesh" in result.decided_by
    assert evaluate(for_workload(text), get("/public")).verdict == "ALLOW"


def test_custom_http_provider_adds_no_tcp_check() -> None:
    target = workload(ports=((8000, "http"), (5432, "tcp")))
    tcp = Request(source_principal=SLEEP, protocol="tcp", destination_port=5432)
    every = policy("{action: CUSTOM, provider: {name: NAME}, rules: [{}]}", name="ext") + policy(
        "rules: [{}]", name="allow-all"
    )
    grpc = evaluate(for_workload(every.replace("NAME", "opa"), target=target), tcp)
    http = evaluate(for_workload(every.replace("NAME", "web-authz"), target=target), tcp)
    assert (grpc.verdict, grpc.provider) == ("DEPENDS", "opa")
    assert http.verdict == "ALLOW"


def test_custom_runs_before_deny() -> None:
    text = CUSTOM + policy("{action: DENY, rules: [{}]}", name="deny-all")
    result = evaluate(for_workload(text), get("/admin"))
    assert (result.verdict, result.if_provider_allows) == ("DEPENDS", "DENY")


# --- revoked identities -----------------------------------------------------------------------


def test_revoked_identities_are_refused_first() -> None:
    result = decide(policy("rules: [{}]"), get(), revoked=["spiffe://" + SLEEP])
    assert (result.verdict, result.envoy_policy_id) == ("DENY", "verity-deny-revoked")
