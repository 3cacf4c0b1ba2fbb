"""`verity dataplane run` as a real process, with a real Envoy, against a stand-in control plane.

The CertificateService below is a test double: it stands in for the control plane only until
the control plane's own CA service can be run here, and then this test should use that. It is
kept small, but nothing in it is faked on the wire: real TLS (the agent verifies it with
--ca-cert and --cp-server-name), real SVIDs from `verity.pki`, and the project's ADS server
giving Envoy one TLS listener whose certificate and trust bundle come from the agent's SDS.

Checked: registration with the file's YAML; the CSR carries no key and the key file is 0600;
Envoy serves the issued certificate (admin /certs and a TLS handshake); /ready; renewal of
short-lived certificates; a root rotation renews at once and is reported; the token never
appears in the agent's output; SIGTERM drains and exits 0 promptly and Envoy is gone; a
Dataplane outside the token's identity is refused with a clear error and exit status 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from google.protobuf import json_format

from tests.unit.dataplane.test_cpclient import serving_tls
from verity.dataplane.sds import BUNDLE_SECRET, CERT_SECRET, sds_secret_config
from verity.pki import (
    CertificateAuthority,
    IssuedSvid,
    SpiffeId,
    TrustBundle,
    generate_builtin_ca,
    issue_svid,
)
from verity.protocol import ca_pb2, ca_pb2_grpc
from verity.resources import Dataplane, load_documents
from verity.xds import typeurls
from verity.xds.ads import SERVER_OPTIONS, AdsServer, Unauthenticated, serve_ads
from verity.xds.cache import SnapshotCache

REPO = Path(__file__).resolve().parents[2]
TOKEN = "agent-e2e-token-d41d8cd98f00"  # not token-shaped: only the agent's care hides it
SERVER_NAME = "cp.verity.test"
NODE = "shop/web-1"
LIFETIME = timedelta(seconds=12)  # renewal point (1/3 left, minus jitter) at about 7-8 s
DRAIN_S = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def dataplane_yaml(inbound_port: int, namespace: str = "shop") -> str:
    return f"""\
apiVersion: verity.dev/v1alpha1
kind: Dataplane
metadata:
  name: web-1
  namespace: {namespace}
spec:
  service: web
  serviceAccount: web
  address: 127.0.0.1
  inbound:
    - port: {inbound_port}
      appPort: {inbound_port + 1}
      protocol: http
"""


# ---------------------------------------------------------------------------------------------
# The stand-in control plane


@dataclass
class StandInControlPlane:
    ca: CertificateAuthority
    signing: CertificateAuthority
    bundle: TrustBundle
    registrations: list[str] = field(default_factory=list)
    csrs: list[bytes] = field(default_factory=list)
    issued: list[IssuedSvid] = field(default_factory=list)
    reports: list[Any] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def create(cls) -> StandInControlPlane:
        ca = generate_builtin_ca("default", "cluster.local", datetime.now(UTC))
        return cls(ca=ca, signing=ca, bundle=ca.trust_bundle)

    def rotate(self) -> CertificateAuthority:
        """Add a new root and sign with it from now on (two rotation stages at once)."""
        new = generate_builtin_ca("default", "cluster.local", datetime.now(UTC))
        self.bundle = self.bundle.with_root(new.certificate)
        self.signing = new
        self.changed.set()
        return new

    async def _authorized(self, context: Any) -> None:
        metadata = dict(context.invocation_metadata())
        if metadata.get("authorization") != f"Bearer {TOKEN}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown token")

    def _bundle(self) -> Any:
        return ca_pb2.GetTrustBundleResponse(
            trust_domain="cluster.local",
            trust_bundle_pem=self.bundle.pem,
            rotation_stage="stable",
            signing_root_fingerprint=self.signing.root_fingerprint_sha256,
        )

    async def RegisterDataplane(self, request: Any, context: Any) -> Any:
        await self._authorized(context)
        self.registrations.append(request.dataplane_yaml)
        (dataplane,) = load_documents(request.dataplane_yaml)
        assert isinstance(dataplane, Dataplane)
        if (dataplane.namespace, dataplane.spec.service_account) != ("shop", "web"):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the token is for namespace shop, service account web; the Dataplane asks "
                f"for namespace {dataplane.namespace}",
            )
        return ca_pb2.RegisterDataplaneResponse(
            namespace=dataplane.namespace, name=dataplane.name, resource_version=1
        )

    async def GetTrustBundle(self, request: Any, context: Any) -> Any:
        await self._authorized(context)
        return self._bundle()

    async def SignCertificate(self, request: Any, context: Any) -> Any:
        await self._authorized(context)
        self.csrs.append(bytes(request.csr_pem))
        identity = SpiffeId.build("cluster.local", "shop", "web")
        issued = issue_svid(
            self.signing, bytes(request.csr_pem), identity, datetime.now(UTC), LIFETIME
        )
        self.issued.append(issued)
        return ca_pb2.SignCertificateResponse(
            spiffe_id=str(identity),
            certificate_pem=issued.cert_pem,
            chain_pem=issued.chain_pem.removeprefix(issued.cert_pem),
            trust_bundle_pem=self.bundle.pem,
            not_before_unix=int(issued.not_before.timestamp()),
            not_after_unix=int(issued.not_after.timestamp()),
            serial_hex=f"{issued.serial:x}",
        )

    async def WatchTrustBundle(self, requests: AsyncIterator[Any], context: Any) -> Any:
        await self._authorized(context)

        async def read_reports() -> None:
            async for report in requests:
                self.reports.append(report)

        reader = asyncio.create_task(read_reports())
        try:
            while True:
                self.changed.clear()
                yield ca_pb2.TrustBundleUpdate(bundle=self._bundle())
                await self.changed.wait()
        finally:
            reader.cancel()


def inbound_listener(port: int) -> Any:
    """A TLS listener whose certificate and trust bundle Envoy must fetch from the agent."""
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "inbound",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
                        }
                    ],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    tls = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
        "DownstreamTlsContext",
        "require_client_certificate": False,
        "common_tls_context": {
            "tls_certificate_sds_secret_configs": [sds_secret_config(CERT_SECRET)],
            "validation_context_sds_secret_config": sds_secret_config(BUNDLE_SECRET),
        },
    }
    listener = {
        "name": "inbound",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": manager,
                    }
                ],
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": tls},
            }
        ],
    }
    return json_format.ParseDict(listener, listener_pb2.Listener())


@dataclass
class Harness:
    cp: StandInControlPlane
    port: int
    ca_file: Path
    inbound_port: int


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    tls = serving_tls(SERVER_NAME)
    cp = StandInControlPlane.create()
    inbound_port = free_port()
    cache = SnapshotCache()
    cache.set_resources(NODE, {typeurls.LISTENER: {"inbound": inbound_listener(inbound_port)}})

    async def authenticate(metadata: Any, node_id: str) -> str:
        if dict(metadata).get("authorization") != f"Bearer {TOKEN}":
            raise Unauthenticated("unknown token")
        return node_id

    server = grpc.aio.server(options=SERVER_OPTIONS)
    ca_pb2_grpc.add_CertificateServiceServicer_to_server(cp, server)
    serve_ads(server, AdsServer(cache, authenticate))
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials())
    await server.start()
    ca_file = tmp_path / "cp-ca.pem"
    ca_file.write_bytes(tls.ca_pem)
    try:
        yield Harness(cp, port, ca_file, inbound_port)
    finally:
        await server.stop(0)


# ---------------------------------------------------------------------------------------------
# The agent process


@dataclass
class AgentProcess:
    process: subprocess.Popen[bytes]
    stderr_path: Path
    ready_url: str
    admin_url: str
    started: float

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.stderr().splitlines():
            if line.startswith("{"):
                records.append(json.loads(line))
        return records


def start_agent(harness: Harness, tmp_path: Path, yaml_text: str) -> AgentProcess:
    dataplane_file = tmp_path / "dp.yaml"
    dataplane_file.write_text(yaml_text)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    admin_port, ready_port = free_port(), free_port()
    stderr_path = tmp_path / "agent.stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERITY_")}
    command = [
        sys.executable,
        "-m",
        "verity.cli.dataplane",
        "run",
        "--dataplane-file",
        str(dataplane_file),
        "--token-file",
        str(token_file),
        "--cp-address",
        f"127.0.0.1:{harness.port}",
        "--cp-server-name",
        SERVER_NAME,
        "--ca-cert",
        str(harness.ca_file),
        "--admin-port",
        str(admin_port),
        "--ready-port",
        str(ready_port),
        "--work-dir",
        str(tmp_path / "work"),
        "--key-file",
        str(tmp_path / "workload.key"),
        "--drain-time",
        str(DRAIN_S),
    ]
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(command, stdout=stderr, stderr=stderr, env=env, cwd=REPO)
    return AgentProcess(
        process,
        stderr_path,
        f"http://127.0.0.1:{ready_port}/ready",
        f"http://127.0.0.1:{admin_port}",
        time.monotonic(),
    )


async def eventually(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_ready(agent: AgentProcess, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(trust_env=False) as http:
        while time.monotonic() < deadline:
            assert agent.process.poll() is None, agent.stderr()[-3000:]
            try:
                if (await http.get(agent.ready_url, timeout=1)).status_code == 200:
                    return time.monotonic() - agent.started
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.02)
    raise AssertionError(f"agent not ready: {agent.stderr()[-3000:]}")


def served_serial(port: int) -> int:
    """The serial of the certificate Envoy presents on a new connection."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only looking at what is served
    with socket.create_connection(("127.0.0.1", port), timeout=3) as raw:
        with context.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


# ---------------------------------------------------------------------------------------------
# Tests


async def test_agent_enrols_serves_renews_rotates_and_stops(
    harness: Harness, tmp_path: Path
) -> None:
    cp = harness.cp
    yaml_text = dataplane_yaml(harness.inbound_port)
    agent = start_agent(harness, tmp_path, yaml_text)
    try:
        startup = await wait_ready(agent, timeout=20)
        print(f"agent start to /ready 200 (Envoy live, listener, certificate): {startup:.2f}s")

        # Registration with the file's YAML; a CSR without a key; the key file 0600.
        assert cp.registrations == [yaml_text]
        assert all(b"PRIVATE KEY" not in csr for csr in cp.csrs)
        x509.load_pem_x509_csr(cp.csrs[0])
        key_file = tmp_path / "workload.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        assert key.public_key() == cp.issued[-1].certificate.public_key()
        assert stat.S_IMODE((tmp_path / "work").stat().st_mode) == 0o700

        # Envoy loaded the issued certificate over SDS and presents it.
        first = cp.issued[-1].serial
        certs = httpx.get(agent.admin_url + "/certs", trust_env=False).json()
        serials = {
            int(c["serial_number"], 16)
            for entry in certs["certificates"]
            for c in entry.get("cert_chain", [])
        }
        assert first in serials
        assert await asyncio.to_thread(served_serial, harness.inbound_port) == first

        # Renewal of the short-lived certificate, served on new connections, and reported.
        await eventually(lambda: len(cp.issued) >= 2, 15, "a renewal")
        renewed = cp.issued[-1].serial
        renewal_after = time.monotonic() - agent.started
        await eventually(
            lambda: served_serial(harness.inbound_port) == renewed, 5, "the renewed certificate"
        )
        await eventually(
            lambda: any(r.leaf_serial_hex == f"{renewed:x}" for r in cp.reports), 5, "a report"
        )

        # A root rotation: the bundle update is applied and reported, and the leaf is renewed
        # at once from the new root.
        issued_before = len(cp.issued)
        new_root = cp.rotate().root_fingerprint_sha256
        old_root = cp.ca.root_fingerprint_sha256
        rotated_at = time.monotonic()
        await eventually(
            lambda: any(
                r.leaf_root_fingerprint == new_root
                and set(r.applied_root_fingerprints) == {old_root, new_root}
                for r in cp.reports
            ),
            5,
            "a report of the new root",
        )
        rotation_s = time.monotonic() - rotated_at
        assert len(cp.issued) == issued_before + 1
        assert cp.issued[-1].certificate.issuer == cp.signing.certificate.subject
        print(f"first renewal {renewal_after:.1f}s after start")
        print(f"root change to new leaf reported: {rotation_s:.2f}s")

        envoy_pid = next(
            r["envoy_pid"] for r in agent.log_records() if r.get("msg") == "Envoy started"
        )

        # SIGTERM: drain, exit 0 promptly, Envoy gone.
        stopping = time.monotonic()
        agent.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(agent.process.wait, DRAIN_S + 2)
        stop_s = time.monotonic() - stopping
        print(f"SIGTERM to exit: {stop_s:.2f}s (drain {DRAIN_S}s)")
        assert code == 0, agent.stderr()[-3000:]
        with pytest.raises(ProcessLookupError):
            os.kill(envoy_pid, 0)
        assert not (tmp_path / "work" / "envoy-bootstrap.json").exists()

        output = agent.stderr()
        assert TOKEN not in output
        assert "PRIVATE KEY" not in output
    finally:
        if agent.process.poll() is None:
            agent.process.kill()
            agent.process.wait()


async def test_dataplane_outside_the_token_identity_is_refused(
    harness: Harness, tmp_path: Path
) -> None:
    agent = start_agent(harness, tmp_path, dataplane_yaml(free_port(), namespace="billing"))
    try:
        code = await asyncio.to_thread(agent.process.wait, 20)
    finally:
        if agent.process.poll() is None:
            agent.process.kill()
    output = agent.stderr()
    assert code == 1, output[-3000:]
    error_lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert "could not register the Dataplane" in error_lines[0]
    assert "permission denied" in error_lines[0] and "namespace billing" in error_lines[0]
    assert harness.cp.csrs == []  # nothing was signed for a refused registration
    assert TOKEN not in output
