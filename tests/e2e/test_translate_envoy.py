"""Every configuration translate() generates is accepted by real Envoy.

Envoy gets each proxy's resources as a static bootstrap (`envoy --mode validate`): EDS
clusters become STATIC clusters with their ClusterLoadAssignment inlined, RDS references
become inline route configurations, and a static SDS cluster points at a socket path that
nobody serves (validation never connects). Covered: every proxy of the marketplace under
each mesh-wide mTLS mode, and the transparent-proxy variant with gRPC, TCP and port-level
modes under each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format
from google.protobuf.message import Message

from tests.unit.dataplane.certs import ThrowawayCA
from tests.unit.xds.test_translate_marketplace import MARKETPLACE_KEYS, snapshot, with_reports
from verity.dataplane.bootstrap import BootstrapParams, render_bootstrap
from verity.dataplane.envoy import EnvoyOptions, EnvoyProcess
from verity.dataplane.envoybinary import envoy_binary
from verity.dataplane.sds import CERT_SECRET, SdsServer, SpiffeTrustBundle
from verity.resources import Dataplane, MeshSpec, load_documents
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


# ---------------------------------------------------------------------------------------------
# Real traffic: invoices calls users through both sidecars, certificates from each agent's SDS.

CA = ThrowawayCA()
INVOICES_ID = "spiffe://cluster.local/ns/shop/sa/invoices"
USERS_ID = "spiffe://cluster.local/ns/shop/sa/users"
FORGED = "URI=spiffe://cluster.local/ns/shop/sa/admin"


class _EchoClientCert(BaseHTTPRequestHandler):
    """The users app: answers with the x-forwarded-client-cert header it received."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = self.headers.get("x-forwarded-client-cert", "").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def users_app() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoClientCert)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Ports:
    users_app: int
    users_inbound: int = field(default_factory=free_port)
    invoices_inbound: int = field(default_factory=free_port)
    invoices_to_users: int = field(default_factory=free_port)


def two_proxies(ports: Ports, mode: str, revoked: tuple[str, ...] = ()) -> MeshSnapshot:
    documents = load_documents(
        f"""
apiVersion: verity.dev/v1alpha1
kind: Dataplane
metadata: {{name: users-1, namespace: shop}}
spec:
  service: users
  serviceAccount: users
  address: 127.0.0.1
  inbound: [{{port: {ports.users_inbound}, appPort: {ports.users_app}, protocol: http}}]
---
apiVersion: verity.dev/v1alpha1
kind: Dataplane
metadata: {{name: invoices-1, namespace: shop}}
spec:
  service: invoices
  serviceAccount: invoices
  address: 127.0.0.1
  inbound: [{{port: {ports.invoices_inbound}, appPort: 1, protocol: http}}]
  outbound:
  - {{service: users, port: {ports.users_inbound}, localPort: {ports.invoices_to_users}}}
"""
    )
    # These tests are about mTLS; with no AuthorizationPolicy the mesh allows (Istio's
    # default), so plaintext modes carry traffic; revoked identities are refused regardless.
    mesh = MeshSpec.model_validate(
        {"mtls": {"mode": mode}, "authorization": {"defaultAction": "ALLOW"}}
    )
    return MeshSnapshot(
        mesh_name="default",
        mesh=mesh,
        dataplanes=tuple(d for d in documents if isinstance(d, Dataplane)),
        revoked=frozenset(revoked),
        ready=frozenset({"shop/users-1", "shop/invoices-1"}),
    )


@dataclass
class Sidecar:
    """One proxy: Envoy with `key`'s translated config, and its agent's SDS server, which
    serves an SVID for `identity`."""

    key: str
    identity: str
    sds: SdsServer
    envoy: EnvoyProcess
    uses_secrets: bool

    @classmethod
    def prepare(cls, tmp: Path, mesh: MeshSnapshot, key: str, identity: str) -> Sidecar:
        directory = tmp / key.replace("/", "-")
        directory.mkdir()
        sds = SdsServer(directory / "sds" / "sds.sock")
        resources = translate(mesh, key)
        admin_port = free_port()
        bootstrap = static_bootstrap(key, resources, sds.socket_path)
        bootstrap["admin"]["address"]["socket_address"]["port_value"] = admin_port
        path = directory / "envoy.json"
        path.write_text(json.dumps(bootstrap))
        options = EnvoyOptions(
            bootstrap=path,
            admin_port=admin_port,
            drain_time_s=1,
            stop_timeout_s=5,
            required_listeners=tuple(resources[typeurls.LISTENER]),
        )
        uses_secrets = CERT_SECRET in json.dumps(bootstrap["static_resources"]["listeners"])
        return cls(key, identity, sds, EnvoyProcess(options), uses_secrets)

    async def serve_secrets(self) -> None:
        await self.sds.start()
        versions = self.sds.update(
            certificate=CA.issue(self.identity).secret(),
            trust_bundle=SpiffeTrustBundle({"cluster.local": CA.pem}),
        )
        await self.envoy.wait_ready(timeout=15)
        for name, version in versions.items() if self.uses_secrets else ():
            await self.sds.wait_acked(name, version, timeout=10)

    async def stop(self) -> None:
        await self.envoy.stop()
        await self.sds.stop()


@contextlib.asynccontextmanager
async def marketplace_pair(
    tmp: Path, mesh: MeshSnapshot, users_identity: str = USERS_ID
) -> AsyncIterator[dict[str, Sidecar]]:
    sidecars = [
        Sidecar.prepare(tmp, mesh, "shop/users-1", users_identity),
        Sidecar.prepare(tmp, mesh, "shop/invoices-1", INVOICES_ID),
    ]
    try:
        # Envoys are forked before any gRPC server runs in this process: a fork while gRPC
        # threads are busy can abort the child in gRPC's fork handlers. Envoy retries SDS.
        for sidecar in sidecars:
            await sidecar.envoy.start()
        for sidecar in sidecars:
            await sidecar.serve_secrets()
        yield {sidecar.key: sidecar for sidecar in sidecars}
    finally:
        for sidecar in sidecars:
            await sidecar.stop()


ANY_HASH = "<sha256>"


def xfcc(header: str) -> dict[str, str]:
    """One x-forwarded-client-cert element as a dict (the Hash value replaced by ANY_HASH)."""
    fields = dict(part.split("=", 1) for part in header.split(";"))
    if len(fields.get("Hash", "")) == 64:
        fields["Hash"] = ANY_HASH
    return fields


async def get(port: int, headers: dict[str, str] | None = None) -> httpx.Response:
    """GET / on loopback `port`, retried briefly while listeners finish warming."""
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        for _ in range(40):
            try:
                response = await client.get(f"http://127.0.0.1:{port}/", headers=headers)
            except httpx.TransportError:
                await asyncio.sleep(0.05)
                continue
            if response.status_code != 503:
                return response
            await asyncio.sleep(0.05)
        return response


async def test_strict_call_carries_the_callers_identity_only(
    tmp_path: Path, users_app: int
) -> None:
    ports = Ports(users_app)
    async with marketplace_pair(tmp_path, two_proxies(ports, "STRICT")):
        reply = await get(ports.invoices_to_users, {"x-forwarded-client-cert": FORGED})
        assert reply.status_code == 200
        # Only Envoy's view of the peer reaches the app, the app's forged header is gone.
        # Envoy always adds By (the server's own URI) and Hash (of the peer certificate).
        assert xfcc(reply.text) == {"By": USERS_ID, "Hash": ANY_HASH, "URI": INVOICES_ID}
        with pytest.raises(httpx.TransportError):
            async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
                await client.get(f"http://127.0.0.1:{ports.users_inbound}/")


async def test_permissive_also_takes_plaintext(tmp_path: Path, users_app: int) -> None:
    ports = Ports(users_app)
    async with marketplace_pair(tmp_path, two_proxies(ports, "PERMISSIVE")):
        assert xfcc((await get(ports.invoices_to_users)).text)["URI"] == INVOICES_ID
        plain = await get(ports.users_inbound, {"x-forwarded-client-cert": FORGED})
        assert plain.status_code == 200 and plain.text == ""


async def test_disable_is_plaintext_end_to_end(tmp_path: Path, users_app: int) -> None:
    ports = Ports(users_app)
    async with marketplace_pair(tmp_path, two_proxies(ports, "DISABLE")):
        reply = await get(ports.invoices_to_users)
        assert reply.status_code == 200 and reply.text == ""


async def test_revoked_caller_gets_403(tmp_path: Path, users_app: int) -> None:
    ports = Ports(users_app)
    mesh = two_proxies(ports, "STRICT", (INVOICES_ID,))
    async with marketplace_pair(tmp_path, mesh) as sidecars:
        reply = await get(ports.invoices_to_users)
        assert reply.status_code == 403
        stats = await sidecars["shop/users-1"].envoy.admin_get("/stats?filter=rbac")
        prefix = f"http.inbound_{ports.users_inbound}.rbac.revoked."
        assert f"{prefix}denied: 1" in stats.text
        assert f"{prefix}policy.verity-deny-revoked.denied: 1" in stats.text


async def test_server_with_the_wrong_identity_is_refused(tmp_path: Path, users_app: int) -> None:
    ports = Ports(users_app)
    impostor = "spiffe://cluster.local/ns/shop/sa/impostor"
    async with marketplace_pair(tmp_path, two_proxies(ports, "STRICT"), users_identity=impostor):
        reply = await get(ports.invoices_to_users)
        assert reply.status_code == 503
