"""The agent's building blocks against a real Envoy: SDS-served mTLS, rotation, supervision.

Envoy gets a static-only bootstrap plus one TLS listener whose certificate and trust bundle
come from the agent's SDS server, in front of a tiny local HTTP app. Clients are the ssl
module with certificates from a throwaway CA.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tests.unit.dataplane.certs import Svid, ThrowawayCA
from verity.dataplane.bootstrap import (
    BootstrapParams,
    ControlPlaneEndpoint,
    render_bootstrap,
    write_bootstrap,
)
from verity.dataplane.envoy import EnvoyOptions, EnvoyProcess
from verity.dataplane.envoybinary import envoy_binary
from verity.dataplane.keys import write_private_file
from verity.dataplane.sds import (
    BUNDLE_SECRET,
    CERT_SECRET,
    SdsServer,
    SpiffeTrustBundle,
    TrustBundle,
    sds_secret_config,
)

REPO = Path(__file__).resolve().parents[2]
SERVER_ID = "spiffe://cluster.local/ns/shop/sa/web"
CLIENT_ID = "spiffe://cluster.local/ns/shop/sa/frontend"
TOKEN = "vrtd_e2eTokenThatMustNeverLeak0123"
LISTENER = "inbound-tls"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---------------------------------------------------------------------------------------------
# The app behind Envoy, and TLS clients


class _Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"hello from the app\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def app_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def client_context(ca: ThrowawayCA, directory: Path, svid: Svid | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # an SVID names a SPIFFE ID, not a host
    context.load_verify_locations(cadata=ca.pem.decode())
    if svid is not None:
        cert, key = directory / f"{svid.serial:x}.pem", directory / f"{svid.serial:x}.key"
        cert.write_bytes(svid.certificate_pem)
        write_private_file(key, svid.key_pem)
        context.load_cert_chain(cert, key)
    return context


@dataclass(frozen=True)
class Reply:
    status: int
    server_serial: int


def get(port: int, context: ssl.SSLContext) -> Reply:
    """One request on a new connection; the serial of the certificate the server presented."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        assert conn.sock is not None
        der = conn.sock.getpeercert(binary_form=True)
        assert der is not None
        return Reply(response.status, x509.load_der_x509_certificate(der).serial_number)
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# Envoy with an SDS-fed TLS listener


def tls_listener(port: int) -> dict[str, Any]:
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
        },
    }
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "inbound",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "app",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "app"}}],
                }
            ]
        },
        "http_filters": [router],
    }
    tls = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
        "DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": {
            "tls_params": {
                "tls_minimum_protocol_version": "TLSv1_2",
                "tls_maximum_protocol_version": "TLSv1_3",
            },
            "tls_certificate_sds_secret_configs": [sds_secret_config(CERT_SECRET)],
            "combined_validation_context": {
                "default_validation_context": {
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}}
                    ]
                },
                "validation_context_sds_secret_config": sds_secret_config(BUNDLE_SECRET),
            },
        },
    }
    return {
        "name": LISTENER,
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


def app_cluster(port: int) -> dict[str, Any]:
    return {
        "name": "app",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "app",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


def params(
    tmp: Path, admin_port: int, control_plane: ControlPlaneEndpoint | None
) -> BootstrapParams:
    return BootstrapParams(
        namespace="shop",
        dataplane="web-1",
        service="web",
        service_account="web",
        sds_socket=tmp / "sds" / "sds.sock",
        admin_port=admin_port,
        control_plane=control_plane,
    )


def write_json(path: Path, document: dict[str, Any]) -> Path:
    write_private_file(path, json.dumps(document).encode())
    return path


@dataclass
class Mesh:
    ca: ThrowawayCA
    tmp: Path
    sds: SdsServer
    envoy: EnvoyProcess
    port: int
    versions: dict[str, str]
    served: Svid
    ready_after_s: float
    ack_latencies: list[float] = field(default_factory=list)

    def client(self, svid: Svid | None) -> ssl.SSLContext:
        return client_context(self.ca, self.tmp, svid)

    async def get(self, context: ssl.SSLContext) -> Reply:
        return await asyncio.to_thread(get, self.port, context)

    async def rotate(self) -> tuple[Svid, str]:
        svid = self.ca.issue(SERVER_ID)
        started = time.monotonic()
        version = self.sds.update(certificate=svid.secret())[CERT_SECRET]
        await self.sds.wait_acked(CERT_SECRET, version, timeout=5)
        self.ack_latencies.append(time.monotonic() - started)
        return svid, version


def envoy_options(bootstrap: Path, admin_port: int, **overrides: Any) -> EnvoyOptions:
    fields: dict[str, Any] = {
        "bootstrap": bootstrap,
        "admin_port": admin_port,
        "concurrency": 1,
        "drain_time_s": 1,
        "stop_timeout_s": 5,
    }
    fields.update(overrides)
    return EnvoyOptions(**fields)


@pytest.fixture(scope="module")
def ca() -> ThrowawayCA:
    return ThrowawayCA()


@pytest.fixture
async def mesh(ca: ThrowawayCA, tmp_path: Path, app_port: int) -> AsyncIterator[Mesh]:
    admin_port, port = free_port(), free_port()
    sds = SdsServer(tmp_path / "sds" / "sds.sock")
    await sds.start()
    served = ca.issue(SERVER_ID)
    versions = sds.update(certificate=served.secret(), trust_bundle=TrustBundle(ca.pem))
    bootstrap = render_bootstrap(params(tmp_path, admin_port, None))
    bootstrap["static_resources"]["listeners"] = [tls_listener(port)]
    bootstrap["static_resources"]["clusters"].append(app_cluster(app_port))
    path = write_json(tmp_path / "envoy.json", bootstrap)
    envoy = EnvoyProcess(envoy_options(path, admin_port, required_listeners=(LISTENER,)))
    await envoy.start()
    try:
        ready_after = await envoy.wait_ready(timeout=10)
        await sds.wait_acked(CERT_SECRET, versions[CERT_SECRET], timeout=5)
        await sds.wait_acked(BUNDLE_SECRET, versions[BUNDLE_SECRET], timeout=5)
        yield Mesh(ca, tmp_path, sds, envoy, port, versions, served, ready_after)
    finally:
        await envoy.stop()
        await sds.stop()


# ---------------------------------------------------------------------------------------------
# Bootstraps


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_every_bootstrap_variant_validates_with_envoy(
    tmp_path: Path, ca: ThrowawayCA, app_port: int
) -> None:
    ca_file = tmp_path / "cp-ca.pem"
    ca_file.write_bytes(ca.pem)
    variants = {
        "ads-inline-ca": ControlPlaneEndpoint(
            host="cp.verity.svc", token=TOKEN, ca_pem=ca.pem.decode()
        ),
        "ads-ca-file-ip": ControlPlaneEndpoint(host="127.0.0.1", token=TOKEN, ca_file=ca_file),
        "ads-name-and-address": ControlPlaneEndpoint(
            host="cp.verity.svc", address="127.0.0.1", port=15678, token=TOKEN, ca_file=ca_file
        ),
        "static-only": None,
    }
    for name, control_plane in variants.items():
        path = tmp_path / f"{name}.json"
        write_bootstrap(path, params(tmp_path, 19901, control_plane))
        result = validate(path)
        assert result.returncode == 0, f"{name}: {result.stdout[-800:]} {result.stderr[-800:]}"
        assert TOKEN not in result.stdout + result.stderr or control_plane is None
    heavy = BootstrapParams(
        **{**params(tmp_path, 19901, variants["ads-inline-ca"]).__dict__, "max_heap_bytes": 2**30}
    )
    document = render_bootstrap(heavy)
    document["static_resources"]["listeners"] = [tls_listener(18443)]
    document["static_resources"]["clusters"].append(app_cluster(app_port))
    result = validate(write_json(tmp_path / "full.json", document))
    assert result.returncode == 0, result.stderr[-800:]


def test_envoy_rejects_a_broken_bootstrap(tmp_path: Path) -> None:
    document = render_bootstrap(params(tmp_path, 19901, None))
    document["static_resources"]["clusters"][0]["type"] = "NOT_A_TYPE"
    assert validate(write_json(tmp_path / "broken.json", document)).returncode != 0


# ---------------------------------------------------------------------------------------------
# mTLS with SDS secrets


async def test_mtls_with_the_sds_certificate(mesh: Mesh) -> None:
    client = mesh.client(mesh.ca.issue(CLIENT_ID))
    reply = await mesh.get(client)
    assert reply.status == 200
    assert reply.server_serial == mesh.served.serial
    assert mesh.sds.acked_version(CERT_SECRET) == mesh.versions[CERT_SECRET]
    assert mesh.sds.acked_version(BUNDLE_SECRET) == mesh.versions[BUNDLE_SECRET]
    nodes = {status.node_id for status in mesh.sds.streams()}
    assert nodes == {"shop/web-1"}
    print(f"Envoy ready {mesh.ready_after_s * 1000:.0f} ms after exec")


async def test_client_without_a_certificate_is_refused(mesh: Mesh) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        await mesh.get(mesh.client(None))


async def test_client_from_another_ca_is_refused(mesh: Mesh) -> None:
    stranger = ThrowawayCA("stranger")
    context = mesh.client(None)
    svid = stranger.issue(CLIENT_ID)
    cert, key = mesh.tmp / "stranger.pem", mesh.tmp / "stranger.key"
    cert.write_bytes(svid.certificate_pem)
    write_private_file(key, svid.key_pem)
    context.load_cert_chain(cert, key)
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        await mesh.get(context)


async def test_rotation_reaches_the_next_connection(mesh: Mesh) -> None:
    client = mesh.client(mesh.ca.issue(CLIENT_ID))
    before = await mesh.get(client)
    rotated, version = await mesh.rotate()
    assert int(version) > int(mesh.versions[CERT_SECRET])
    assert mesh.sds.acked_version(CERT_SECRET) == version
    after = await mesh.get(client)
    assert before.server_serial == mesh.served.serial
    assert after.status == 200
    assert after.server_serial == rotated.serial


def _new_connections(
    port: int, context: ssl.SSLContext, stop: threading.Event, tally: dict[str, Any]
) -> None:
    while not stop.is_set():
        try:
            reply = get(port, context)
        except Exception as exc:  # every failure counts, whatever its kind
            tally["failures"].append(repr(exc))
            continue
        tally["ok" if reply.status == 200 else "bad"] += 1
        tally["serials"].add(reply.server_serial)


def _one_connection(
    port: int, context: ssl.SSLContext, stop: threading.Event, tally: dict[str, Any]
) -> None:
    """Requests on one kept-alive connection: a rotation must not break established ones."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
    try:
        while not stop.is_set():
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                response.read()
            except Exception as exc:
                tally["failures"].append(repr(exc))
                conn.close()
                continue
            tally["ok" if response.status == 200 else "bad"] += 1
    finally:
        conn.close()


async def test_ten_rotations_under_continuous_load_fail_nothing(mesh: Mesh) -> None:
    client = mesh.client(mesh.ca.issue(CLIENT_ID))
    stop = threading.Event()
    tally: dict[str, Any] = {"ok": 0, "bad": 0, "failures": [], "serials": set()}
    workers = [
        threading.Thread(target=target, args=(mesh.port, client, stop, tally), daemon=True)
        for target in (_new_connections, _new_connections, _one_connection)
    ]
    for worker in workers:
        worker.start()
    rotated: list[int] = []
    started = time.monotonic()
    try:
        await asyncio.sleep(0.2)
        for _ in range(10):
            svid, version = await mesh.rotate()
            assert mesh.sds.acked_version(CERT_SECRET) == version
            rotated.append(svid.serial)
            await asyncio.sleep(0.25)
    finally:
        stop.set()
        for worker in workers:
            await asyncio.to_thread(worker.join, 10)
    elapsed = time.monotonic() - started
    print(
        f"10 rotations in {elapsed:.1f}s: {tally['ok']} requests ok, "
        f"{tally['bad']} bad, {len(tally['failures'])} failed; push to ACK "
        f"median {sorted(mesh.ack_latencies)[5] * 1000:.1f} ms, "
        f"max {max(mesh.ack_latencies) * 1000:.1f} ms"
    )
    assert tally["failures"] == [] and tally["bad"] == 0
    assert tally["ok"] > 50
    # New connections saw the rotations (allowing for the last one racing the stop).
    assert len(set(rotated[:-1]) & tally["serials"]) >= 8
    assert (await mesh.get(client)).server_serial == rotated[-1]


async def test_spiffe_validator_bundle(mesh: Mesh) -> None:
    client = mesh.client(mesh.ca.issue(CLIENT_ID))
    version = mesh.sds.update(trust_bundle=SpiffeTrustBundle({"cluster.local": mesh.ca.pem}))[
        BUNDLE_SECRET
    ]
    await mesh.sds.wait_acked(BUNDLE_SECRET, version, timeout=5)
    assert (await mesh.get(client)).status == 200
    # A peer from a trust domain the bundle does not list is refused.
    outsider = mesh.client(mesh.ca.issue("spiffe://elsewhere.example/ns/shop/sa/x"))
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        await mesh.get(outsider)


async def test_envoy_nack_is_recorded_scrubbed_and_old_cert_kept(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    # secp256k1 passes our checks (the key matches the certificate) but Envoy refuses it.
    bad = mesh.ca.issue(SERVER_ID, ec.generate_private_key(ec.SECP256K1()))
    with caplog.at_level(logging.DEBUG):
        version = mesh.sds.update(certificate=bad.secret())[CERT_SECRET]
        for _ in range(200):
            if (nack := mesh.sds.last_nack(CERT_SECRET)) is not None:
                break
            await asyncio.sleep(0.025)
    assert nack is not None, "Envoy accepted a secp256k1 certificate"
    assert nack.rejected_version == version
    assert mesh.sds.acked_version(CERT_SECRET) == mesh.versions[CERT_SECRET]
    body = bad.key_pem.decode().splitlines()[1]
    for text in (nack.message, caplog.text):
        assert "PRIVATE KEY" not in text and body[:24] not in text
    print(f"Envoy NACK (scrubbed): {nack.message}")
    client = mesh.client(mesh.ca.issue(CLIENT_ID))
    assert (await mesh.get(client)).server_serial == mesh.served.serial


async def test_config_dump_has_no_key_material(mesh: Mesh) -> None:
    dump = json.dumps(await mesh.envoy.config_dump())
    assert "PRIVATE KEY" not in dump
    assert mesh.served.key_pem.decode().splitlines()[1][:24] not in dump
    assert "[redacted]" in dump
    assert CERT_SECRET in dump  # the secret is there, its key is not


# ---------------------------------------------------------------------------------------------
# Supervision


@pytest.fixture
async def ads_envoy(tmp_path: Path, ca: ThrowawayCA) -> AsyncIterator[EnvoyProcess]:
    """Envoy with the full ADS bootstrap; the control plane port has nobody listening."""
    admin_port = free_port()
    cp = ControlPlaneEndpoint(
        host="cp.verity.svc",
        address="127.0.0.1",
        port=free_port(),
        token=TOKEN,
        ca_pem=ca.pem.decode(),
    )
    (tmp_path / "sds").mkdir(mode=0o700)
    bootstrap = tmp_path / "envoy.json"
    write_bootstrap(
        bootstrap,
        BootstrapParams(
            **{**params(tmp_path, admin_port, cp).__dict__, "initial_fetch_timeout_s": 0.2}
        ),
    )
    envoy = EnvoyProcess(envoy_options(bootstrap, admin_port, restart_initial_delay_s=0.05))
    await envoy.start()
    try:
        yield envoy
    finally:
        await envoy.stop()


async def test_config_dump_and_logs_never_show_the_token(
    ads_envoy: EnvoyProcess, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        await ads_envoy.wait_ready(timeout=10)
        raw = (await ads_envoy.admin_get("/config_dump")).text
        dump = json.dumps(await ads_envoy.config_dump())
    assert TOKEN in raw  # Envoy itself shows it to anyone who can reach the admin port
    assert TOKEN not in dump
    assert "cp.verity.svc" in dump
    assert TOKEN not in caplog.text


async def test_restarted_after_sigkill(ads_envoy: EnvoyProcess) -> None:
    await ads_envoy.wait_ready(timeout=10)
    first = ads_envoy.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    started = time.monotonic()
    for _ in range(200):
        if ads_envoy.pid not in (None, first):
            break
        await asyncio.sleep(0.01)
    respawned = time.monotonic() - started
    await ads_envoy.wait_ready(timeout=10)
    print(f"respawned {respawned:.2f}s and ready {time.monotonic() - started:.2f}s after SIGKILL")
    assert ads_envoy.pid not in (None, first)
    assert ads_envoy.restarts == 1
    assert ads_envoy.is_ready()


async def test_sigterm_stop_is_clean_and_fast(ads_envoy: EnvoyProcess) -> None:
    await ads_envoy.wait_ready(timeout=10)
    pid = ads_envoy.pid
    assert pid is not None
    started = time.monotonic()
    code = await ads_envoy.stop()
    took = time.monotonic() - started
    print(f"SIGTERM stop took {took * 1000:.0f} ms, exit code {code}")
    assert code == 0
    assert took < 2
    assert not _alive(pid)
    assert not ads_envoy.is_ready()


async def test_drained_stop(mesh: Mesh) -> None:
    started = time.monotonic()
    code = await mesh.envoy.stop(drain=True)
    took = time.monotonic() - started
    assert code == 0
    assert mesh.envoy.options.drain_time_s <= took < mesh.envoy.options.drain_time_s + 2


_CHILD = """
import asyncio, sys
from pathlib import Path
from verity.dataplane.envoy import EnvoyOptions, EnvoyProcess

async def main() -> None:
    envoy = EnvoyProcess(EnvoyOptions(bootstrap=Path(sys.argv[1]), admin_port=int(sys.argv[2])))
    await envoy.start()
    await envoy.wait_ready(timeout=10)
    print(envoy.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def _alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (dead, waiting for a reaper)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"


async def test_envoy_dies_with_its_parent(tmp_path: Path) -> None:
    admin_port = free_port()
    (tmp_path / "sds").mkdir(mode=0o700)
    bootstrap = tmp_path / "envoy.json"
    write_bootstrap(bootstrap, params(tmp_path, admin_port, None))
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        str(bootstrap),
        str(admin_port),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert parent.stdout is not None
    envoy_pid = 0
    try:
        line = await asyncio.wait_for(parent.stdout.readline(), timeout=20)
        envoy_pid = int(line)
        assert _alive(envoy_pid)
        parent.kill()  # SIGKILL: the supervisor gets no chance to clean up
        await parent.wait()
        deadline = time.monotonic() + 3
        while _alive(envoy_pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert not _alive(envoy_pid), "Envoy outlived its parent"
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        if envoy_pid and _alive(envoy_pid):
            os.kill(envoy_pid, signal.SIGKILL)


async def test_envoy_output_reaches_the_log_scrubbed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    admin_port = free_port()
    (tmp_path / "sds").mkdir(mode=0o700)
    bootstrap = tmp_path / "envoy.json"
    write_bootstrap(bootstrap, params(tmp_path, admin_port, None))
    envoy = EnvoyProcess(envoy_options(bootstrap, admin_port, log_level="info"))
    with caplog.at_level(logging.INFO, logger="verity.envoy"):
        await envoy.start()
        try:
            await envoy.wait_ready(timeout=10)
        finally:
            await envoy.stop()
    records = [r for r in caplog.records if hasattr(r, "envoy_component")]
    assert records, "no Envoy output was captured"
    assert any(getattr(r, "envoy_component", None) == "main" for r in records)
    assert all(isinstance(getattr(r, "envoy_pid", None), int) for r in records)
    assert not any("\t" in r.getMessage() for r in records)
