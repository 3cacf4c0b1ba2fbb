from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from verity.dataplane.bootstrap import (
    ADMIN_ADDRESS,
    XDS_CLUSTER,
    BootstrapParams,
    ControlPlaneEndpoint,
    render_bootstrap,
    write_bootstrap,
)
from verity.dataplane.sds import BUNDLE_SECRET, CERT_SECRET, SDS_CLUSTER

TOKEN = "vrtd_0123456789abcdefghijKLMN"
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
SOCKET = Path("/run/verity/sds/sds.sock")


def params(**overrides: Any) -> BootstrapParams:
    fields: dict[str, Any] = {
        "namespace": "shop",
        "dataplane": "web-1",
        "service": "web",
        "service_account": "web-sa",
        "sds_socket": SOCKET,
        "admin_port": 19901,
        "control_plane": ControlPlaneEndpoint(
            host="cp.verity.svc", port=5678, token=TOKEN, ca_pem=CA_PEM
        ),
    }
    fields.update(overrides)
    return BootstrapParams(**fields)


def cluster(bootstrap: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        c for c in bootstrap["static_resources"]["clusters"] if c["name"] == name
    ]
    assert len(found) == 1
    return found[0]


def test_node_identity_and_metadata() -> None:
    node = render_bootstrap(params())["node"]
    assert node["id"] == "shop/web-1"
    assert node["cluster"] == "web"
    metadata = node["metadata"]
    assert metadata["verity.namespace"] == "shop"
    assert metadata["verity.dataplane"] == "web-1"
    assert metadata["verity.service"] == "web"
    assert metadata["verity.service_account"] == "web-sa"
    assert metadata["verity.mesh"] == "default"
    assert metadata["verity.sds"] == {
        "cluster": SDS_CLUSTER,
        "certificate": CERT_SECRET,
        "trust_bundle": BUNDLE_SECRET,
    }


def test_extra_metadata_cannot_override_identity() -> None:
    metadata = render_bootstrap(params(metadata={"verity.namespace": "evil", "zone": "a"}))
    assert metadata["node"]["metadata"]["verity.namespace"] == "shop"
    assert metadata["node"]["metadata"]["zone"] == "a"


def test_admin_is_loopback_only() -> None:
    admin = render_bootstrap(params())["admin"]
    assert admin["address"]["socket_address"] == {"address": ADMIN_ADDRESS, "port_value": 19901}
    assert ADMIN_ADDRESS == "127.0.0.1"


def test_ads_over_grpc_v3_with_bearer_token() -> None:
    dynamic = render_bootstrap(params())["dynamic_resources"]
    ads = dynamic["ads_config"]
    assert ads["api_type"] == "GRPC"
    assert ads["transport_api_version"] == "V3"
    [service] = ads["grpc_services"]
    assert service["envoy_grpc"] == {"cluster_name": XDS_CLUSTER}
    assert service["initial_metadata"] == [{"key": "authorization", "value": f"Bearer {TOKEN}"}]
    for kind in ("lds_config", "cds_config"):
        assert dynamic[kind] == {"ads": {}, "resource_api_version": "V3"}


def test_token_appears_only_in_the_ads_metadata() -> None:
    text = json.dumps(render_bootstrap(params()))
    assert text.count(TOKEN) == 1


def test_initial_fetch_timeout() -> None:
    dynamic = render_bootstrap(params(initial_fetch_timeout_s=2.5))["dynamic_resources"]
    assert dynamic["lds_config"]["initial_fetch_timeout"] == "2.500s"


def test_xds_cluster_is_http2_tls_with_san_check() -> None:
    xds = cluster(render_bootstrap(params()), XDS_CLUSTER)
    assert xds["type"] == "STRICT_DNS"
    endpoint = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {
        "address": "cp.verity.svc",
        "port_value": 5678,
    }
    [options] = xds["typed_extension_protocol_options"].values()
    assert "http2_protocol_options" in options["explicit_http_config"]
    tls = xds["transport_socket"]["typed_config"]
    assert tls["@type"].endswith("UpstreamTlsContext")
    assert tls["sni"] == "cp.verity.svc"
    common = tls["common_tls_context"]
    assert common["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_2"
    assert common["tls_params"]["tls_maximum_protocol_version"] == "TLSv1_3"
    validation = common["validation_context"]
    assert validation["trusted_ca"] == {"inline_string": CA_PEM}
    assert validation["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "cp.verity.svc"}}
    ]


def test_xds_cluster_to_an_ip_with_a_ca_file() -> None:
    cp = ControlPlaneEndpoint(host="10.0.0.7", token=TOKEN, ca_file=Path("/etc/verity/ca.pem"))
    xds = cluster(render_bootstrap(params(control_plane=cp)), XDS_CLUSTER)
    assert xds["type"] == "STATIC"
    tls = xds["transport_socket"]["typed_config"]
    assert "sni" not in tls  # SNI cannot carry an IP address
    validation = tls["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"] == {"filename": "/etc/verity/ca.pem"}
    assert validation["match_typed_subject_alt_names"][0]["san_type"] == "IP_ADDRESS"


def test_connect_address_differs_from_the_certificate_name() -> None:
    cp = ControlPlaneEndpoint(host="cp.verity.svc", address="127.0.0.1", token=TOKEN, ca_pem=CA_PEM)
    xds = cluster(render_bootstrap(params(control_plane=cp)), XDS_CLUSTER)
    endpoint = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"]["address"] == "127.0.0.1"
    assert xds["transport_socket"]["typed_config"]["sni"] == "cp.verity.svc"


def test_sds_cluster_is_http2_over_the_unix_socket() -> None:
    sds = cluster(render_bootstrap(params()), SDS_CLUSTER)
    endpoint = sds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"] == {"pipe": {"path": str(SOCKET)}}
    [options] = sds["typed_extension_protocol_options"].values()
    assert "http2_protocol_options" in options["explicit_http_config"]
    assert "transport_socket" not in sds


def test_static_only_without_a_control_plane() -> None:
    bootstrap = render_bootstrap(params(control_plane=None))
    assert "dynamic_resources" not in bootstrap
    names = [c["name"] for c in bootstrap["static_resources"]["clusters"]]
    assert names == [SDS_CLUSTER]


def test_overload_and_runtime() -> None:
    bootstrap = render_bootstrap(params(max_downstream_connections=500))
    [monitor] = bootstrap["overload_manager"]["resource_monitors"]
    assert monitor["name"] == "envoy.resource_monitors.global_downstream_max_connections"
    assert monitor["typed_config"]["max_active_downstream_connections"] == 500
    assert bootstrap["admin"]["ignore_global_conn_limit"] is True
    layers = bootstrap["layered_runtime"]["layers"]
    assert all("admin_layer" not in layer for layer in layers)


def test_heap_limit_adds_overload_actions() -> None:
    overload = render_bootstrap(params(max_heap_bytes=256 * 2**20))["overload_manager"]
    assert len(overload["resource_monitors"]) == 2
    actions = {a["name"] for a in overload["actions"]}
    assert "envoy.overload_actions.stop_accepting_requests" in actions


def test_render_is_pure_and_json_able() -> None:
    assert render_bootstrap(params()) == render_bootstrap(params())
    json.dumps(render_bootstrap(params()))


def test_write_bootstrap_is_0600(tmp_path: Path) -> None:
    path = tmp_path / "envoy.json"
    written = write_bootstrap(path, params())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == written


def test_reprs_hide_the_token() -> None:
    assert TOKEN not in repr(params())
    assert "BEGIN CERTIFICATE" not in repr(params())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"namespace": "a/b"}, "namespace"),
        ({"dataplane": ""}, "dataplane"),
        ({"admin_port": 70000}, "admin_port"),
        ({"sds_socket": Path("relative.sock")}, "sds_socket"),
        ({"max_heap_bytes": 1024}, "max_heap_bytes"),
    ],
)
def test_bad_params_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        params(**overrides)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"token": "a\r\nx-evil: 1", "ca_pem": CA_PEM}, "token"),
        ({"token": "", "ca_pem": CA_PEM}, "token"),
        ({"token": TOKEN}, "exactly one"),
        ({"token": TOKEN, "ca_pem": CA_PEM, "ca_file": Path("/x")}, "exactly one"),
        ({"token": TOKEN, "ca_pem": "not a pem"}, "PEM"),
        ({"token": TOKEN, "ca_pem": CA_PEM, "port": 0}, "port"),
    ],
)
def test_bad_control_plane_is_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ControlPlaneEndpoint(host="cp", **fields)
