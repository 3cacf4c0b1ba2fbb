"""Every configuration translate() generates is accepted by real Envoy.

Envoy gets each proxy's resources as a static bootstrap (`envoy --mode validate`): EDS
clusters become STATIC clusters with their ClusterLoadAssignment inlined, RDS references
become inline route configurations, and a static SDS cluster points at a socket path that
nobody serves (validation never connects). Covered: every proxy of the marketplace under
each mesh-wide mTLS mode, and the transparent-proxy variant with gRPC, TCP and port-level
modes under each.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format
from google.protobuf.message import Message

from tests.unit.xds.test_translate_marketplace import MARKETPLACE_KEYS, snapshot, with_reports
from verity.dataplane.bootstrap import BootstrapParams, render_bootstrap
from verity.dataplane.envoybinary import envoy_binary
from verity.xds import typeurls
from verity.xds.snapshot import MeshSnapshot
from verity.xds.translate import Resources, translate

MODES = ("STRICT", "PERMISSIVE", "DISABLE")
HCM_TYPE = "type.googleapis.com/" + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name


def static_cluster(cluster: Message, assignments: Mapping[str, Message]) -> Message:
    """An EDS cluster as a STATIC one with its endpoints inlined."""
    static = cluster_pb2.Cluster()
    static.CopyFrom(cluster)
    if static.type == cluster_pb2.Cluster.EDS:
        static.ClearField("eds_cluster_config")
        static.type = cluster_pb2.Cluster.STATIC
        static.load_assignment.CopyFrom(assignments[cluster.name])
    return static


def inline_routes(listener: Message, routes: Mapping[str, Message]) -> Message:
    """A listener whose HTTP connection managers carry their route configuration inline."""
    inlined = type(listener)()
    inlined.CopyFrom(listener)
    for chain in inlined.filter_chains:
        for network_filter in chain.filters:
            if network_filter.typed_config.type_url != HCM_TYPE:
                continue
            manager = hcm_pb2.HttpConnectionManager()
            network_filter.typed_config.Unpack(manager)
            manager.route_config.CopyFrom(routes[manager.rds.route_config_name])
            network_filter.typed_config.Pack(manager)
    return inlined


def static_bootstrap(key: str, resources: Resources, sds_socket: Path) -> dict[str, Any]:
    """The agent's own (static-only) bootstrap, with the proxy's resources added."""
    namespace, name = key.split("/")
    bootstrap = render_bootstrap(
        BootstrapParams(
            namespace=namespace,
            dataplane=name,
            service=name,
            sds_socket=sds_socket,
            control_plane=None,
            admin_port=19901,  # validation binds nothing
        )
    )
    assignments = resources[typeurls.ENDPOINT]
    routes = resources[typeurls.ROUTE]
    static = bootstrap["static_resources"]
    static["clusters"] += [
        _dict(static_cluster(c, assignments)) for c in resources[typeurls.CLUSTER].values()
    ]
    static["listeners"] = [
        _dict(inline_routes(listener, routes)) for listener in resources[typeurls.LISTENER].values()
    ]
    return bootstrap


def _dict(message: Message) -> dict[str, Any]:
    document: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return document


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def cases() -> list[tuple[str, MeshSnapshot, str]]:
    found = []
    for mode in MODES:
        mesh = snapshot(mode)
        found += [(f"{mode}-{key}", mesh, key) for key in MARKETPLACE_KEYS]
        reports = with_reports(mode)
        found += [(f"{mode}-reports-{key}", reports, key) for key in ("shop/reports-1",)]
    return found


def test_every_generated_config_validates(tmp_path: Path) -> None:
    sds_socket = tmp_path / "sds.sock"  # never served: validation does not connect
    paths = {}
    for label, mesh, key in cases():
        path = tmp_path / f"{label.replace('/', '-')}.json"
        path.write_text(json.dumps(static_bootstrap(key, translate(mesh, key), sds_socket)))
        paths[label] = path
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(paths, pool.map(validate, paths.values()), strict=True))
    failures = {
        label: (result.stdout + result.stderr)[-1500:]
        for label, result in results.items()
        if result.returncode != 0
    }
    assert not failures, failures


def test_a_broken_config_is_refused(tmp_path: Path) -> None:
    # The check above means something only if validation refuses a bad reference.
    key = MARKETPLACE_KEYS[0]
    bootstrap = static_bootstrap(key, translate(snapshot(), key), tmp_path / "sds.sock")
    listener = next(
        entry
        for entry in bootstrap["static_resources"]["listeners"]
        if entry["name"] == "inbound:8080"
    )
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    manager["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["cluster"] = "missing"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(bootstrap))
    result = validate(path)
    assert result.returncode != 0 and "missing" in result.stdout + result.stderr
