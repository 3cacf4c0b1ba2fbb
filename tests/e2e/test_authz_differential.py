"""Differential test: real Envoy, configured by `verity.xds.rbac`, agrees with the evaluator.

Hypothesis draws scenarios (a Mesh default action, AuthorizationPolicies with every field of
a bounded vocabulary, ALLOW/DENY/AUDIT/CUSTOM, dry-run, a RequestAuthentication, a revoked
identity) and probes (HTTP over mTLS with one of several client certificates, plaintext HTTP,
TCP over mTLS; source address, X-Forwarded-For, SNI, method, path, host, headers, JWT).
Each example runs one Envoy with up to three scenarios side by side and sends every probe;
for each, the observed result must be the evaluator's:

- the status (200, 403 from RBAC or the ext-authz provider, 401 from jwt_authn), or for TCP
  whether the bytes come back;
- for an RBAC refusal, the policy and rule the response code details name;
- for an allowed request, the ALLOW policy recorded in dynamic metadata;
- the AUDIT and dry-run (shadow) results the RBAC filters record.

A disagreement fails with the scenario's YAML and the probe, shrunk by Hypothesis.
`VERITY_AUTHZ_EXAMPLES` sets the number of examples (default 40; the same ones every run
unless `VERITY_AUTHZ_RANDOM=1`); `VERITY_AUTHZ_SHRINK=0` reports the first disagreement
found without shrinking it (shrinking restarts Envoy for every candidate).
"""

from __future__ import annotations

import base64
import json
import os
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from tests.e2e.authz_envoy import (
    Clients,
    Pki,
    PortTaken,
    Site,
    bootstrap,
    free_ports,
    local_apps,
    read_access_log,
    running_envoy,
    three_ports,
)
from verity.policy import (
    Decision,
    ProviderAnswer,
    Request,
    Token,
    WorkloadPolicies,
    evaluate,
    policies_for,
)
from verity.resources import (
    AuthorizationPolicy,
    Dataplane,
    MeshSpec,
    RequestAuthentication,
    load_documents,
)
from verity.resources.verity_kinds import ExtAuthzProvider
from verity.xds.extauthz import ext_authz_cluster_name
from verity.xds.rbac import http_authz_filters, network_authz_filters

EXAMPLES = int(os.environ.get("VERITY_AUTHZ_EXAMPLES", "40"))
# Shrinking reruns Envoy for every candidate: minutes. VERITY_AUTHZ_SHRINK=0 skips it.
PHASES = [Phase.explicit, Phase.reuse, Phase.generate] + (
    [Phase.shrink] if os.environ.get("VERITY_AUTHZ_SHRINK", "1") != "0" else []
)
TRUST_DOMAIN, ALIAS = "td.example", "old.example"
ISSUER = "https://issuer.example/tenant"
REVOKED = f"spiffe://{TRUST_DOMAIN}/ns/dev/sa/revoked"
IDENTITIES = (
    f"spiffe://{TRUST_DOMAIN}/ns/default/sa/sleep",
    f"spiffe://{ALIAS}/ns/default/sa/sleep",
    f"spiffe://{TRUST_DOMAIN}/ns/foo/sa/admin",
    f"spiffe://{TRUST_DOMAIN}/ns/test-1/sa/tester",
    "spiffe://other.example/ns/default/sa/sleep",
    REVOKED,
)
PORT_NAMES = ("PORT_MTLS", "PORT_PLAIN", "PORT_TCP")

# --- vocabulary of policies ---------------------------------------------------------------------

PRINCIPALS = [
    "cluster.local/ns/default/sa/sleep",
    f"{TRUST_DOMAIN}/ns/foo/sa/admin",
    f"{ALIAS}/ns/test-1/sa/tester",
    "other.example/ns/default/sa/sleep",
    "*",
    "cluster.local/ns/default/*",
    "*/sa/sleep",
    "*admin",
]
NAMESPACES = ["default", "foo", "test-*", "*", "*-1", "dev"]
SERVICE_ACCOUNTS = ["admin", "default/sleep", "dev/revoked"]
IP_BLOCKS = ["127.0.0.1", "127.0.0.2/32", "127.0.0.0/31", "10.0.0.0/8"]
REMOTE_IP_BLOCKS = ["10.1.0.0/16", "10.2.3.4", "127.0.0.1", "127.0.0.3/32"]
REQUEST_PRINCIPALS = [f"{ISSUER}/alice", f"{ISSUER}/*", "*", "*/bob", "other/alice", "*ice"]
HOSTS = ["httpbin.foo", "HTTPBIN.foo:8000", "*.foo", "httpbin*", "*"]
METHODS = ["GET", "POST", "get", "PUT", "*", "P*", "*E"]
PATHS = [
    "/admin",
    "/admin*",
    "/public/{*}",
    "/public/{**}",
    "*.html",
    "/api/{*}/items",
    "*",
    "/",
]
PORTS = [*PORT_NAMES, "1234"]
WHEN = {
    "request.headers[x-user]": ["alice", "bob*", "*"],
    "source.ip": ["127.0.0.1", "127.0.0.2/31"],
    "remote.ip": ["10.1.2.3", "127.0.0.0/8"],
    "source.namespace": ["default", "foo", "te*"],
    "source.principal": ["cluster.local/ns/foo/sa/admin", "*"],
    "source.serviceAccount": ["default/sleep", "admin"],
    "request.auth.principal": [f"{ISSUER}/alice", "*"],
    "request.auth.claims[groups]": ["admins", "dev*"],
    "request.auth.claims[realm][role]": ["owner"],
    "request.auth.audiences": ["httpbin", "web*"],
    "request.auth.presenter": ["web-app"],
    "destination.port": [*PORT_NAMES, "1234"],
    "destination.ip": ["127.0.0.1", "10.0.0.0/8"],
    "connection.sni": ["httpbin.foo.svc", "*.svc"],
}


def _some(values: list[str]) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(values), min_size=1, max_size=2, unique=True)


@st.composite
def sources(draw: st.DrawFn) -> dict[str, Any]:
    fields = ["ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks"]
    fields += ["requestPrincipals", "notRequestPrincipals"]
    identity = draw(st.sampled_from(["principals", "namespaces", "serviceAccounts", None]))
    vocabulary = {
        "principals": PRINCIPALS,
        "namespaces": NAMESPACES,
        "serviceAccounts": SERVICE_ACCOUNTS,
        "ipBlocks": IP_BLOCKS,
        "remoteIpBlocks": REMOTE_IP_BLOCKS,
        "requestPrincipals": REQUEST_PRINCIPALS,
    }
    chosen = draw(st.lists(st.sampled_from(fields), max_size=2, unique=True))
    if identity is not None:
        chosen.append(draw(st.sampled_from([identity, "not" + identity[0].upper() + identity[1:]])))
    if not chosen:
        chosen = ["principals"]
    source = {}
    for name in chosen:
        base = name[3].lower() + name[4:] if name.startswith("not") else name
        source[name] = draw(_some(vocabulary[base]))
    return source


@st.composite
def operations(draw: st.DrawFn) -> dict[str, Any]:
    vocabulary = {"hosts": HOSTS, "ports": PORTS, "methods": METHODS, "paths": PATHS}
    names = [n for base in vocabulary for n in (base, "not" + base.capitalize())]
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True))
    operation = {}
    for name in chosen:
        base = name[3].lower() + name[4:] if name.startswith("not") else name
        operation[name] = draw(_some(vocabulary[base]))
    return operation


@st.composite
def conditions(draw: st.DrawFn) -> dict[str, Any]:
    key = draw(st.sampled_from(sorted(WHEN)))
    negated = draw(st.booleans())
    return {"key": key, ("notValues" if negated else "values"): draw(_some(WHEN[key]))}


@st.composite
def rules(draw: st.DrawFn) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    if draw(st.booleans()):
        rule["from"] = [{"source": s} for s in draw(st.lists(sources(), min_size=1, max_size=2))]
    if draw(st.booleans()):
        rule["to"] = [
            {"operation": o} for o in draw(st.lists(operations(), min_size=1, max_size=2))
        ]
    if draw(st.integers(0, 2)) == 0:
        rule["when"] = draw(st.lists(conditions(), min_size=1, max_size=2))
    return rule


@st.composite
def policies(draw: st.DrawFn, index: int) -> dict[str, Any]:
    action = draw(st.sampled_from(["ALLOW", "ALLOW", "DENY", "DENY", "AUDIT", "CUSTOM"]))
    spec: dict[str, Any] = {"action": action}
    rule_list = draw(st.lists(rules(), min_size=0 if action == "ALLOW" else 1, max_size=3))
    if action == "ALLOW" and not rule_list and draw(st.booleans()):
        pass  # an ALLOW policy without rules: allows nothing
    else:
        spec["rules"] = rule_list
    if action == "CUSTOM":
        spec["provider"] = {"name": draw(st.sampled_from(["authz", "authz", "missing"]))}
        spec["rules"] = [_custom_safe(r) for r in rule_list]
    metadata: dict[str, Any] = {"name": f"p{index}", "namespace": "foo"}
    if action in ("ALLOW", "DENY") and draw(st.integers(0, 4)) == 0:
        metadata["annotations"] = {"istio.io/dry-run": "true"}
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": metadata,
        "spec": spec,
    }


_CUSTOM_UNSUPPORTED = {"principals", "namespaces", "serviceAccounts", "requestPrincipals"}


def _custom_safe(rule: dict[str, Any]) -> dict[str, Any]:
    """Drop what CUSTOM policies may not use (identity fields and keys), as validation says."""
    safe = dict(rule)
    if "from" in safe:
        kept = []
        for entry in safe["from"]:
            source = {
                k: v
                for k, v in entry["source"].items()
                if (k[3].lower() + k[4:] if k.startswith("not") else k) not in _CUSTOM_UNSUPPORTED
            }
            if source:
                kept.append({"source": source})
        if kept:
            safe["from"] = kept
        else:
            del safe["from"]
    if "when" in safe:
        when = [
            c
            for c in safe["when"]
            if c["key"] not in ("source.namespace", "source.principal", "source.serviceAccount")
            and not c["key"].startswith("request.auth.")
        ]
        if when:
            safe["when"] = when
        else:
            del safe["when"]
    return safe


@dataclass(frozen=True)
class Scenario:
    default_action: str
    documents: tuple[dict[str, Any], ...]
    authn: bool
    revoked: bool

    def text(self, ports: tuple[int, int, int]) -> str:
        numbers = dict(zip(PORT_NAMES, (str(p) for p in ports), strict=True))
        return yaml.safe_dump_all(
            [_with_ports(d, numbers) for d in self.documents], sort_keys=False
        )


def _with_ports(value: Any, numbers: dict[str, str]) -> Any:
    """The listener port names replaced by the ports of this run."""
    if isinstance(value, dict):
        return {k: _with_ports(v, numbers) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_ports(v, numbers) for v in value]
    return numbers.get(value, value) if isinstance(value, str) else value


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    count = draw(st.integers(0, 4))
    documents = tuple(draw(policies(i)) for i in range(count))
    return Scenario(
        default_action=draw(st.sampled_from(["DENY", "ALLOW"])),
        documents=documents,
        authn=draw(st.booleans()),
        revoked=draw(st.booleans()),
    )


# --- probes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    kind: str  # mtls, plain, tcp
    identity: str | None
    source_ip: str
    xff: str | None
    sni: str | None
    method: str
    path: str
    host: str
    user: str | None
    ext: str | None
    token: str  # none, alice, bob, invalid, unknown-issuer

    def describe(self) -> str:
        return json.dumps(self.__dict__)


TOKENS = ("none", "alice", "bob", "invalid", "unknown-issuer")


@st.composite
def probes(draw: st.DrawFn) -> Probe:
    kind = draw(st.sampled_from(["mtls", "mtls", "mtls", "plain", "tcp"]))
    tls = kind != "plain"
    return Probe(
        kind=kind,
        identity=draw(st.sampled_from(IDENTITIES)) if tls else None,
        source_ip=draw(st.sampled_from(["127.0.0.1", "127.0.0.2", "127.0.0.3"])),
        xff=draw(st.sampled_from([None, None, "10.1.2.3", "10.2.3.4", "127.0.0.1"])),
        sni=draw(st.sampled_from([None, "httpbin.foo.svc", "other.svc"])) if tls else None,
        method=draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"])),
        path=draw(
            st.sampled_from(
                [
                    "/",
                    "/admin",
                    "/admin/",
                    "/Admin",
                    "/admin?x=1",
                    "//admin",
                    "/x/../admin",
                    "/%61dmin",
                    "/public/a",
                    "/public/a/b",
                    "/public/",
                    "/index.html",
                    "/api/v1/items",
                    "/api/v1/v2/items",
                    '/a"b.html',
                ]
            )
        ),
        host=draw(
            st.sampled_from(
                ["httpbin.foo", "HTTPBIN.FOO", "httpbin.foo:8000", "httpbin.bar", "x.foo"]
            )
        ),
        user=draw(st.sampled_from([None, "alice", "bob", "bobby"])),
        ext=draw(st.sampled_from([None, "allow", "deny"])),
        token=draw(st.sampled_from(TOKENS)),
    )


# --- JWTs ------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Jwt:
    """ES256 tokens from a throwaway issuer key, and the JWKS that verifies them."""

    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    other: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )

    def jwks(self) -> str:
        numbers = self.key.public_key().public_numbers()
        key = {
            "kty": "EC",
            "crv": "P-256",
            "kid": "k1",
            "alg": "ES256",
            "use": "sig",
            "x": _b64(numbers.x.to_bytes(32, "big")),
            "y": _b64(numbers.y.to_bytes(32, "big")),
        }
        return json.dumps({"keys": [key]})

    def sign(self, claims: dict[str, Any], key: ec.EllipticCurvePrivateKey | None = None) -> str:
        header = _b64(json.dumps({"alg": "ES256", "kid": "k1", "typ": "JWT"}).encode())
        payload = _b64(json.dumps(claims).encode())
        der = (key or self.key).sign(f"{header}.{payload}".encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{header}.{payload}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


CLAIMS: dict[str, dict[str, Any]] = {
    "alice": {
        "sub": "alice",
        "groups": ["admins", "dev-team"],
        "aud": "httpbin",
        "azp": "web-app",
        "realm": {"role": "owner"},
    },
    "bob": {"sub": "bob", "groups": "devops", "aud": ["web-ui", "x"]},
}


def token_of(probe: Probe, jwt: Jwt) -> tuple[str | None, Token | None]:
    """(the Authorization header's token, what the evaluator is told about it)."""
    if probe.token == "none":
        return None, None
    claims: dict[str, Any] = {"iss": ISSUER, "exp": 4102444800, **CLAIMS.get(probe.token, {})}
    if probe.token == "invalid":
        claims.update(CLAIMS["alice"])
        return jwt.sign(claims, jwt.other), Token(claims, valid=False)
    if probe.token == "unknown-issuer":
        claims.update({"iss": "https://unknown.example", "sub": "alice"})
    return jwt.sign(claims), Token(claims)


# --- the scenario as resources, filters and requests ----------------------------------------


def mesh_spec(default_action: str, ext_port: int) -> MeshSpec:
    provider = {
        "name": "authz",
        "envoyExtAuthzHttp": {
            "service": "authz.local",
            "port": ext_port,
            "includeRequestHeadersInCheck": ["x-ext"],
        },
    }
    return MeshSpec.model_validate(
        {
            "trustDomain": TRUST_DOMAIN,
            "trustDomainAliases": [ALIAS],
            "authorization": {"defaultAction": default_action, "providers": [provider]},
        }
    )


def workload(ports: tuple[int, int, int]) -> Dataplane:
    return Dataplane.model_validate(
        {
            "api_version": "verity.dev/v1alpha1",
            "kind": "Dataplane",
            "name": "httpbin-1",
            "namespace": "foo",
            "spec": {
                "service": "httpbin",
                "serviceAccount": "httpbin",
                "labels": {"app": "httpbin"},
                "address": "127.0.0.1",
                "inbound": [
                    {"port": ports[0], "protocol": "http"},
                    {"port": ports[1], "protocol": "http"},
                    {"port": ports[2], "protocol": "tcp"},
                ],
            },
        }
    )


def authn_document(jwt: Jwt) -> str:
    return textwrap.dedent(
        f"""
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {{name: jwt, namespace: foo}}
        spec:
          jwtRules:
          - issuer: {ISSUER}
            jwks: '{jwt.jwks()}'
        """
    )


@dataclass
class Prepared:
    scenario: Scenario
    site: Site
    policies: WorkloadPolicies
    text: str


def prepare(scenario: Scenario, jwt: Jwt, ext_port: int) -> Prepared:
    ports = three_ports()
    text = scenario.text(ports)
    if scenario.authn:
        text += "---\n" + authn_document(jwt)
    loaded = load_documents(text) if text.strip() else []
    policies = policies_for(
        mesh_spec(scenario.default_action, ext_port),
        workload(ports),
        authorization_policies=[r for r in loaded if isinstance(r, AuthorizationPolicy)],
        request_authentications=[r for r in loaded if isinstance(r, RequestAuthentication)],
        revoked=[REVOKED] if scenario.revoked else [],
    )
    site = Site(
        http_authz_filters(policies, mtls=True),
        http_authz_filters(policies, mtls=False),
        network_authz_filters(policies, port=ports[2], mtls=True),
        ports,
    )
    shown = f"mesh authorization.defaultAction: {scenario.default_action}\n"
    shown += f"revoked: {[REVOKED] if scenario.revoked else []}\n---\n" + text
    return Prepared(scenario, site, policies, shown)


def port_of(site: Site, probe: Probe) -> int:
    return {"mtls": site.mtls_port, "plain": site.plain_port, "tcp": site.tcp_port}[probe.kind]


def expected(prepared: Prepared, probe: Probe, token: Token | None) -> Decision:
    headers = {}
    if probe.user is not None:
        headers["x-user"] = probe.user
    if probe.ext is not None:
        headers["x-ext"] = probe.ext
    request = Request(
        source_principal=probe.identity,
        source_ip=probe.source_ip,
        remote_ip=probe.xff,
        token=token,
        host=probe.host,
        method=probe.method,
        path=probe.path,
        headers=headers,
        destination_ip="127.0.0.1",
        destination_port=port_of(prepared.site, probe),
        sni=probe.sni,
        protocol="tcp" if probe.kind == "tcp" else "http",
    )
    answer: ProviderAnswer = "ALLOW" if probe.ext == "allow" else "DENY"
    return evaluate(prepared.policies, request, provider_answers={"authz": answer})


# --- comparing --------------------------------------------------------------------------------


def mismatches(
    decision: Decision, status: int, logged: tuple[int, str, dict[str, Any]] | None
) -> list[str]:
    want = 200 if decision.verdict == "ALLOW" else decision.status
    found: list[str] = []
    if status != want:
        return [f"status {status}, evaluator {want} ({decision.decided_by})"]
    if logged is None:
        return ["no access log line"]
    _, details, metadata = logged
    if status == 403 and details.startswith("rbac_access_denied_matched_policy["):
        named = details[len("rbac_access_denied_matched_policy[") : -1]
        if named != (decision.envoy_policy_id or "none"):
            found.append(f"Envoy names {named}, evaluator {decision.envoy_policy_id}")
    if status == 200 and decision.deciding is not None and decision.deciding.action == "ALLOW":
        allowed_by = metadata.get("allow.enforced_effective_policy_id")
        if allowed_by != decision.envoy_policy_id:
            found.append(f"Envoy allowed by {allowed_by}, evaluator by {decision.envoy_policy_id}")
    found += _shadow_mismatches(decision, metadata)
    return found


def _first_id(decision: Decision, action: str, dry_run: bool) -> str | None:
    ids = [
        r.envoy_id
        for r in decision.policies
        if r.action == action and r.dry_run == dry_run and r.envoy_id is not None
    ]
    return min(ids, default=None)


def _shadow_mismatches(decision: Decision, metadata: dict[str, Any]) -> list[str]:
    found = []
    checks = (
        ("audit_enforced", "AUDIT", False),
        ("dry_run_deny_shadow", "DENY", True),
        ("dry_run_allow_shadow", "ALLOW", True),
    )
    for prefix, action, dry_run in checks:
        result_key, id_key = f"{prefix}_engine_result", f"{prefix}_effective_policy_id"
        if result_key not in metadata:
            continue  # that filter did not run (an earlier one refused)
        want = _first_id(decision, action, dry_run)
        if metadata.get(id_key) != want:
            found.append(f"{id_key}: Envoy {metadata.get(id_key)}, evaluator {want}")
    return found


# --- the test ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def harness(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Pki, Jwt, tuple[int, int, int], Path]]:
    directory = tmp_path_factory.mktemp("authz")
    with local_apps() as ports:
        yield Pki(directory / "pki"), Jwt(), ports, directory


COUNTS = {"examples": 0, "probes": 0, "runs": 0}


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("VERITY_AUTHZ_RANDOM", "0") == "0",
    phases=PHASES,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(
    cases=st.lists(
        st.tuples(scenarios(), st.lists(probes(), min_size=20, max_size=40)), min_size=2, max_size=3
    )
)
def test_envoy_enforces_what_the_evaluator_decides(
    harness: tuple[Pki, Jwt, tuple[int, int, int], Path], cases: list[tuple[Scenario, list[Probe]]]
) -> None:
    for attempt in range(3):
        try:
            prepared, observed, logged = run_example(harness, cases)
            break
        except PortTaken:
            if attempt == 2:
                raise
    COUNTS["examples"] += 1
    COUNTS["probes"] += len(observed)
    failures = []
    for case, (probe, decision, result, site_index) in observed.items():
        problems = _compare(probe, decision, result, logged.get(case))
        if problems:
            failures.append((prepared[site_index].text, probe, decision, problems))
    if failures:
        text, probe, decision, problems = failures[0]
        message = (
            f"{len(failures)} disagreement(s); the first:\n{text}\nprobe: {probe.describe()}\n"
            f"problems: {problems}\nevaluator:\n  " + "\n  ".join(decision.steps)
        )
        note(message)
        raise AssertionError(message)


Observed = dict[str, tuple[Probe, Decision, int | bool, int]]


def run_example(
    harness: tuple[Pki, Jwt, tuple[int, int, int], Path], cases: list[tuple[Scenario, list[Probe]]]
) -> tuple[list[Prepared], Observed, dict[str, tuple[int, str, dict[str, Any]]]]:
    """One Envoy for the example's scenarios: every probe sent, with the evaluator's answer."""
    pki, jwt, (app_port, echo_port, ext_port), directory = harness
    prepared = [prepare(scenario, jwt, ext_port) for scenario, _ in cases]
    log = directory / f"access-{COUNTS['runs']}.log"
    COUNTS["runs"] += 1
    config = bootstrap(
        [p.site for p in prepared],
        pki,
        app_port=app_port,
        echo_port=echo_port,
        access_log=log,
        admin_port=free_ports(1)[0],
        extra_clusters={ext_authz_cluster_name(_provider(prepared[0])): ext_port},
    )
    observed: Observed = {}
    clients = Clients(pki)
    with running_envoy(config, directory / "envoy.json"):
        for site_index, (setup, (_, probe_list)) in enumerate(zip(prepared, cases, strict=True)):
            for probe_index, probe in enumerate(probe_list):
                case = f"{site_index}-{probe_index}"
                raw_token, token = token_of(probe, jwt)
                result = _send(clients, setup.site, probe, raw_token, case)
                observed[case] = (probe, expected(setup, probe, token), result, site_index)
        clients.close()
    return prepared, observed, read_access_log(log)


def _provider(prepared: Prepared) -> ExtAuthzProvider:
    provider = prepared.policies.mesh.authorization.provider("authz")
    assert provider is not None
    return provider


def _send(clients: Clients, site: Site, probe: Probe, token: str | None, case: str) -> int | bool:
    if probe.kind == "tcp":
        return clients.tcp_allowed(site.tcp_port, probe.identity, probe.source_ip)
    headers = {"x-case": case}
    for name, value in (
        ("x-user", probe.user),
        ("x-ext", probe.ext),
        ("x-forwarded-for", probe.xff),
    ):
        if value is not None:
            headers[name] = value
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return clients.request(
        port_of(site, probe),
        tls=probe.kind == "mtls",
        identity=probe.identity,
        source_ip=probe.source_ip,
        sni=probe.sni,
        method=probe.method,
        path=probe.path,
        host=probe.host,
        headers=headers,
    )


def _compare(
    probe: Probe,
    decision: Decision,
    result: int | bool,
    logged: tuple[int, str, dict[str, Any]] | None,
) -> list[str]:
    if probe.kind == "tcp":
        allowed = decision.verdict == "ALLOW"
        return [] if result == allowed else [f"TCP allowed={result}, evaluator {decision.verdict}"]
    assert isinstance(result, int)
    return mismatches(decision, result, logged)


def test_zz_report_counts() -> None:
    """Not a check: prints how many examples and probes the differential test ran."""
    print(f"\ndifferential: {COUNTS['examples']} Envoy runs, {COUNTS['probes']} probes")
