"""The authorization filters of an inbound port: order, names, and each field's Envoy matcher.

That Envoy loads them is checked in tests/e2e/test_authz_envoy.py, and that it enforces what
the evaluator decides in tests/e2e/test_authz_differential.py.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from tests.unit.policy.test_authz import JWT, for_workload, mesh, policy, workload
from tests.unit.xds.test_translate_marketplace import snapshot
from verity.policy import WorkloadPolicies
from verity.resources import AuthorizationPolicy, load_documents
from verity.xds import authn, extauthz, rbac  # noqa: F401 - registers the filters' types
from verity.xds.authn import jwks_clusters
from verity.xds.extauthz import ext_authz_cluster
from verity.xds.rbac import DENY_LOG_METADATA_KEYS, http_authz_filters, network_authz_filters
from verity.xds.snapshot import MeshSnapshot
from verity.xds.translate import translate
from verity.xds.typeurls import LISTENER

TCP_WORKLOAD = workload(ports=((8000, "http"), (5432, "tcp")))


def as_dicts(filters: list[Message]) -> list[dict[str, Any]]:
    return [json_format.MessageToDict(f, preserving_proto_field_name=True) for f in filters]


def http(policies: WorkloadPolicies, *, mtls: bool = True) -> list[dict[str, Any]]:
    return as_dicts(http_authz_filters(policies, mtls=mtls))


def tcp(policies: WorkloadPolicies, *, mtls: bool = True) -> list[dict[str, Any]]:
    return as_dicts(network_authz_filters(policies, port=5432, mtls=mtls))


def names(filters: list[dict[str, Any]]) -> list[str]:
    return [f["name"] for f in filters]


def configs(filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f["typed_config"] for f in filters]


def only_policy(text: str, **options: Any) -> dict[str, Any]:
    """The single Envoy policy of the ALLOW filter of `text`."""
    allow = configs(http(for_workload(text, **options)))[-1]
    (found,) = allow["rules"]["policies"].values()
    result: dict[str, Any] = found
    return result


# --- filters, order, defaults ------------------------------------------------------------------


def test_no_policy_with_default_deny_is_an_allow_filter_without_policies() -> None:
    (allow,) = configs(http(for_workload("")))
    assert allow["rules"] == {}  # action ALLOW (the default), no policy: nothing is allowed
    assert allow["rules_stat_prefix"] == "allow."


def test_no_policy_with_default_allow_adds_no_filter() -> None:
    assert http(for_workload("", mesh_spec=mesh("ALLOW"))) == []
    assert tcp(for_workload("", target=TCP_WORKLOAD, mesh_spec=mesh("ALLOW"))) == []


def test_filter_order_revoked_jwt_audit_custom_deny_allow() -> None:
    text = (
        JWT
        + policy("{action: AUDIT, rules: [{}]}", name="audit")
        + policy("{action: CUSTOM, provider: {name: opa}, rules: [{}]}", name="ext")
        + policy("{action: DENY, rules: [{to: [{operation: {paths: [/x]}}]}]}", name="deny")
        + policy("rules: [{}]", name="allow")
    )
    filters = http(for_workload(text, revoked=["spiffe://cluster.local/ns/a/sa/gone"]))
    assert names(filters) == [
        "envoy.filters.http.rbac",
        "envoy.filters.http.jwt_authn",
        "envoy.filters.http.rbac",
        "envoy.filters.http.rbac",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.rbac",
        "envoy.filters.http.rbac",
    ]
    revoked, _, audit, marker, ext, deny, allow = configs(filters)
    assert revoked["rules_stat_prefix"] == "revoked."
    assert list(revoked["rules"]["policies"]) == ["verity-deny-revoked"]
    assert revoked["rules"]["action"] == "DENY"
    assert (audit["rules"]["action"], audit["rules_stat_prefix"]) == ("LOG", "audit_")
    assert "rules" not in marker and marker["shadow_rules"]["action"] == "DENY"
    assert ext["filter_enabled_metadata"]["path"] == [
        {"key": f"{marker['shadow_rules_stat_prefix']}shadow_engine_result"}
    ]
    assert ext["grpc_service"]["envoy_grpc"]["cluster_name"] == "ext-authz|opa"
    assert (deny["rules"]["action"], deny["rules_stat_prefix"]) == ("DENY", "deny.")
    assert list(allow["rules"]["policies"]) == ["ns[foo]-policy[allow]-rule[0]"]
    assert DENY_LOG_METADATA_KEYS == (
        "revoked.enforced_effective_policy_id",
        "deny.enforced_effective_policy_id",
        "allow.enforced_effective_policy_id",
    )


def test_revoked_filter_only_where_mtls_is_terminated() -> None:
    policies = for_workload("", revoked=["spiffe://cluster.local/ns/a/sa/gone"])
    assert len(http(policies, mtls=True)) == 2
    assert len(http(policies, mtls=False)) == 1


def test_dry_run_policies_are_shadow_rules() -> None:
    text = (
        policy("{action: DENY, rules: [{}]}", name="d", dry_run=True)
        + policy("rules: [{}]", name="a", dry_run=True)
        + policy("rules: [{}]", name="enforced")
    )
    deny, allow = configs(http(for_workload(text)))
    assert "rules" not in deny
    assert deny["shadow_rules_stat_prefix"] == "dry_run_deny_"
    assert list(deny["shadow_rules"]["policies"]) == ["ns[foo]-policy[d]-rule[0]"]
    assert list(allow["rules"]["policies"]) == ["ns[foo]-policy[enforced]-rule[0]"]
    assert list(allow["shadow_rules"]["policies"]) == ["ns[foo]-policy[a]-rule[0]"]


def test_custom_with_an_unknown_provider_is_a_deny_filter() -> None:
    text = policy("{action: CUSTOM, provider: {name: nope}, rules: [{}]}", name="ext")
    filters = http(for_workload(text, mesh_spec=mesh("ALLOW")))
    assert names(filters) == ["envoy.filters.http.rbac"]
    assert configs(filters)[0]["rules"]["action"] == "DENY"


def test_http_provider_options() -> None:
    text = policy("{action: CUSTOM, provider: {name: web-authz}, rules: [{}]}", name="ext")
    policies = for_workload(text, mesh_spec=mesh("ALLOW"))
    _, ext = configs(http(policies))
    assert ext["http_service"]["server_uri"]["uri"] == "http://authz.foo.svc:8000"
    assert ext["http_service"]["server_uri"]["cluster"] == "ext-authz|web-authz"
    provider = policies.mesh.authorization.provider("web-authz")
    assert provider is not None
    cluster = json_format.MessageToDict(ext_authz_cluster(provider))
    assert cluster["name"] == "ext-authz|web-authz" and cluster["type"] == "STRICT_DNS"


# --- fields ----------------------------------------------------------------------------------


def test_principals_expand_to_every_trust_domain() -> None:
    found = only_policy(
        policy('rules: [{from: [{source: {principals: ["cluster.local/ns/a/sa/b"]}}]}]'),
        mesh_spec=mesh(trust_domain="t.example", aliases=["o.example"]),
    )
    (principal,) = found["principals"]
    assert principal["or_ids"]["ids"] == [
        {"authenticated": {"principal_name": {"exact": "spiffe://t.example/ns/a/sa/b"}}},
        {"authenticated": {"principal_name": {"exact": "spiffe://o.example/ns/a/sa/b"}}},
    ]
    assert found["permissions"] == [{"any": True}]


def test_namespaces_and_service_accounts_are_regexes_on_the_principal() -> None:
    found = only_policy(policy('rules: [{from: [{source: {notNamespaces: ["te*"]}}]}]'))
    (principal,) = found["principals"]
    inner = principal["not_id"]["or_ids"]["ids"][0]["authenticated"]["principal_name"]
    assert inner == {"safe_regex": {"regex": ".*/ns/te.*/.*"}}
    found = only_policy(policy('rules: [{from: [{source: {serviceAccounts: ["sa"]}}]}]'))
    regex = found["principals"][0]["or_ids"]["ids"][0]["authenticated"]["principal_name"]
    assert regex == {"safe_regex": {"regex": "spiffe://.+/ns/foo/(.+/|)sa/sa(/.+)?"}}


def test_operation_fields() -> None:
    found = only_policy(
        policy(
            """
            rules:
            - to:
              - operation:
                  hosts: ["a.example"]
                  methods: ["GET"]
                  paths: ["/p/{*}/q", "/r*"]
                  notPorts: ["9000"]
            """
        )
    )
    (permission,) = found["permissions"]
    hosts, ports, methods, paths = permission["and_rules"]["rules"]
    assert hosts["or_rules"]["rules"] == [
        {
            "header": {
                "name": ":authority",
                "string_match": {"exact": "a.example", "ignore_case": True},
            }
        }
    ]
    assert ports == {"not_rule": {"or_rules": {"rules": [{"destination_port": 9000}]}}}
    assert methods["or_rules"]["rules"] == [
        {"header": {"name": ":method", "string_match": {"exact": "GET"}}}
    ]
    template, prefix = paths["or_rules"]["rules"]
    assert template["uri_template"]["typed_config"]["path_template"] == "/p/*/q"
    assert prefix == {"url_path": {"path": {"prefix": "/r"}}}


def test_request_principals_and_claims_read_the_jwt_payload() -> None:
    found = only_policy(
        JWT
        + policy(
            """
            rules:
            - from: [{source: {requestPrincipals: ["https://iss.example/path/sub"]}}]
              when: [{key: "request.auth.claims[a][b]", values: ["x"]}]
            """
        )
    )
    (principal,) = found["principals"]
    request_principal, claim = principal["and_ids"]["ids"]
    iss, sub = request_principal["or_ids"]["ids"][0]["and_ids"]["ids"]
    assert iss["metadata"] == {
        "filter": "envoy.filters.http.jwt_authn",
        "path": [{"key": "payload"}, {"key": "iss"}],
        "value": {"string_match": {"exact": "https://iss.example/path"}},
    }
    assert sub["metadata"]["value"] == {"string_match": {"exact": "sub"}}
    assert claim["or_ids"]["ids"][0]["metadata"]["path"] == [
        {"key": "payload"},
        {"key": "a"},
        {"key": "b"},
    ]
    assert claim["or_ids"]["ids"][0]["metadata"]["value"]["or_match"]["value_matchers"] == [
        {"string_match": {"exact": "x"}},
        {"list_match": {"one_of": {"string_match": {"exact": "x"}}}},
    ]


def test_ip_blocks_and_connection_keys() -> None:
    found = only_policy(
        policy(
            """
            rules:
            - from: [{source: {ipBlocks: ["10.0.0.1"], remoteIpBlocks: ["10.1.0.0/16"]}}]
              when:
              - {key: connection.sni, values: ["*.svc"]}
              - {key: destination.ip, values: ["10.0.0.7"]}
            """
        )
    )
    direct, remote = found["principals"][0]["and_ids"]["ids"]
    assert direct["or_ids"]["ids"] == [
        {"direct_remote_ip": {"address_prefix": "10.0.0.1", "prefix_len": 32}}
    ]
    assert remote["or_ids"]["ids"] == [
        {"remote_ip": {"address_prefix": "10.1.0.0", "prefix_len": 16}}
    ]
    sni, destination = found["permissions"][0]["and_rules"]["rules"]
    assert sni["or_rules"]["rules"] == [{"requested_server_name": {"suffix": ".svc"}}]
    assert destination["or_rules"]["rules"][0]["destination_ip"]["prefix_len"] == 32


# --- TCP -------------------------------------------------------------------------------------


def test_tcp_drops_allow_rules_with_http_fields_and_widens_deny_rules() -> None:
    text = policy(
        '{action: DENY, rules: [{to: [{operation: {methods: ["GET"], ports: ["5432"]}}]}]}',
        name="deny",
    ) + policy(
        """
        rules:
        - to: [{operation: {paths: ["/x"]}}]
        - from: [{source: {principals: ["*"]}}]
        """,
        name="allow",
    )
    deny, allow = configs(tcp(for_workload(text, target=TCP_WORKLOAD)))
    assert deny["stat_prefix"] == "inbound_5432.deny."
    (deny_policy,) = deny["rules"]["policies"].values()
    assert deny_policy["permissions"] == [
        {"or_rules": {"rules": [{"destination_port": 5432}]}}
    ]  # methods dropped: the rule matches every connection to 5432
    assert list(allow["rules"]["policies"]) == ["ns[foo]-policy[allow]-rule[1]"]


def test_tcp_custom_only_for_grpc_providers() -> None:
    grpc = policy("{action: CUSTOM, provider: {name: opa}, rules: [{}]}", name="ext")
    http_provider = grpc.replace("name: opa", "name: web-authz")
    allow_mesh = mesh("ALLOW")
    found = tcp(for_workload(grpc, target=TCP_WORKLOAD, mesh_spec=allow_mesh))
    assert names(found) == ["envoy.filters.network.rbac", "envoy.filters.network.ext_authz"]
    assert tcp(for_workload(http_provider, target=TCP_WORKLOAD, mesh_spec=allow_mesh)) == []


# --- jwt_authn -------------------------------------------------------------------------------


def test_jwt_authn_requires_a_valid_token_only_when_one_is_sent() -> None:
    filters = http(for_workload(JWT + policy("rules: [{}]")))
    jwt = filters[0]["typed_config"]
    assert sorted(jwt["providers"]) == ["origins-0", "origins-1"]
    provider = jwt["providers"]["origins-0"]
    assert provider["issuer"] == "https://issuer.example/tenant"
    assert provider["payload_in_metadata"] == "payload"
    assert provider["remote_jwks"]["http_uri"]["cluster"] == "jwks|k.example:443"
    (rule,) = jwt["rules"]
    assert rule["requires"]["requires_any"]["requirements"] == [
        {"provider_name": "origins-0"},
        {"provider_name": "origins-1"},
        {"allow_missing": {}},
    ]


def test_jwks_clusters_are_deduplicated_and_verify_the_key_server() -> None:
    policies = for_workload(JWT)
    (cluster,) = jwks_clusters(policies.request_authentications)
    found = json_format.MessageToDict(cluster, preserving_proto_field_name=True)
    assert found["name"] == "jwks|k.example:443"
    tls = found["transport_socket"]["typed_config"]
    assert tls["sni"] == "k.example"
    assert tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"][0][
        "matcher"
    ] == {"exact": "k.example"}


def test_no_jwt_filter_without_request_authentication() -> None:
    assert "envoy.filters.http.jwt_authn" not in names(http(for_workload(policy("rules: [{}]"))))


# --- in translate() ----------------------------------------------------------------------------


def test_translate_uses_the_snapshot_policies_and_inspects_tls_for_sni() -> None:
    sni = policy('rules: [{when: [{key: connection.sni, values: ["users.shop"]}]}]', name="sni")
    (extra,) = load_documents(sni.replace("namespace: foo", "namespace: shop"))
    assert isinstance(extra, AuthorizationPolicy)
    base = snapshot()
    with_sni = MeshSnapshot(
        base.mesh_name,
        base.mesh,
        base.dataplanes,
        ready=base.ready,
        authorization_policies=(*base.authorization_policies, extra),
    )
    for mesh_snapshot, inspected in ((base, False), (with_sni, True)):
        inbound = json_format.MessageToDict(
            translate(mesh_snapshot, "shop/users-1")[LISTENER]["inbound:8080"],
            preserving_proto_field_name=True,
        )
        assert ("listener_filters" in inbound) is inspected
    users = with_sni.dataplane("shop/users-1")
    assert [p.name for p in with_sni.authorization(users).authorization_policies] == [
        "no-admin-from-outside",
        "sni",
        "users",
    ]
