"""Istio's security kinds: Istio's fields, Istio's validation rules, precise errors."""

from __future__ import annotations

import pytest

from verity.resources import (
    AuthorizationPolicy,
    FieldError,
    PeerAuthentication,
    RequestAuthentication,
)

from .helpers import error_at, istio, load, load_one, rejection

RULE = "rules:\n- from:\n  - source:\n      {source}\n  to:\n  - operation:\n      {operation}\n"
SOURCE_PATH = "spec.rules[0].from[0].source"
OPERATION_PATH = "spec.rules[0].to[0].operation"


def policy(
    source: str = "namespaces: [dev]", operation: str = "methods: [GET]", extra: str = ""
) -> str:
    return istio(RULE.format(source=source, operation=operation) + extra)


# --- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v1beta1"])
def test_every_istio_kind_parses_in_both_versions(version: str) -> None:
    pa = load_one(istio("mtls: {mode: STRICT}", "PeerAuthentication", version))
    ap = load_one(istio("action: DENY\nrules: [{}]", "AuthorizationPolicy", version))
    ra = load_one(istio("jwtRules: [{issuer: x}]", "RequestAuthentication", version))
    assert isinstance(pa, PeerAuthentication) and pa.spec.mode == "STRICT"
    assert isinstance(ap, AuthorizationPolicy) and ap.spec.action == "DENY"
    assert isinstance(ra, RequestAuthentication) and ra.spec.jwt_rules[0].issuer == "x"
    assert {r.api_version for r in (pa, ap, ra)} == {f"security.istio.io/{version}"}


def test_every_authorization_field_is_read() -> None:
    text = istio(
        """
        selector: {matchLabels: {app: httpbin}}
        action: ALLOW
        rules:
        - from:
          - source:
              principals: ["cluster.local/ns/default/sa/sleep"]
              notPrincipals: ["*/sa/admin"]
              requestPrincipals: ["https://issuer.example.com/*"]
              notRequestPrincipals: ["*/bot"]
              namespaces: ["test"]
              notNamespaces: ["kube-*"]
              ipBlocks: ["10.0.0.0/8", "192.168.1.1"]
              notIpBlocks: ["10.1.0.0/16"]
              remoteIpBlocks: ["2001:db8::/32"]
              notRemoteIpBlocks: ["::1"]
          - source:
              serviceAccounts: ["default/sleep", "bookinfo"]
              notServiceAccounts: ["default/admin"]
          to:
          - operation:
              hosts: ["*.example.com"]
              notHosts: ["admin.example.com"]
              ports: ["8080"]
              notPorts: ["9090"]
              methods: ["GET", "HEAD"]
              notMethods: ["DELETE"]
              paths: ["/info*", "/api/{*}/items/{**}"]
              notPaths: ["*/private"]
          when:
          - key: request.auth.claims[iss]
            values: ["https://accounts.google.com"]
          - key: source.ip
            notValues: ["10.0.0.1"]
          - key: destination.port
            values: ["8080"]
          - key: request.headers[User-Agent]
            values: ["curl*"]
          - key: experimental.envoy.filters.network.mysql_proxy[db.table]
            values: ["[update]"]
        """
    )
    ap = load_one(text)
    assert isinstance(ap, AuthorizationPolicy)
    [rule] = ap.spec.rules or []
    assert rule.from_ is not None and rule.to is not None
    assert rule.from_[0].source.remote_ip_blocks == ["2001:db8::/32"]
    assert rule.from_[1].source.service_accounts == ["default/sleep", "bookinfo"]
    assert rule.to[0].operation.paths == ["/info*", "/api/{*}/items/{**}"]
    assert [c.key for c in rule.when][:2] == ["request.auth.claims[iss]", "source.ip"]


def test_empty_spec_is_allow_nothing_and_keeps_its_form() -> None:
    ap = load_one(istio("{}"))
    assert isinstance(ap, AuthorizationPolicy)
    assert ap.spec.action == "ALLOW" and ap.spec.rules is None
    assert ap.to_document()["spec"] == {}


def test_missing_spec_is_an_empty_spec() -> None:
    ap = load_one(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\n"
    )
    assert ap.to_document() == {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "a"},
    }


def test_allow_all_rule() -> None:
    ap = load_one(istio("rules:\n- {}"))
    assert isinstance(ap, AuthorizationPolicy) and ap.spec.rules and ap.spec.rules[0].from_ is None


# --- generic errors ------------------------------------------------------------------------


def test_bad_enum_names_the_allowed_values() -> None:
    exc = rejection(istio("mtls:\n  mode: STRCT", "PeerAuthentication"))
    assert exc.errors == [
        FieldError(
            "spec.mtls.mode", "must be one of UNSET, DISABLE, PERMISSIVE, STRICT (got 'STRCT')"
        )
    ]
    assert str(exc) == (
        "PeerAuthentication foo/p: spec.mtls.mode: must be one of UNSET, DISABLE, PERMISSIVE, "
        "STRICT (got 'STRCT')"
    )


def test_bad_action() -> None:
    error = error_at(istio("action: REJECT"), "spec.action")
    assert error.reason == "must be one of ALLOW, DENY, AUDIT, CUSTOM (got 'REJECT')"


def test_unknown_nested_field_names_its_path() -> None:
    error = error_at(policy(source="principal: [x]"), f"{SOURCE_PATH}.principal")
    assert error.reason == "unknown field"


def test_snake_case_names_are_unknown_fields() -> None:
    assert (
        error_at(policy(source="ip_blocks: [1.2.3.4]"), f"{SOURCE_PATH}.ip_blocks").reason
        == "unknown field"
    )


def test_wrong_type_names_the_field() -> None:
    error = error_at(policy(operation="methods: GET"), f"{OPERATION_PATH}.methods")
    assert error.reason == "must be a list (got 'GET')"


def test_wrong_scalar_type() -> None:
    error = error_at(
        istio("rules:\n- when:\n  - key: source.ip\n    values: [true]"),
        "spec.rules[0].when[0].values[0]",
    )
    assert error.reason == "must be a string (got boolean true)"


# --- action and provider -------------------------------------------------------------------


def test_custom_without_provider() -> None:
    exc = rejection(istio("action: CUSTOM\nrules: [{}]"))
    assert exc.errors == [FieldError("spec.provider.name", "required with action CUSTOM")]


def test_custom_without_rules() -> None:
    error = error_at(istio("action: CUSTOM\nprovider: {name: ext}"), "spec.rules")
    assert "never applies" in error.reason


def test_provider_only_with_custom() -> None:
    error = error_at(istio("action: DENY\nprovider: {name: ext}\nrules: [{}]"), "spec.provider")
    assert error.reason == "only allowed with action CUSTOM (action is DENY)"


def test_custom_cannot_use_identity_sources_or_conditions() -> None:
    text = policy(
        source="principals: [a]\n      ipBlocks: [10.0.0.0/8]",
        extra=(
            "  when:\n  - key: request.auth.claims[iss]\n    values: [x]\n"
            "action: CUSTOM\nprovider: {name: ext}\n"
        ),
    )
    exc = rejection(text)
    assert {e.path for e in exc.errors} == {
        f"{SOURCE_PATH}.principals",
        "spec.rules[0].when[0].key",
    }
    assert all("not supported with action CUSTOM" in e.reason for e in exc.errors)


def test_deny_without_rules() -> None:
    assert "never applies" in error_at(istio("action: DENY"), "spec.rules").reason


def test_audit_is_accepted() -> None:
    ap = load_one(istio("action: AUDIT\nrules: [{to: [{operation: {paths: ['/admin*']}}]}]"))
    assert isinstance(ap, AuthorizationPolicy) and ap.spec.action == "AUDIT"


# --- selection -----------------------------------------------------------------------------


def test_selector_and_target_ref_are_exclusive() -> None:
    text = istio(
        "selector: {matchLabels: {app: a}}\ntargetRef: {kind: Service, group: '', name: a}"
    )
    exc = rejection(text)
    assert exc.errors == [
        FieldError("spec.targetRef", "only one of selector, targetRef and targetRefs may be set")
    ]


def test_target_refs() -> None:
    text = istio(
        "targetRefs:\n- {kind: Gateway, group: gateway.networking.k8s.io, name: gw}\n"
        "- {kind: Service, group: '', name: users}"
    )
    ap = load_one(text)
    assert isinstance(ap, AuthorizationPolicy) and ap.spec.target_refs is not None
    assert [t.name for t in ap.spec.target_refs] == ["gw", "users"]


def test_target_ref_kind_and_namespace_are_checked() -> None:
    exc = rejection(
        istio("targetRefs:\n- {kind: Deployment, group: apps, name: a, namespace: other}")
    )
    assert {e.path for e in exc.errors} == {
        "spec.targetRefs[0].kind",
        "spec.targetRefs[0].namespace",
    }


def test_selector_labels_cannot_hold_wildcards() -> None:
    assert error_at(
        istio("selector: {matchLabels: {app: 'web*'}}"), "spec.selector.matchLabels.app"
    )


# --- sources and operations ----------------------------------------------------------------


@pytest.mark.parametrize("principal", ["a*b", "**", "*a*", "a**", "", "*/ns/*/sa/x"])
def test_bad_principal_wildcards(principal: str) -> None:
    error = error_at(policy(source=f"principals: ['{principal}']"), f"{SOURCE_PATH}.principals[0]")
    assert "'*'" in error.reason or "empty" in error.reason


@pytest.mark.parametrize(
    "principal", ["*", "cluster.local/*", "*/sa/sleep", "cluster.local/ns/a/sa/b"]
)
def test_good_principal_wildcards(principal: str) -> None:
    load_one(policy(source=f"principals: ['{principal}']"))


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/{**}/a/{*}", "{**} must be the last template operator"),
        ("/foo/{bar}", "only {*} and {**} are supported"),
        ("/foo{*}", "only {*} and {**} are supported"),
        ("/foo/*/{*}", "not allowed next to path templates"),
        ("/a*/b", "'*' is only allowed alone, as a prefix or as a suffix"),
        ("", "must not be empty"),
    ],
)
def test_bad_paths(path: str, reason: str) -> None:
    error = error_at(policy(operation=f"paths: ['/ok', '{path}']"), f"{OPERATION_PATH}.paths[1]")
    assert reason in error.reason


@pytest.mark.parametrize(
    "path", ["/a/{*}/b", "/a/{**}", "/{*}/{*}/{**}", "/a/{**}/b.txt", "*.png", "/static/*"]
)
def test_good_paths(path: str) -> None:
    load_one(policy(operation=f"paths: ['{path}']"))


@pytest.mark.parametrize(
    ("port", "reason"),
    [
        ("'0'", "must be a port number between 1 and 65535 (got '0')"),
        ("'70000'", "must be a port number between 1 and 65535 (got '70000')"),
        ("http", "must be a port number between 1 and 65535 (got 'http')"),
        ("8080", 'must be a string such as "8080" (got integer 8080)'),
    ],
)
def test_bad_ports(port: str, reason: str) -> None:
    error = error_at(policy(operation=f"ports: ['80', {port}]"), f"{OPERATION_PATH}.ports[1]")
    assert error.reason == reason


@pytest.mark.parametrize("block", ["10.0.0.0/33", "300.1.1.1", "10.0.0.0/", "example.com"])
def test_bad_ip_blocks(block: str) -> None:
    error = error_at(policy(source=f"ipBlocks: ['{block}']"), f"{SOURCE_PATH}.ipBlocks[0]")
    assert "must be an IP address or a CIDR block" in error.reason


def test_empty_method_is_refused() -> None:
    assert (
        error_at(policy(operation="methods: ['']"), f"{OPERATION_PATH}.methods[0]").reason
        == "must not be empty"
    )


def test_method_with_spaces_is_refused() -> None:
    assert (
        "HTTP method"
        in error_at(
            policy(operation="methods: ['GET POST']"), f"{OPERATION_PATH}.methods[0]"
        ).reason
    )


def test_empty_lists_and_objects_are_refused_like_istio() -> None:
    exc = rejection(
        istio("rules:\n- from: []\n  to: [{}]\n- from: [{source: {}}]\n  to: [{operation: {}}]")
    )
    assert {e.path: e.reason for e in exc.errors} == {
        "spec.rules[0].from": "must not be empty (omit it to match any source)",
        "spec.rules[0].to[0].operation": "required field is missing",
        "spec.rules[1].from[0].source": (
            "must set at least one field (omit `from` to match any source)"
        ),
        "spec.rules[1].to[0].operation": (
            "must set at least one field (omit `to` to match any operation)"
        ),
    }


def test_service_accounts_cannot_mix_with_principals() -> None:
    error = error_at(
        policy(source="principals: [a]\n      serviceAccounts: [ns/sa]"),
        f"{SOURCE_PATH}.serviceAccounts",
    )
    assert error.reason == "cannot be combined with namespaces or principals"


@pytest.mark.parametrize("account", ["a/b/c", "ns/*", "/sa", "ns/"])
def test_bad_service_accounts(account: str) -> None:
    assert error_at(
        policy(source=f"serviceAccounts: ['{account}']"), f"{SOURCE_PATH}.serviceAccounts[0]"
    )


# --- conditions ----------------------------------------------------------------------------


def when(key: str, values: str = "values: [x]") -> str:
    return istio(f"rules:\n- when:\n  - key: {key}\n    {values}")


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("request.header[x]", "unknown key 'request.header[x]'; supported: source.ip"),
        ("request.headers", "must have the form request.headers[<name>]"),
        ("request.auth.claims[]", "must have the form request.auth.claims[<name>]"),
        ("destination.namespace", "is replaced by metadata.namespace"),
        ("destination.labels[app]", "is replaced by the workload selector"),
        ("destination.user", "deprecated"),
        ("''", "must not be empty"),
    ],
)
def test_bad_condition_keys(key: str, reason: str) -> None:
    assert reason in error_at(when(key), "spec.rules[0].when[0].key").reason


@pytest.mark.parametrize(
    "key",
    [
        "request.headers[x-token]",
        "source.ip",
        "remote.ip",
        "source.namespace",
        "source.principal",
        "source.serviceAccount",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "request.auth.claims[groups]",
        "request.auth.claims[nested][key]",
        "destination.ip",
        "destination.port",
        "connection.sni",
        "experimental.envoy.filters.a.b[c]",
    ],
)
def test_documented_condition_keys(key: str) -> None:
    values = {
        "source.ip": "1.2.3.4",
        "remote.ip": "1.2.3.4",
        "destination.ip": "1.2.3.4",
        "destination.port": "80",
    }
    load_one(when(key, f"values: ['{values.get(key, 'x/y')}']"))


def test_condition_needs_values_or_not_values() -> None:
    exc = rejection(when("source.ip", "values: []"))
    assert exc.errors == [
        FieldError("spec.rules[0].when[0]", "needs at least one of values or notValues")
    ]


def test_condition_values_are_checked_for_the_key() -> None:
    exc = rejection(when("destination.port", "values: ['80', '99999']\n    notValues: ['']"))
    assert {e.path for e in exc.errors} == {
        "spec.rules[0].when[0].values[1]",
        "spec.rules[0].when[0].notValues[0]",
    }


# --- PeerAuthentication --------------------------------------------------------------------


def test_port_level_mtls() -> None:
    pa = load_one(
        istio(
            "selector: {matchLabels: {app: a}}\nmtls: {mode: STRICT}\n"
            "portLevelMtls:\n  8080: {mode: DISABLE}",
            "PeerAuthentication",
        )
    )
    assert isinstance(pa, PeerAuthentication)
    assert pa.spec.port_modes() == {8080: "DISABLE"}
    assert pa.to_document()["spec"]["portLevelMtls"] == {8080: {"mode": "DISABLE"}}


def test_port_level_mtls_needs_a_selector() -> None:
    error = error_at(
        istio("portLevelMtls:\n  8080: {mode: DISABLE}", "PeerAuthentication"), "spec.portLevelMtls"
    )
    assert "needs a selector" in error.reason


def test_port_level_mtls_ports_are_checked() -> None:
    text = istio(
        "selector: {matchLabels: {app: a}}\nportLevelMtls:\n  0: {mode: DISABLE}",
        "PeerAuthentication",
    )
    assert (
        error_at(text, "spec.portLevelMtls[0]").reason == "port must be between 1 and 65535 (got 0)"
    )


def test_port_level_mtls_string_keys_from_json() -> None:
    [pa] = load(
        '{"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",'
        ' "metadata": {"name": "a"}, "spec": {"selector": {"matchLabels": {"app": "a"}},'
        ' "portLevelMtls": {"8080": {"mode": "STRICT"}}}}'
    )
    assert isinstance(pa, PeerAuthentication) and pa.spec.port_modes() == {8080: "STRICT"}


def test_peer_authentication_default_mode_is_unset() -> None:
    pa = load_one(istio("{}", "PeerAuthentication"))
    assert isinstance(pa, PeerAuthentication) and pa.spec.mode == "UNSET"


# --- RequestAuthentication -----------------------------------------------------------------


def jwt(rule: str) -> str:
    return istio(f"jwtRules:\n- {rule}", "RequestAuthentication")


def test_every_jwt_field_is_read() -> None:
    ra = load_one(
        istio(
            """
            selector: {matchLabels: {app: a}}
            jwtRules:
            - issuer: https://issuer.example.com
              audiences: [a, b]
              jwks: '{"keys": []}'
              fromHeaders: [{name: x-jwt, prefix: "Bearer "}]
              fromParams: [token]
              fromCookies: [session]
              outputPayloadToHeader: x-payload
              outputClaimToHeaders: [{header: x-sub, claim: sub}]
              forwardOriginalToken: true
              timeout: 2s
            """,
            "RequestAuthentication",
        )
    )
    assert isinstance(ra, RequestAuthentication)
    rule = ra.spec.jwt_rules[0]
    assert (
        rule.from_headers[0].prefix == "Bearer "
        and rule.timeout is not None
        and rule.timeout.total_seconds() == 2
    )


def test_issuer_is_required() -> None:
    assert (
        error_at(jwt("jwksUri: https://x/keys"), "spec.jwtRules[0].issuer").reason
        == "required field is missing"
    )


def test_jwks_and_jwks_uri_are_exclusive() -> None:
    error = error_at(
        jwt("{issuer: x, jwksUri: 'https://x/k', jwks: '{\"keys\": []}'}"), "spec.jwtRules[0].jwks"
    )
    assert error.reason == "only one of jwksUri and jwks may be set"


@pytest.mark.parametrize("uri", ["ftp://x/keys", "x/keys", "https://"])
def test_jwks_uri_must_be_http(uri: str) -> None:
    assert (
        "http:// or https://"
        in error_at(jwt(f"{{issuer: x, jwksUri: '{uri}'}}"), "spec.jwtRules[0].jwksUri").reason
    )


def test_proto_spelling_of_jwks_uri_is_accepted() -> None:
    ra = load_one(jwt("{issuer: x, jwks_uri: 'https://x/keys'}"))
    assert (
        isinstance(ra, RequestAuthentication)
        and ra.spec.jwt_rules[0].effective_jwks_uri == "https://x/keys"
    )


def test_bad_jwt_details() -> None:
    exc = rejection(
        jwt(
            "{issuer: x, jwks: 'nope', timeout: 0s, fromHeaders: [{name: ''}],"
            " outputClaimToHeaders: [{header: 'a b', claim: c}]}"
        )
    )
    assert {e.path for e in exc.errors} == {
        "spec.jwtRules[0].jwks",
        "spec.jwtRules[0].outputClaimToHeaders[0].header",
        "spec.jwtRules[0].fromHeaders[0].name",
    }


def test_jwt_timeout_minimum() -> None:
    assert (
        error_at(jwt("{issuer: x, timeout: 0s}"), "spec.jwtRules[0].timeout").reason
        == "must be at least 1ms"
    )
