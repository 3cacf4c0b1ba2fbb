"""Envoy's bootstrap for a Verity sidecar: who it is, where its config and its secrets come from.

`render_bootstrap` is pure: parameters in, a JSON-able Envoy v3 bootstrap out. Everything else
Envoy runs (listeners, clusters, policies) arrives over ADS from the control plane; the
certificate and trust bundle arrive over SDS from the agent's local socket. The bootstrap holds
the dataplane token, so `write_bootstrap` writes it 0600.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from verity.dataplane.keys import write_private_file
from verity.dataplane.sds import BUNDLE_SECRET, CERT_SECRET, SDS_CLUSTER

XDS_CLUSTER = "verity-xds"
"""The static cluster that reaches the control plane's ADS server (gRPC over TLS)."""

ADMIN_ADDRESS = "127.0.0.1"
"""Envoy's admin interface listens on loopback only: it can stop Envoy and dump its config."""

DEFAULT_ADMIN_PORT = 9901
DEFAULT_CONTROL_PLANE_PORT = 5678

_HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_TYPE = "type.googleapis.com/"
# AEAD suites with forward secrecy only; TLS 1.3 suites are not configurable in BoringSSL.
TLS12_CIPHER_SUITES = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
)


@dataclass(frozen=True, kw_only=True)
class ControlPlaneEndpoint:
    """How Envoy reaches and authenticates the control plane's ADS server.

    `host` is the name the control plane's certificate carries (SNI and SAN match; an IP
    literal is matched as an IP SAN). `address` is where to connect when that differs from
    `host`. Exactly one of `ca_pem` / `ca_file` holds the CA that signed the serving cert.
    """

    host: str
    token: str = field(repr=False)
    port: int = DEFAULT_CONTROL_PLANE_PORT
    address: str | None = None
    ca_pem: str | None = field(default=None, repr=False)
    ca_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.host or any(c.isspace() for c in self.host):
            raise ValueError("control plane host: must be a non-empty name without spaces")
        _check_port("control plane port", self.port)
        if (self.ca_pem is None) == (self.ca_file is None):
            raise ValueError("control plane CA: give exactly one of ca_pem or ca_file")
        if self.ca_pem is not None and "-----BEGIN CERTIFICATE-----" not in self.ca_pem:
            raise ValueError("control plane CA: ca_pem holds no PEM certificate")
        if not self.token or any(c in self.token for c in "\r\n\0 "):
            # The token goes into a gRPC header: refuse anything that could split it.
            raise ValueError("dataplane token: must be non-empty, without spaces or newlines")

    @property
    def connect_address(self) -> str:
        return self.address or self.host


@dataclass(frozen=True, kw_only=True)
class BootstrapParams:
    """Everything the bootstrap depends on. `control_plane=None` renders a static-only bootstrap
    (no ADS), for running Envoy before enrolment or in tests."""

    namespace: str
    dataplane: str
    service: str
    sds_socket: Path
    control_plane: ControlPlaneEndpoint | None
    mesh: str = "default"
    service_account: str | None = None
    admin_port: int = DEFAULT_ADMIN_PORT
    max_downstream_connections: int = 10_000
    max_heap_bytes: int | None = None
    initial_fetch_timeout_s: float | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for label, value in (
            ("namespace", self.namespace),
            ("dataplane", self.dataplane),
            ("service", self.service),
            ("mesh", self.mesh),
        ):
            if not value or "/" in value or any(c.isspace() for c in value):
                raise ValueError(f"{label}: must be non-empty, without '/' or spaces")
        if not Path(self.sds_socket).is_absolute():
            raise ValueError("sds_socket: must be an absolute path")
        _check_port("admin_port", self.admin_port)
        if self.max_downstream_connections < 1:
            raise ValueError("max_downstream_connections: must be at least 1")
        if self.max_heap_bytes is not None and self.max_heap_bytes < 64 * 2**20:
            raise ValueError("max_heap_bytes: below 64 MiB Envoy cannot start")

    @property
    def node_id(self) -> str:
        return f"{self.namespace}/{self.dataplane}"


def _check_port(label: str, port: int) -> None:
    if not 0 < port < 65536:
        raise ValueError(f"{label}: {port} is not a TCP port")


def render_bootstrap(params: BootstrapParams) -> dict[str, Any]:
    """The Envoy v3 bootstrap for `params`, as a JSON-able dict."""
    clusters = [_sds_cluster(params.sds_socket)]
    bootstrap: dict[str, Any] = {
        "node": _node(params),
        "admin": _admin(params.admin_port),
        "static_resources": {"clusters": clusters},
        "layered_runtime": _layered_runtime(),
        "overload_manager": _overload_manager(params),
    }
    if params.control_plane is not None:
        clusters.insert(0, _xds_cluster(params.control_plane))
        bootstrap["dynamic_resources"] = _dynamic_resources(params)
    return bootstrap


def write_bootstrap(path: Path, params: BootstrapParams) -> dict[str, Any]:
    """Render and write the bootstrap as JSON to `path` (0600: it holds the token)."""
    bootstrap = render_bootstrap(params)
    write_private_file(Path(path), json.dumps(bootstrap, indent=2).encode())
    return bootstrap


def _node(params: BootstrapParams) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        **params.metadata,
        "verity.mesh": params.mesh,
        "verity.namespace": params.namespace,
        "verity.dataplane": params.dataplane,
        "verity.service": params.service,
        # Where translate() must point a listener's or cluster's SDS config.
        "verity.sds": {
            "cluster": SDS_CLUSTER,
            "certificate": CERT_SECRET,
            "trust_bundle": BUNDLE_SECRET,
        },
        "verity.admin_port": params.admin_port,
    }
    if params.service_account is not None:
        metadata["verity.service_account"] = params.service_account
    return {"id": params.node_id, "cluster": params.service, "metadata": metadata}


def _admin(port: int) -> dict[str, Any]:
    return {
        "address": {"socket_address": {"address": ADMIN_ADDRESS, "port_value": port}},
        # Readiness probes and the agent must reach admin even when connections are capped.
        "ignore_global_conn_limit": True,
    }


def _dynamic_resources(params: BootstrapParams) -> dict[str, Any]:
    assert params.control_plane is not None
    ads = {"ads": {}, "resource_api_version": "V3"}
    if params.initial_fetch_timeout_s is not None:
        ads["initial_fetch_timeout"] = _duration(params.initial_fetch_timeout_s)
    return {
        "ads_config": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "set_node_on_first_message_only": True,
            "grpc_services": [
                {
                    "envoy_grpc": {"cluster_name": XDS_CLUSTER},
                    "initial_metadata": [
                        {
                            "key": "authorization",
                            "value": f"Bearer {params.control_plane.token}",
                        }
                    ],
                }
            ],
        },
        "lds_config": dict(ads),
        "cds_config": dict(ads),
    }


def _xds_cluster(cp: ControlPlaneEndpoint) -> dict[str, Any]:
    return {
        "name": XDS_CLUSTER,
        "type": "STATIC" if _is_ip(cp.connect_address) else "STRICT_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "5s",
        "load_assignment": _single_endpoint(
            XDS_CLUSTER, {"socket_address": {"address": cp.connect_address, "port_value": cp.port}}
        ),
        "typed_extension_protocol_options": _http2_options(keepalive=True),
        # Notice a dead control-plane connection without waiting for the kernel's timeout.
        "upstream_connection_options": {
            "tcp_keepalive": {"keepalive_time": 60, "keepalive_interval": 10, "keepalive_probes": 3}
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": _upstream_tls(cp),
        },
    }


def _upstream_tls(cp: ControlPlaneEndpoint) -> dict[str, Any]:
    trusted_ca = (
        {"inline_string": cp.ca_pem} if cp.ca_pem is not None else {"filename": str(cp.ca_file)}
    )
    san_type = "IP_ADDRESS" if _is_ip(cp.host) else "DNS"
    context: dict[str, Any] = {
        "@type": _TYPE + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {
            # Envoy's client default maximum is TLS 1.2: 1.3 must be asked for.
            "tls_params": {
                "tls_minimum_protocol_version": "TLSv1_2",
                "tls_maximum_protocol_version": "TLSv1_3",
                "cipher_suites": list(TLS12_CIPHER_SUITES),
            },
            "alpn_protocols": ["h2"],
            "validation_context": {
                "trusted_ca": trusted_ca,
                "match_typed_subject_alt_names": [
                    {"san_type": san_type, "matcher": {"exact": cp.host}}
                ],
            },
        },
    }
    if san_type == "DNS":
        context["sni"] = cp.host  # SNI cannot carry an IP address
    return context


def _sds_cluster(socket_path: Path) -> dict[str, Any]:
    return {
        "name": SDS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": _single_endpoint(SDS_CLUSTER, {"pipe": {"path": str(socket_path)}}),
        "typed_extension_protocol_options": _http2_options(keepalive=False),
    }


def _single_endpoint(cluster: str, address: dict[str, Any]) -> dict[str, Any]:
    return {
        "cluster_name": cluster,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
    }


def _http2_options(*, keepalive: bool) -> dict[str, Any]:
    http2: dict[str, Any] = {}
    if keepalive:
        http2["connection_keepalive"] = {"interval": "30s", "timeout": "10s"}
    return {
        _HTTP_PROTOCOL_OPTIONS: {
            "@type": _TYPE + _HTTP_PROTOCOL_OPTIONS,
            "explicit_http_config": {"http2_protocol_options": http2},
        }
    }


def _layered_runtime() -> dict[str, Any]:
    # A static layer only: no admin layer, so nothing on the host can flip runtime flags
    # (for instance disable a security check) through the admin port.
    return {"layers": [{"name": "static", "static_layer": {}}]}


def _overload_manager(params: BootstrapParams) -> dict[str, Any]:
    monitors: list[dict[str, Any]] = [
        {
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": _TYPE + "envoy.extensions.resource_monitors.downstream_connections.v3"
                ".DownstreamConnectionsConfig",
                "max_active_downstream_connections": params.max_downstream_connections,
            },
        }
    ]
    actions: list[dict[str, Any]] = []
    if params.max_heap_bytes is not None:
        monitors.append(
            {
                "name": "envoy.resource_monitors.fixed_heap",
                "typed_config": {
                    "@type": _TYPE + "envoy.extensions.resource_monitors.fixed_heap.v3"
                    ".FixedHeapConfig",
                    "max_heap_size_bytes": params.max_heap_bytes,
                },
            }
        )
        actions = [
            _heap_action("envoy.overload_actions.shrink_heap", 0.90),
            _heap_action("envoy.overload_actions.stop_accepting_requests", 0.98),
        ]
    return {"refresh_interval": "0.25s", "resource_monitors": monitors, "actions": actions}


def _heap_action(name: str, threshold: float) -> dict[str, Any]:
    return {
        "name": name,
        "triggers": [
            {"name": "envoy.resource_monitors.fixed_heap", "threshold": {"value": threshold}}
        ],
    }


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"
