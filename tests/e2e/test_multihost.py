"""End to end on several simulated hosts: seed 000's marketplace with transparent interception.

The control plane, `users`, `items` and `invoices` each run on their own host (a network
namespace on a private bridge, see tests/netns.py), plus an `attacker` host on the same
network. Each service host runs the marketplace app (it knows nothing of the mesh: it listens
on every interface and calls `http://<service>:8080`, which its /etc/hosts maps to the
service's host) and `verity dataplane run --transparent`, whose iptables rules send the app's
TCP through Envoy both ways. The mesh is Verity's default (STRICT, default deny) with seed
000's policy as Istio AuthorizationPolicies.

Checked: the permission matrix by status code; every attacker attempt refused, with the
reason visible on the defending side (Envoy's counters, the control plane's log); the app
cannot send traffic out of the mesh; a host whose agent is SIGKILLed rejoins within seconds;
SIGTERM removes the rules. Needs root (namespaces, iptables): skipped without it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.netns import (
    ADMIN_PORT,
    CP_GRPC_PORT,
    SUBNET,
    MeshHosts,
    Network,
    Service,
    network,
    stop_process,
    unavailable_reason,
    wait_until,
)

_UNAVAILABLE = unavailable_reason()
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=_UNAVAILABLE or "")

SERVICES = ("users", "items", "invoices")
OCTETS = {"cp": 2, "users": 11, "items": 12, "invoices": 13, "attacker": 66}
NAMESPACE = "shop"
MESH_PORT = 8080  # what callers dial (the Dataplane's inbound port)
APP_PORT = 18080  # where the app itself listens, on every interface of its host

MESH = """\
apiVersion: verity.dev/v1alpha1
kind: Mesh
metadata: {name: default}
spec:
  mtls: {mode: STRICT}
  authorization: {defaultAction: DENY}
  egress: {defaultAction: DENY}
"""

# Seed 000: invoices and users may call each other; only invoices may call items; items
# calls no one. Receiving side, by caller identity.
POLICY = "---\n".join(
    f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {callee}-from-{caller}, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: {callee}}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: ["cluster.local/ns/shop/sa/{caller}"]}}}}]
"""
    for callee, caller in (("users", "invoices"), ("invoices", "users"), ("items", "invoices"))
)

Cell = tuple[str, str]  # (caller, callee)
EXPECTED: dict[Cell, int] = {
    ("users", "items"): 403,
    ("users", "invoices"): 200,
    ("items", "users"): 403,
    ("items", "invoices"): 403,
    ("invoices", "users"): 200,
    ("invoices", "items"): 200,
}


def spiffe_id(service: str) -> str:
    return f"spiffe://cluster.local/ns/{NAMESPACE}/sa/{service}"


def report(request: pytest.FixtureRequest, text: str) -> None:
    """Print past pytest's capture: the figures belong in every run's output."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n{text}", flush=True)


@pytest.fixture(scope="module")
def marketplace(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[MeshHosts]:
    started = time.monotonic()
    workdir = tmp_path_factory.mktemp("multihost")
    # Names unique per test run, so that two runs on one machine do not meet.
    with network(f"vt{os.getpid() % 100000}", OCTETS) as net:
        net.write_hosts_files({name: net.hosts[name].address for name in SERVICES})
        mesh = MeshHosts(net, net.hosts["cp"], workdir)
        try:
            _bring_up(mesh, net)
            report(request, f"multi-host mesh up in {time.monotonic() - started:.1f}s")
            yield mesh
        finally:
            mesh.close()
            # Stopped with SIGTERM, every agent took its rules with it.
            left = [s.name for s in mesh.services.values() if "VERITY_" in s.host.nat_table()]
    report(request, f"multi-host module ran in {time.monotonic() - started:.1f}s")
    assert not left, f"interception rules left behind on {left}"


def _bring_up(mesh: MeshHosts, net: Network) -> None:
    mesh.start_control_plane()
    mesh.apply(MESH + "---\n" + POLICY)
    for name in SERVICES:
        callees = tuple(other for other in SERVICES if other != name)
        service = Service(
            name, net.hosts[name], NAMESPACE, MESH_PORT, APP_PORT, callees, mesh.workdir
        )
        mesh.add_service(service)
        mesh.start_app(service)
        mesh.start_agent(service)
    for service in mesh.services.values():
        mesh.wait_ready(service)
    # Every proxy knows every instance once the last registration reached it over xDS.
    wait_until(
        lambda: (
            mesh.call("users", "invoices")[0] == 200 and mesh.call("invoices", "users")[0] == 200
        ),
        30,
        "first calls through the mesh",
    )


# --- the permission matrix --------------------------------------------------------------------


@pytest.fixture(scope="module")
def matrix(marketplace: MeshHosts, request: pytest.FixtureRequest) -> dict[Cell, tuple[int, Any]]:
    """Every cell, called once from the caller's app: (the callee's status, its body)."""
    observed = {cell: marketplace.call(*cell) for cell in EXPECTED}
    lines = [
        f"{caller:>9} -> {callee:<9} expected {EXPECTED[caller, callee]}"
        f" observed {observed[caller, callee][0]}"
        for caller, callee in EXPECTED
    ]
    report(request, "permission matrix (caller -> callee):\n" + "\n".join(lines))
    return observed


@pytest.mark.parametrize("cell", list(EXPECTED), ids=lambda cell: "-calls-".join(cell))
def test_seed_000_permission_matrix(matrix: dict[Cell, tuple[int, Any]], cell: Cell) -> None:
    caller, callee = cell
    status, body = matrix[cell]
    assert status == EXPECTED[cell], (cell, body)
    if status == 200:  # the callee's app saw who called, as the mesh proved it
        assert body == {"service": callee, "caller": spiffe_id(caller)}
    else:  # refused by the callee's sidecar (Envoy's RBAC), not by its app
        assert body == {"body": "RBAC: access denied"}


# --- the attacker -------------------------------------------------------------------------------


def _context(cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the attacker does not care who answers
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


def _request(address: str, port: int, context: ssl.SSLContext | None = None) -> Callable[[], str]:
    """A GET to address:port, in plaintext or TLS: what came back, or why nothing did."""

    def attempt() -> str:
        try:
            with socket.create_connection((address, port), timeout=5) as raw:
                stream = raw if context is None else context.wrap_socket(raw)
                with stream:
                    stream.sendall(b"GET /items HTTP/1.1\r\nHost: items\r\n\r\n")
                    data = stream.recv(4096)
        except OSError as exc:  # ssl.SSLError included
            return f"refused: {exc}"
        return f"answer: {data[:60]!r}" if data else "refused: closed without an answer"

    return attempt


def _write_pem(path: Path, *items: x509.Certificate | ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        b"".join(
            item.public_bytes(serialization.Encoding.PEM)
            if isinstance(item, x509.Certificate)
            else item.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            for item in items
        )
    )
    return path


def _certificate(
    key: ec.EllipticCurvePrivateKey,
    *,
    uri: str | None,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None = None,
) -> x509.Certificate:
    """A leaf carrying `uri` signed by `issuer` (name, key), or a self-signed CA (uri None),
    or a self-signed leaf (no issuer)."""
    name = "attacker CA" if uri is None else "attacker"
    issuer_name, issuer_key = issuer or (name, key)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=uri is None, path_length=None), critical=True)
    )
    if uri is not None:
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _copied_certificate(marketplace: MeshHosts) -> x509.Certificate:
    """invoices' own SVID, as anyone can copy it: invoices presents it in every handshake."""

    def grab() -> bytes:
        address = marketplace.services["invoices"].host.address
        with socket.create_connection((address, MESH_PORT), timeout=5) as raw:
            with _context().wrap_socket(raw) as tls:
                der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der

    return x509.load_der_x509_certificate(marketplace.network.hosts["attacker"].call(grab))


def _attempts(marketplace: MeshHosts, tmp: Path) -> dict[str, Callable[[], str]]:
    """What the attacker tries against items; every certificate claims invoices' identity,
    the one caller items accepts."""
    address = marketplace.services["items"].host.address
    key, ca_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(ca_key, uri=None)
    from_own_ca = _certificate(key, uri=spiffe_id("invoices"), issuer=("attacker CA", ca_key))
    self_signed = _certificate(key, uri=spiffe_id("invoices"))
    key_file = _write_pem(tmp / "attacker.key", key)
    own_ca = _write_pem(tmp / "own-ca.pem", from_own_ca, ca)
    forged = _write_pem(tmp / "self-signed.pem", self_signed)
    copied = _write_pem(tmp / "copied.pem", _copied_certificate(marketplace))

    def with_copied_certificate() -> str:
        try:
            context = _context(copied, key_file)
        except ssl.SSLError as exc:
            # Without invoices' key no TLS client can present invoices' certificate (it could
            # not sign the handshake); what remains to send is no certificate at all.
            refused = f"client cannot present it ({exc.reason})"
            return f"{refused}; without it: {_request(address, MESH_PORT, _context())()}"
        return _request(address, MESH_PORT, context)()

    return {
        "plaintext to a STRICT port": _request(address, MESH_PORT),
        "certificate from its own CA": _request(address, MESH_PORT, _context(own_ca, key_file)),
        "self-signed certificate with invoices' SPIFFE ID": _request(
            address, MESH_PORT, _context(forged, key_file)
        ),
        "invoices' copied certificate without its key": with_copied_certificate,
        "straight to the app's port, around the sidecar": _request(address, APP_PORT),
    }


# The counter of items' Envoy that must rise for each attempt: the refusal and its reason.
LISTENER = f"listener.{SUBNET}.{OCTETS['items']}_{MESH_PORT}"
EVIDENCE = {
    "plaintext to a STRICT port": f"{LISTENER}.ssl.connection_error",
    "certificate from its own CA": f"{LISTENER}.ssl.fail_verify_error",
    "self-signed certificate with invoices' SPIFFE ID": f"{LISTENER}.ssl.fail_verify_error",
    "invoices' copied certificate without its key": f"{LISTENER}.ssl.fail_verify_no_cert",
    "straight to the app's port, around the sidecar": (
        "tcp.virtual-inbound_blackhole.downstream_cx_total"
    ),
}


def test_attacker_gets_nothing_and_each_refusal_is_recorded(
    marketplace: MeshHosts, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    items = marketplace.services["items"]
    attacker = marketplace.network.hosts["attacker"]
    # The app does listen on every interface: only the interception stands in the way.
    assert items.host.status(f"http://127.0.0.1:{APP_PORT}/items") == 200
    lines = []
    for name, attempt in _attempts(marketplace, tmp_path).items():
        counter = EVIDENCE[name]
        before = items.stats(f"^{_regex(counter)}$").get(counter, 0)
        seen = attacker.call(attempt)
        after = items.stats(f"^{_regex(counter)}$").get(counter, 0)
        lines.append(f"{name}: attacker saw '{seen}'; items' sidecar: {counter} {before}->{after}")
        assert seen.startswith("refused") or "without it: refused" in seen, (name, seen)
        assert after > before, (name, counter)
    report(request, "attacker attempts against items:\n" + "\n".join(lines))


def _regex(name: str) -> str:
    return name.replace(".", r"\.").replace("|", r"\|")


STOLEN_TOKEN_ATTACK = """
import asyncio, json, sys
from pathlib import Path
from verity.dataplane.cpclient import CaClient, ControlPlaneError, ControlPlaneTarget
from verity.dataplane.keys import WorkloadKey
from cryptography import x509

host, port, ca_file, token_file, dataplane_file, wanted = sys.argv[1:7]
target = ControlPlaneTarget(host=host, port=int(port), ca_pem=Path(ca_file).read_bytes())

async def main():
    client = CaClient(target, Path(token_file).read_text().strip())
    outcome = {}
    try:
        await client.register_dataplane(Path(dataplane_file).read_text())
        outcome["register"] = "accepted"
    except ControlPlaneError as exc:
        outcome["register"] = f"{exc.code}: {exc}"
    try:
        signed = await client.sign_certificate(WorkloadKey.generate().build_csr(wanted))
        leaf = x509.load_pem_x509_certificate(signed.certificate_pem)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        outcome["issued_to"] = san.get_values_for_type(x509.UniformResourceIdentifier)
    except ControlPlaneError as exc:
        outcome["issued_to"] = f"{exc.code}: {exc}"
    await client.close()
    print(json.dumps(outcome))

asyncio.run(main())
"""


@dataclass
class StolenTokenAttack:
    outcome: dict[str, Any]  # what the attacker got back
    cp_records: list[dict[str, Any]]  # what the control plane logged meanwhile


@pytest.fixture(scope="module")
def stolen_token(marketplace: MeshHosts, request: pytest.FixtureRequest) -> StolenTokenAttack:
    """From the attacker's host, items' dataplane token asks the control plane to register
    invoices' Dataplane and to sign a CSR for invoices' SPIFFE ID."""
    attacker = marketplace.network.hosts["attacker"]
    items, invoices = marketplace.services["items"], marketplace.services["invoices"]
    logged_before = len(marketplace.cp_log.read_text().splitlines())
    result = attacker.run(
        [
            *(sys.executable, "-c", STOLEN_TOKEN_ATTACK),
            *(marketplace.cp_host.address, str(CP_GRPC_PORT)),
            str(marketplace.data_dir / "cp-ca.pem"),
            *(str(items.token_file), str(invoices.dataplane_file), spiffe_id("invoices")),
        ]
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    report(request, f"items' token asking for invoices' identity: {outcome}")
    wait_until(lambda: "certificate issued" in _new_cp_text(marketplace, logged_before), 5, "log")
    records = [
        json.loads(line)
        for line in marketplace.cp_log.read_text().splitlines()[logged_before:]
        if line.startswith("{")
    ]
    return StolenTokenAttack(outcome, records)


def _new_cp_text(marketplace: MeshHosts, skip: int) -> str:
    return "\n".join(marketplace.cp_log.read_text().splitlines()[skip:])


def test_stolen_items_token_cannot_get_invoices_identity(stolen_token: StolenTokenAttack) -> None:
    outcome = stolen_token.outcome
    assert outcome["register"].startswith("PERMISSION_DENIED"), outcome
    assert "service account items" in outcome["register"]  # the refusal says why
    assert outcome["issued_to"] == [spiffe_id("items")], outcome  # the token's identity wins
    assert any(
        record.get("msg") == "certificate issued"
        and record.get("spiffe_id") == spiffe_id("items")
        and record.get("token_name") == "items-dataplane"
        for record in stolen_token.cp_records
    ), stolen_token.cp_records


def test_refused_registration_is_in_the_control_plane_log(stolen_token: StolenTokenAttack) -> None:
    """The refusal is recorded where the operator looks, with the token and the reason."""
    refusals = [
        record
        for record in stolen_token.cp_records
        if "items-dataplane" in json.dumps(record)
        and any(word in json.dumps(record).lower() for word in ("denied", "refused"))
    ]
    assert refusals, stolen_token.cp_records


def test_app_cannot_reach_outside_the_mesh(marketplace: MeshHosts) -> None:
    """Interception covers every outbound connection: a compromised app that dials an address
    outside the mesh reaches its own sidecar, which (egress DENY) closes it."""
    attacker = marketplace.network.hosts["attacker"]
    items = marketplace.services["items"]
    listener = attacker.call(lambda: _listen(9999))
    try:
        seen = items.host.call(_request(attacker.address, 9999))
        assert seen.startswith("refused"), seen
        listener.settimeout(1)
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing ever arrived
    finally:
        listener.close()
    counter = "tcp.virtual-outbound_blackhole.downstream_cx_total"
    assert items.stats(f"^{_regex(counter)}$")[counter] >= 1


def _listen(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))  # noqa: S104 - the attacker host's own address
    sock.listen()
    return sock


# --- restarts -----------------------------------------------------------------------------------


def test_sigkilled_host_rejoins_within_seconds(
    marketplace: MeshHosts, request: pytest.FixtureRequest
) -> None:
    users = marketplace.services["users"]
    assert users.agent is not None
    assert marketplace.call("invoices", "users")[0] == 200
    users.agent.send_signal(signal.SIGKILL)
    users.agent.wait(timeout=10)
    # Envoy went with its agent, and the rules stayed: users is closed, not open.
    wait_until(
        lambda: users.host.status(f"http://127.0.0.1:{ADMIN_PORT}/ready", timeout=1) == 0,
        10,
        "users' Envoy gone",
    )
    assert "VERITY_INBOUND" in users.host.nat_table()
    assert marketplace.call("invoices", "users")[0] != 200

    started = time.monotonic()
    marketplace.start_agent(users)
    elapsed = wait_until(
        lambda: marketplace.call("invoices", "users")[0] == 200, 30, "users serving again"
    )
    report(request, f"users restarted after SIGKILL: serving again in {elapsed:.2f}s")
    assert time.monotonic() - started < 15
    nat = users.host.nat_table()
    assert nat.count("-j VERITY_INBOUND") == 1 and nat.count("-j VERITY_OUTPUT") == 1, nat
    assert "replacing interception rules left by an earlier agent" in users.log()
    assert marketplace.call("users", "invoices")[0] == 200


def test_sigterm_removes_the_rules(marketplace: MeshHosts) -> None:
    items = marketplace.services["items"]
    assert items.agent is not None and "VERITY_OUTPUT" in items.host.nat_table()
    assert stop_process(items.agent) == 0
    assert "VERITY_" not in items.host.nat_table()
    assert "interception rules removed" in items.log()
