"""Verity's Mesh and Dataplane: defaults, consistency checks, precise errors."""

from __future__ import annotations

import textwrap
from datetime import timedelta

import pytest

from verity.resources import Dataplane, FieldError, Mesh

from .helpers import error_at, load_one, rejection


def mesh(spec: str = "{}") -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    return (
        f"apiVersion: verity.dev/v1alpha1\nkind: Mesh\nmetadata:\n  name: default\nspec:\n{body}\n"
    )


def dataplane(spec: str) -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    return (
        "apiVersion: verity.dev/v1alpha1\nkind: Dataplane\n"
        f"metadata:\n  name: web-1\n  namespace: shop\nspec:\n{body}\n"
    )


BASE_DP = """
service: web
address: 10.0.0.5
inbound:
- {port: 8080, appPort: 3000, protocol: http}
"""


# --- Mesh ----------------------------------------------------------------------------------


def test_mesh_defaults_are_secure_and_not_written_back() -> None:
    resource = load_one(mesh())
    assert isinstance(resource, Mesh)
    spec = resource.spec
    assert spec.trust_domain == "cluster.local"
    assert spec.root_namespace == "verity-system"
    assert spec.mtls.mode == "STRICT"
    assert spec.authorization.default_action == "DENY"
    assert spec.egress.default_action == "DENY"
    assert spec.ca.backend == "builtin" and spec.ca.builtin_settings.key_type == "ECDSA_P256"
    assert spec.certificates.validity == timedelta(hours=24)
    assert spec.certificates.effective_renew_before == timedelta(hours=8)
    assert spec.tls.min_version == "TLSv1_2" and spec.tls.max_version == "TLSv1_3"
    assert resource.to_document()["spec"] == {}
    assert resource.key() == ("Mesh", "", "default")
    assert resource.as_verity_mesh() is spec


@pytest.mark.parametrize("domain", ["Cluster.Local", "a b", "spiffe://x", "''"])
def test_bad_trust_domain(domain: str) -> None:
    assert (
        "SPIFFE trust domain" in error_at(mesh(f"trustDomain: {domain}"), "spec.trustDomain").reason
    )


def test_trust_domain_aliases() -> None:
    exc = rejection(mesh("trustDomainAliases: [cluster.local, old.example, old.example]"))
    assert {e.path for e in exc.errors} == {
        "spec.trustDomainAliases[0]",
        "spec.trustDomainAliases[2]",
    }


def test_renew_before_must_be_shorter_than_validity() -> None:
    error = error_at(
        mesh("certificates: {validity: 1h, renewBefore: 2h}"), "spec.certificates.renewBefore"
    )
    assert error.reason == "must be more than 0s and shorter than validity (1h)"


def test_renew_before_defaults_to_a_third_of_validity() -> None:
    resource = load_one(mesh("certificates: {validity: 3h}"))
    assert isinstance(resource, Mesh)
    assert resource.spec.certificates.effective_renew_before == timedelta(hours=1)


@pytest.mark.parametrize(("validity", "shown"), [("1m", "1m"), ("100d", "2400h")])
def test_validity_bounds(validity: str, shown: str) -> None:
    error = error_at(mesh(f"certificates: {{validity: {validity}}}"), "spec.certificates.validity")
    assert error.reason == f"must be between 10m and 90d (got {shown})"


@pytest.mark.parametrize("duration", ["24", "1 h", "h", "-1h", "1w"])
def test_bad_durations(duration: str) -> None:
    error = error_at(
        mesh(f"certificates: {{validity: '{duration}'}}"), "spec.certificates.validity"
    )
    assert error.reason.startswith("must be a duration such as")


def test_duration_must_be_a_string() -> None:
    error = error_at(mesh("certificates: {validity: 24}"), "spec.certificates.validity")
    assert error.reason == "must be a duration string such as '24h' (got integer 24)"


def test_bad_key_type_lists_the_supported_ones() -> None:
    error = error_at(mesh("ca: {builtin: {keyType: RSA_1024}}"), "spec.ca.builtin.keyType")
    assert error.reason == "must be one of ECDSA_P256, RSA_2048, RSA_3072 (got 'RSA_1024')"


def test_provided_ca_needs_its_settings() -> None:
    assert (
        error_at(mesh("ca: {backend: provided}"), "spec.ca.provided").reason
        == "required when backend is provided"
    )


def test_provided_ca_cert_and_key_sources() -> None:
    exc = rejection(mesh("ca: {backend: provided, provided: {certFile: /ca.pem, certPem: x}}"))
    assert exc.errors == [
        FieldError("spec.ca.provided.certPem", "only one of certFile or certPem may be set"),
        FieldError("spec.ca.provided", "one of keyFile or keyPem is required"),
        FieldError(
            "spec.ca.provided.certPem", "must be a PEM certificate (-----BEGIN CERTIFICATE-----)"
        ),
    ]


def test_provided_ca_from_files() -> None:
    resource = load_one(
        mesh("ca: {backend: provided, provided: {certFile: /etc/ca.pem, keyFile: /etc/ca.key}}")
    )
    assert isinstance(resource, Mesh) and resource.spec.ca.provided is not None
    assert resource.spec.ca.provided.key_file == "/etc/ca.key"


def test_ext_authz_providers() -> None:
    resource = load_one(
        mesh(
            """
            authorization:
              providers:
              - name: grpc-authz
                envoyExtAuthzGrpc:
                  service: authz.verity-system.svc.cluster.local
                  port: 9000
                  timeout: 1s
              - name: http-authz
                envoyExtAuthzHttp:
                  service: foo/authz.example.com
                  port: 8000
                  pathPrefix: /check
                  includeRequestHeadersInCheck: [authorization, x-*]
                  headersToUpstreamOnAllow: [x-user]
                  headersToDownstreamOnDeny: [content-type, set-cookie]
                  failOpen: false
                  statusOnError: "503"
            """
        )
    )
    assert isinstance(resource, Mesh)
    http = resource.spec.authorization.provider("http-authz")
    assert http is not None and http.envoy_ext_authz_http is not None
    assert http.envoy_ext_authz_http.path_prefix == "/check"


def test_bad_ext_authz_providers() -> None:
    exc = rejection(
        mesh(
            """
            authorization:
              providers:
              - {name: a, envoyExtAuthzGrpc: {service: x.y, port: 0}}
              - {name: b}
              - {name: c, envoyExtAuthzHttp: {service: 'bad host!', port: 80, pathPrefix: check}}
            """
        )
    )
    assert {e.path for e in exc.errors} == {
        "spec.authorization.providers[0].envoyExtAuthzGrpc.port",
        "spec.authorization.providers[1]",
        "spec.authorization.providers[2].envoyExtAuthzHttp.service",
        "spec.authorization.providers[2].envoyExtAuthzHttp.pathPrefix",
    }


def test_duplicate_provider_names() -> None:
    grpc = "envoyExtAuthzGrpc: {service: a.b, port: 1}"
    text = mesh(f"authorization:\n  providers:\n  - {{name: a, {grpc}}}\n  - {{name: a, {grpc}}}")
    assert (
        error_at(text, "spec.authorization.providers[1].name").reason
        == "duplicate provider name 'a'"
    )


def test_tls_versions_and_ciphers() -> None:
    exc = rejection(
        mesh(
            "tls: {minVersion: TLSv1_3, maxVersion: TLSv1_2,"
            " cipherSuites: [RC4-SHA, TLS_AES_128_GCM_SHA256]}"
        )
    )
    assert {e.path for e in exc.errors} == {
        "spec.tls.minVersion",
        "spec.tls.cipherSuites[0]",
        "spec.tls.cipherSuites[1]",
        "spec.tls.cipherSuites",
    }


def test_old_tls_versions_are_refused() -> None:
    error = error_at(mesh("tls: {minVersion: TLSv1_0}"), "spec.tls.minVersion")
    assert error.reason == "must be one of TLSv1_2, TLSv1_3 (got 'TLSv1_0')"


def test_modern_cipher_suites_are_accepted() -> None:
    load_one(
        mesh("tls: {cipherSuites: [ECDHE-ECDSA-AES128-GCM-SHA256, ECDHE-RSA-CHACHA20-POLY1305]}")
    )


def test_mesh_root_namespace_must_be_a_label() -> None:
    assert error_at(mesh("rootNamespace: Verity_System"), "spec.rootNamespace")


# --- Dataplane -----------------------------------------------------------------------------


def test_dataplane_defaults_and_helpers() -> None:
    resource = load_one(
        dataplane(BASE_DP + "outbound:\n- {service: db, port: 5432, localPort: 15432}")
    )
    assert isinstance(resource, Dataplane)
    spec = resource.spec
    assert (spec.mesh, spec.service_account) == ("default", "default")
    assert spec.inbound[0].target_port == 3000
    assert resource.outbound_namespace(spec.outbound[0]) == "shop"
    assert resource.spiffe_id("cluster.local") == "spiffe://cluster.local/ns/shop/sa/default"
    assert not spec.transparent_proxy.enabled
    assert (
        spec.transparent_proxy.redirect_port_inbound,
        spec.transparent_proxy.redirect_port_outbound,
    ) == (
        15006,
        15001,
    )
    assert "serviceAccount" not in resource.to_document()["spec"]


def test_dataplane_needs_service_and_address() -> None:
    exc = rejection(dataplane("inbound: []"))
    assert exc.errors == [
        FieldError("spec.service", "required field is missing"),
        FieldError("spec.address", "required field is missing"),
    ]


def test_duplicate_inbound_port() -> None:
    text = dataplane(BASE_DP + "- {port: 8080, protocol: grpc}")
    assert error_at(text, "spec.inbound[1].port").reason == "duplicate inbound port 8080"


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_port_range(port: int) -> None:
    error = error_at(dataplane(BASE_DP.replace("8080", str(port))), "spec.inbound[0].port")
    assert error.reason == f"must be a port number between 1 and 65535 (got {port})"


def test_port_must_be_a_number() -> None:
    error = error_at(dataplane(BASE_DP.replace("8080", "'8080'")), "spec.inbound[0].port")
    assert error.reason == "must be an integer (got '8080')"


def test_bad_protocol() -> None:
    error = error_at(dataplane(BASE_DP.replace("http}", "https}")), "spec.inbound[0].protocol")
    assert error.reason == "must be one of http, http2, grpc, tcp (got 'https')"


@pytest.mark.parametrize("address", ["10.0.0.256", "bad_host", "-x.example"])
def test_bad_address(address: str) -> None:
    assert (
        "IPv4 or IPv6"
        in error_at(dataplane(BASE_DP.replace("10.0.0.5", address)), "spec.address").reason
    )


@pytest.mark.parametrize("address", ["fd00::5", "web-1.shop.internal", "192.168.0.1"])
def test_good_address(address: str) -> None:
    load_one(dataplane(BASE_DP.replace("10.0.0.5", f"'{address}'")))


def test_outbound_ports() -> None:
    exc = rejection(
        dataplane(
            BASE_DP + "outbound:\n"
            "- {service: a, port: 80, localPort: 10001}\n"
            "- {service: b, port: 80, localPort: 10001}\n"
            "- {service: c, port: 80}\n"
            "- {service: d, port: 80, localPort: 8080}\n"
            "- {service: a, port: 80, localPort: 10009}\n"
        )
    )
    assert {e.path: e.reason for e in exc.errors} == {
        "spec.outbound[1].localPort": "duplicate localPort 10001",
        "spec.outbound[2].localPort": "required unless transparentProxy.enabled is true",
        "spec.outbound[3].localPort": "8080 is also an inbound port",
        "spec.outbound[4]": "duplicate outbound (same service, namespace and port)",
    }


def test_transparent_proxy_needs_no_local_ports() -> None:
    resource = load_one(
        dataplane(
            BASE_DP + "outbound:\n- {service: a, port: 80}\ntransparentProxy: {enabled: true}"
        )
    )
    assert isinstance(resource, Dataplane) and resource.spec.transparent_proxy.enabled


def test_transparent_proxy_ports_must_not_collide() -> None:
    text = dataplane(
        BASE_DP.replace("8080", "15006")
        + "transparentProxy: {enabled: true, redirectPortOutbound: 15006}"
    )
    exc = rejection(text)
    assert {e.path for e in exc.errors} == {
        "spec.transparentProxy.redirectPortOutbound",
        "spec.transparentProxy.redirectPortInbound",
    }


def test_transparent_proxy_enabled_must_be_boolean() -> None:
    error = error_at(
        dataplane(BASE_DP + "transparentProxy: {enabled: 'yes'}"), "spec.transparentProxy.enabled"
    )
    assert error.reason == "must be true or false (got 'yes')"


def test_workload_labels_are_validated() -> None:
    assert error_at(dataplane(BASE_DP + "labels: {app: 'a b'}"), "spec.labels.app")


def test_service_must_be_a_dns_label() -> None:
    assert (
        "DNS-1123 label"
        in error_at(dataplane(BASE_DP.replace("web", "Web_1")), "spec.service").reason
    )
