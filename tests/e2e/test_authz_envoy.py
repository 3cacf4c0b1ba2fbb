"""Every authorization filter `verity.xds.rbac` and `verity.xds.authn` generate loads in real
Envoy (`envoy --mode validate`), and a few behaviours only a running Envoy shows: JWT
outcomes (401 for a bad token, none required), deny log fields, CUSTOM via ext-authz.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from tests.e2e.authz_envoy import (
    Clients,
    Pki,
    Site,
    bootstrap,
    free_ports,
    local_apps,
    read_access_log,
    running_envoy,
    to_dict,
    validate,
)
from tests.e2e.test_authz_differential import ISSUER, Jwt, authn_document
from tests.unit.policy.test_authz import (
    CUSTOM,
    DENY_ADMIN_FROM_OTHER_NAMESPACES,
    JWT,
    REFERENCE_ALLOW,
    for_workload,
    mesh,
    policy,
    workload,
)
from tests.unit.policy.test_authz_selection import KUMA, WEB
from verity.policy import WorkloadPolicies
from verity.xds.authn import jwks_clusters
from verity.xds.extauthz import ext_authz_cluster, ext_authz_cluster_name
from verity.xds.rbac import http_authz_filters, network_authz_filters

EVERYTHING = policy(
    """
    rules:
    - from:
      - source:
          principals: ["cluster.local/ns/a/sa/b", "*suffix", "prefix*", "*"]
          notPrincipals: ["x/ns/y/sa/z"]
          requestPrincipals: ["iss/sub", "*", "*/s", "i/*", "*ub"]
          notRequestPrincipals: ["bad/one"]
          namespaces: ["a", "b*", "*c"]
          notNamespaces: ["*"]
          ipBlocks: ["10.0.0.0/8", "fd00::/8", "1.2.3.4"]
          notIpBlocks: ["10.9.0.0/16"]
          remoteIpBlocks: ["192.168.0.0/16"]
          notRemoteIpBlocks: ["192.168.9.9"]
      - source: {serviceAccounts: ["sa", "ns/sa"], notServiceAccounts: ["x"]}
      to:
      - operation:
          hosts: ["a.example", "*.b.example", "c*", "*"]
          notHosts: ["d.example:80"]
          ports: ["80", "8080"]
          notPorts: ["9090"]
          methods: ["GET", "P*", "*E"]
          notMethods: ["TRACE"]
          paths: ["/a", "/b*", "*.c", "/d/{*}/e", "/f/{**}", "*"]
          notPaths: ["/g/{*}"]
      when:
      - {key: "request.headers[X-A]", values: ["v", "p*", "*s", "*"], notValues: ["n"]}
      - {key: "request.experimental.inline.headers[x-b]", values: ["v"]}
      - {key: source.ip, values: ["10.0.0.1"], notValues: ["10.0.0.2/31"]}
      - {key: remote.ip, values: ["10.0.0.1"]}
      - {key: source.namespace, values: ["ns"]}
      - {key: source.serviceAccount, values: ["ns/sa"]}
      - {key: source.principal, values: ["cluster.local/ns/a/sa/b"]}
      - {key: request.auth.principal, values: ["iss/sub"]}
      - {key: request.auth.audiences, values: ["aud", "a*"]}
      - {key: request.auth.presenter, values: ["azp"]}
      - {key: "request.auth.claims[groups]", values: ["g"], notValues: ["h"]}
      - {key: "request.auth.claims[a][b]", values: ["c"]}
      - {key: destination.ip, values: ["10.0.0.7", "fd00::1"]}
      - {key: destination.port, values: ["8000"]}
      - {key: connection.sni, values: ["x.example", "*.svc"]}
      - {key: "experimental.envoy.filters.network.mysql_proxy[db.table]", values: ["[update]", "v"]}
    """,
    name="everything",
)
REMOTE_JWKS = textwrap.dedent(
    """
    apiVersion: security.istio.io/v1
    kind: RequestAuthentication
    metadata: {name: remote, namespace: foo}
    spec:
      jwtRules:
      - issuer: https://accounts.example
        jwksUri: https://keys.example/.well-known/jwks.json
        audiences: [httpbin]
        fromHeaders: [{name: x-jwt, prefix: "Bearer "}]
        fromParams: [token]
        fromCookies: [session]
        outputPayloadToHeader: x-payload
        outputClaimToHeaders: [{header: x-sub, claim: sub}]
        forwardOriginalToken: true
        timeout: 2s
    ---
    """
)
GRPC_CUSTOM = policy(
    '{action: CUSTOM, provider: {name: opa}, rules: [{to: [{operation: {ports: ["5432"]}}]}]}',
    name="grpc-ext",
)
WEB_CUSTOM = policy(
    '{action: CUSTOM, provider: {name: web-authz}, rules: [{to: [{operation: {paths: ["/x"]}}]}]}',
    name="http-ext",
)
AUDIT_AND_DRY_RUN = (
    policy('{action: AUDIT, rules: [{to: [{operation: {methods: ["POST"]}}]}]}', name="audit")
    + policy("{action: DENY, rules: [{}]}", name="dry-deny", dry_run=True)
    + policy("rules: [{}]", name="dry-allow", dry_run=True)
)
TCP_PORTS = ((8000, "http"), (5432, "tcp"))


def scenarios() -> dict[str, WorkloadPolicies]:
    target = workload(ports=TCP_PORTS)
    found = {
        "none-deny": for_workload("", target=target),
        "none-allow": for_workload("", target=target, mesh_spec=mesh("ALLOW")),
        "reference": for_workload(REFERENCE_ALLOW, target=target),
        "deny-admin": for_workload(
            DENY_ADMIN_FROM_OTHER_NAMESPACES, target=target, revoked=["spiffe://x/ns/a/sa/b"]
        ),
        "everything": for_workload(EVERYTHING + JWT, target=target),
        "aliases": for_workload(
            EVERYTHING,
            target=target,
            mesh_spec=mesh(trust_domain="t.example", aliases=["o.example"]),
        ),
        "custom": for_workload(CUSTOM + GRPC_CUSTOM + WEB_CUSTOM, target=target),
        "custom-missing": for_workload(CUSTOM.replace("name: opa", "name: nope"), target=target),
        "audit-dry-run": for_workload(AUDIT_AND_DRY_RUN, target=target),
        "dry-run-only": for_workload(AUDIT_AND_DRY_RUN, target=target, mesh_spec=mesh("ALLOW")),
        "remote-jwks": for_workload(REMOTE_JWKS + policy("rules: [{}]"), target=target),
        "kuma": for_workload(KUMA, target=target, dataplanes=WEB),
    }
    return found


def sites(policies: WorkloadPolicies) -> Site:
    return Site(
        http_authz_filters(policies, mtls=True),
        http_authz_filters(policies, mtls=False),
        network_authz_filters(policies, port=5432, mtls=True),
    )


def extra_cluster_dicts(all_policies: list[WorkloadPolicies]) -> list[dict[str, Any]]:
    clusters: dict[str, dict[str, Any]] = {}
    for policies in all_policies:
        for provider in policies.mesh.authorization.providers:
            clusters[ext_authz_cluster_name(provider)] = to_dict(ext_authz_cluster(provider))
        for cluster in jwks_clusters(policies.request_authentications):
            clusters[cluster.name] = to_dict(cluster)
    return list(clusters.values())


def test_every_generated_filter_loads_in_envoy(tmp_path: Path) -> None:
    found = scenarios()
    with local_apps() as (app, echo, _):
        config = bootstrap(
            [sites(p) for p in found.values()],
            Pki(tmp_path / "pki"),
            app_port=app,
            echo_port=echo,
            access_log=tmp_path / "access.log",
            admin_port=free_ports(1)[0],
        )
    config["static_resources"]["clusters"] += extra_cluster_dicts(list(found.values()))
    result = validate(config, tmp_path / "all.json")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def test_a_bad_filter_is_refused(tmp_path: Path) -> None:
    # The check above means something only if validation looks inside the filters.
    policies = for_workload(policy("rules: [{}]"))
    site = sites(policies)
    config = bootstrap(
        [site],
        Pki(tmp_path / "pki"),
        app_port=1,
        echo_port=2,
        access_log=tmp_path / "a.log",
        admin_port=free_ports(1)[0],
    )
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    rbac_filter = manager["typed_config"]["http_filters"][-2]
    rbac_filter["typed_config"]["rules"]["policies"]["ns[foo]-policy[httpbin]-rule[0]"][
        "principals"
    ] = [{"authenticated": {"principal_name": {"safe_regex": {"regex": "("}}}}]
    result = validate(config, tmp_path / "bad.json")
    assert result.returncode != 0 and "missing )" in result.stdout + result.stderr


# --- behaviour that needs a running Envoy ---------------------------------------------------


def test_jwt_outcomes_and_deny_log_fields(tmp_path: Path) -> None:
    jwt = Jwt()
    text = (
        authn_document(jwt)
        + "---\n"
        + policy(
            """
            action: DENY
            rules:
            - to: [{operation: {paths: ["/admin"]}}]
              from: [{source: {notRequestPrincipals: ["*"]}}]
            """,
            name="require-jwt",
        )
        + policy("rules: [{}]", name="allow-all")
    )
    policies = for_workload(text)
    site = sites(policies)
    pki = Pki(tmp_path / "pki")
    log = tmp_path / "access.log"
    sleep = "spiffe://cluster.local/ns/default/sa/sleep"
    good = jwt.sign({"iss": ISSUER, "sub": "alice", "exp": 4102444800})
    forged = jwt.sign({"iss": ISSUER, "sub": "alice", "exp": 4102444800}, jwt.other)
    unknown = jwt.sign({"iss": "https://elsewhere", "sub": "alice", "exp": 4102444800})
    cases = {
        "no-token-public": (None, "/public", 200),
        "no-token-admin": (None, "/admin", 403),
        "token-admin": (good, "/admin", 200),
        "forged": (forged, "/public", 401),
        "unknown-issuer": (unknown, "/public", 401),
    }
    with local_apps() as (app, echo, _):
        config = bootstrap(
            [site],
            pki,
            app_port=app,
            echo_port=echo,
            access_log=log,
            admin_port=free_ports(1)[0],
        )
        clients = Clients(pki)
        with running_envoy(config, tmp_path / "envoy.json"):
            statuses = {
                case: clients.request(
                    site.mtls_port,
                    tls=True,
                    identity=sleep,
                    source_ip="127.0.0.1",
                    sni=None,
                    method="GET",
                    path=path,
                    host="httpbin",
                    headers={"x-case": case, **({"authorization": f"Bearer {t}"} if t else {})},
                )
                for case, (t, path, _) in cases.items()
            }
            clients.close()
    assert statuses == {case: want for case, (_, _, want) in cases.items()}
    logged = read_access_log(log)
    _, details, metadata = logged["no-token-admin"]
    assert details == "rbac_access_denied_matched_policy[ns[foo]-policy[require-jwt]-rule[0]]"
    assert metadata["deny.enforced_effective_policy_id"] == "ns[foo]-policy[require-jwt]-rule[0]"
    assert logged["token-admin"][2]["allow.enforced_effective_policy_id"] == (
        "ns[foo]-policy[allow-all]-rule[0]"
    )
    assert logged["forged"][1].startswith("jwt_authn_access_denied")
