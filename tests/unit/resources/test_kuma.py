"""Kuma's Mesh and TrafficPermission: both forms, stored as written, Verity's meaning."""

from __future__ import annotations

import base64
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from verity.resources import FieldError, KumaMesh, TrafficPermission, load_documents

from .helpers import error_at, load_one, rejection


def k8s_mesh(spec: str, name: str = "marketplace") -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    return f"apiVersion: kuma.io/v1alpha1\nkind: Mesh\nmetadata:\n  name: {name}\nspec:\n{body}\n"


BUILTIN = """
mtls:
  enabledBackend: ca-1
  backends:
  - name: ca-1
    type: builtin
    dpCert:
      rotation:
        expiration: 1d
    conf:
      caCert:
        RSAbits: 2048
        expiration: 10y
"""


def kuma_mesh(text: str) -> KumaMesh:
    resource = load_one(text)
    assert isinstance(resource, KumaMesh)
    return resource


UNIVERSAL_MESH = "type: Mesh\nname: marketplace-vm\n" + textwrap.dedent(BUILTIN).lstrip("\n")

K8S_TP = """
apiVersion: kuma.io/v1alpha1
kind: TrafficPermission
mesh: marketplace
metadata:
  name: invoices-to-items
spec:
  sources:
  - match:
      kuma.io/service: invoices
  destinations:
  - match:
      kuma.io/service: items
  - match:
      kuma.io/service: users
"""

UNIVERSAL_TP = """
type: TrafficPermission
name: allow-all
mesh: marketplace-vm
sources:
- match:
    kuma.io/service: '*'
destinations:
- match:
    kuma.io/service: '*'
"""


# --- Mesh ----------------------------------------------------------------------------------


def test_builtin_mtls_means_a_strict_verity_mesh() -> None:
    resource = load_one(k8s_mesh(BUILTIN))
    assert isinstance(resource, KumaMesh)
    assert resource.key() == ("Mesh", "", "marketplace")
    assert resource.api_version == "kuma.io/v1alpha1" and resource.form == "kubernetes"
    verity = resource.as_verity_mesh()
    assert verity.mtls.mode == "STRICT"
    assert verity.authorization.default_action == "DENY"
    assert verity.ca.backend == "builtin" and verity.ca.builtin_settings.key_type == "RSA_2048"
    assert verity.certificates.validity == timedelta(days=1)
    assert verity.certificates.effective_renew_before == timedelta(hours=8)
    assert verity.trust_domain == "cluster.local"


def test_universal_mesh_means_the_same_and_stays_universal() -> None:
    resource = load_one(UNIVERSAL_MESH)
    assert isinstance(resource, KumaMesh)
    assert resource.form == "universal"
    assert resource.key() == ("Mesh", "", "marketplace-vm")
    assert resource.as_verity_mesh() == kuma_mesh(k8s_mesh(BUILTIN)).as_verity_mesh()
    document = resource.to_document()
    assert document["type"] == "Mesh" and "apiVersion" not in document and "spec" not in document


def test_mesh_without_enabled_backend_has_mtls_off_and_allows() -> None:
    resource = load_one(k8s_mesh("mtls:\n  backends:\n  - {name: ca-1, type: builtin}"))
    assert isinstance(resource, KumaMesh)
    verity = resource.as_verity_mesh()
    assert (verity.mtls.mode, verity.authorization.default_action) == ("DISABLE", "ALLOW")


def test_empty_kuma_mesh() -> None:
    resource = load_one(k8s_mesh("{}"))
    assert isinstance(resource, KumaMesh) and resource.as_verity_mesh().mtls.mode == "DISABLE"


def test_permissive_backend_and_default_key_size() -> None:
    resource = load_one(
        k8s_mesh(
            "mtls:\n  enabledBackend: ca-1\n"
            "  backends:\n  - {name: ca-1, type: builtin, mode: PERMISSIVE}"
        )
    )
    assert isinstance(resource, KumaMesh)
    verity = resource.as_verity_mesh()
    assert verity.mtls.mode == "PERMISSIVE"
    assert verity.ca.builtin_settings.key_type == "RSA_2048"
    assert verity.certificates.validity == timedelta(hours=24)


def test_rsa_3072_root() -> None:
    resource = load_one(k8s_mesh(BUILTIN.replace("2048", "3072")))
    assert isinstance(resource, KumaMesh)
    assert resource.as_verity_mesh().ca.builtin_settings.key_type == "RSA_3072"


def test_unsupported_rsa_size() -> None:
    error = error_at(
        k8s_mesh(BUILTIN.replace("2048", "4096")), "spec.mtls.backends[0].conf.caCert.RSAbits"
    )
    assert error.reason == "Verity's builtin CA supports 2048 or 3072 (got 4096)"


def test_passthrough_off_means_egress_denied() -> None:
    resource = load_one(k8s_mesh(BUILTIN + "networking:\n  outbound:\n    passthrough: false"))
    assert isinstance(resource, KumaMesh)
    assert resource.as_verity_mesh().egress.default_action == "DENY"
    assert kuma_mesh(k8s_mesh(BUILTIN)).as_verity_mesh().egress.default_action == "ALLOW"


def test_provided_ca_from_files_and_inline() -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    inline = base64.b64encode(pem.encode()).decode()
    spec = f"""
    mtls:
      enabledBackend: ca-2
      backends:
      - name: ca-2
        type: provided
        conf:
          cert: {{inline: {inline}}}
          key: {{file: /etc/kuma/ca.key}}
    """
    resource = load_one(k8s_mesh(spec))
    assert isinstance(resource, KumaMesh)
    provided = resource.as_verity_mesh().ca.provided
    assert provided is not None
    assert (provided.cert_pem, provided.key_file) == (pem, "/etc/kuma/ca.key")


def test_provided_ca_with_kuma_secrets_is_refused() -> None:
    spec = (
        "mtls:\n  enabledBackend: a\n  backends:\n"
        "  - {name: a, type: provided, conf: {cert: {secret: s}, key: {secret: k}}}"
    )
    exc = rejection(k8s_mesh(spec))
    assert [e.path for e in exc.errors] == [
        "spec.mtls.backends[0].conf.cert.secret",
        "spec.mtls.backends[0].conf.key.secret",
    ]
    assert "Kuma secrets are not supported by Verity" in exc.errors[0].reason


def test_provided_backend_needs_conf() -> None:
    spec = "mtls:\n  backends:\n  - {name: a, type: provided}"
    assert error_at(k8s_mesh(spec), "spec.mtls.backends[0].conf").reason.startswith("required")


def test_enabled_backend_must_exist() -> None:
    error = error_at(
        k8s_mesh(BUILTIN.replace("enabledBackend: ca-1", "enabledBackend: ca-9")),
        "spec.mtls.enabledBackend",
    )
    assert error.reason == "must name one of the backends (ca-1) (got 'ca-9')"


def test_unknown_backend_type() -> None:
    error = error_at(
        k8s_mesh(BUILTIN.replace("type: builtin", "type: vault")), "spec.mtls.backends[0].type"
    )
    assert error.reason == "must be one of builtin, provided (got 'vault')"


def test_unsupported_kuma_features_are_refused_not_ignored() -> None:
    exc = rejection(k8s_mesh(BUILTIN + "tracing: {defaultBackend: z}\nmetrics: {}"))
    assert exc.errors == [
        FieldError("spec.tracing", "this Kuma Mesh field is not supported by Verity"),
        FieldError("spec.metrics", "this Kuma Mesh field is not supported by Verity"),
    ]


def test_expiration_within_verity_bounds() -> None:
    error = error_at(
        k8s_mesh(BUILTIN.replace("expiration: 1d", "expiration: 1y")),
        "spec.mtls.backends[0].dpCert.rotation.expiration",
    )
    assert "between 10m and 90d" in error.reason


def test_kuma_mesh_is_cluster_scoped() -> None:
    text = k8s_mesh(BUILTIN).replace(
        "name: marketplace", "name: marketplace\n  namespace: kuma-system"
    )
    assert (
        error_at(text, "metadata.namespace").reason
        == "Mesh is cluster-scoped: metadata.namespace must not be set"
    )


def test_universal_mesh_errors_are_at_the_top_level() -> None:
    exc = rejection(UNIVERSAL_MESH.replace("type: builtin", "type: nope") + "bogus: 1\n")
    assert exc.subject == "Mesh marketplace-vm"
    assert {e.path for e in exc.errors} == {"mtls.backends[0].type", "bogus"}


# --- TrafficPermission ---------------------------------------------------------------------


def test_kubernetes_traffic_permission() -> None:
    resource = load_one(K8S_TP)
    assert isinstance(resource, TrafficPermission)
    assert resource.key() == ("TrafficPermission", "", "invoices-to-items")
    assert resource.mesh == "marketplace" and resource.form == "kubernetes"
    assert resource.allowed_services() == (["invoices"], ["items", "users"])
    assert resource.to_document()["mesh"] == "marketplace"


def test_traffic_permission_mesh_defaults_to_default() -> None:
    resource = load_one(K8S_TP.replace("mesh: marketplace\n", ""))
    assert isinstance(resource, TrafficPermission) and resource.mesh == "default"
    assert "mesh" not in resource.to_document()


def test_universal_traffic_permission() -> None:
    resource = load_one(UNIVERSAL_TP)
    assert isinstance(resource, TrafficPermission)
    assert resource.form == "universal" and resource.mesh == "marketplace-vm"
    assert resource.allowed_services() == (["*"], ["*"])
    assert resource.to_document() == {
        "type": "TrafficPermission",
        "name": "allow-all",
        "mesh": "marketplace-vm",
        "sources": [{"match": {"kuma.io/service": "*"}}],
        "destinations": [{"match": {"kuma.io/service": "*"}}],
    }


def test_seed_policy_in_both_forms() -> None:
    """invoices and users may call each other; only invoices may call items."""
    root = Path(__file__).resolve().parents[3] / "examples" / "kuma"
    for form in ("kubernetes", "universal"):
        allowed: set[tuple[str, str]] = set()
        for resource in load_documents((root / form / "traffic-permissions.yaml").read_text()):
            assert isinstance(resource, TrafficPermission)
            sources, destinations = resource.allowed_services()
            allowed |= {(s, d) for s in sources for d in destinations}
        assert allowed == {("invoices", "users"), ("invoices", "items"), ("users", "invoices")}


def test_match_needs_the_service_tag() -> None:
    error = error_at(
        K8S_TP.replace("kuma.io/service: invoices", "version: v1"), "spec.sources[0].match"
    )
    assert error.reason == "must have the kuma.io/service tag"


def test_other_tags_are_refused() -> None:
    text = K8S_TP.replace(
        "kuma.io/service: invoices", "kuma.io/service: invoices\n      version: v1"
    )
    assert (
        error_at(text, "spec.sources[0].match.version").reason
        == "only the kuma.io/service tag is supported by Verity"
    )


@pytest.mark.parametrize("service", ["Invoices", "backend_kuma-demo_svc_3001", "''"])
def test_service_names_are_verity_service_names(service: str) -> None:
    error = error_at(
        K8S_TP.replace("kuma.io/service: items", f"kuma.io/service: {service}"),
        "spec.destinations[0].match[kuma.io/service]",
    )
    assert error.reason.startswith("must be '*' or a Verity service name")


def test_sources_and_destinations_are_required() -> None:
    exc = rejection(
        UNIVERSAL_TP.replace("sources:\n- match:\n    kuma.io/service: '*'\n", "sources: []\n")
    )
    assert exc.errors == [FieldError("sources", "must have at least one selector")]
    exc = rejection("type: TrafficPermission\nname: a\n")
    assert exc.errors == [
        FieldError("sources", "required field is missing"),
        FieldError("destinations", "required field is missing"),
    ]


def test_unknown_universal_type() -> None:
    exc = rejection("type: TrafficRoute\nname: a\n")
    assert exc.subject == "document 1"
    assert exc.errors[0].path == "type"
    assert "supported (Kuma universal form): Mesh, TrafficPermission" in exc.errors[0].reason


def test_universal_name_is_required_and_checked() -> None:
    exc = rejection(UNIVERSAL_TP.replace("name: allow-all\n", ""))
    assert exc.subject == "document 1"
    assert FieldError("name", "required field is missing") in exc.errors
    assert error_at(UNIVERSAL_TP.replace("allow-all", "Allow_All"), "name")


def test_bad_mesh_reference() -> None:
    assert error_at(K8S_TP.replace("mesh: marketplace", "mesh: Market_Place"), "mesh")


def test_provided_inline_must_be_pem() -> None:
    not_pem = base64.b64encode(b"hello").decode()
    spec = (
        "mtls:\n  enabledBackend: a\n  backends:\n"
        f"  - {{name: a, type: provided, conf: {{cert: {{inline: {not_pem}}},"
        " key: {inlineString: k}}}"
    )
    exc = rejection(k8s_mesh(spec))
    assert exc.errors == [
        FieldError("spec.mtls.backends[0].conf.cert.inline", "must hold a PEM certificate"),
        FieldError("spec.mtls.backends[0].conf.key.inlineString", "must hold a PEM private key"),
    ]
