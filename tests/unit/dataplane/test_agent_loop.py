"""The Agent's I/O loop in-process: enrolment, SDS, renewal, root changes, reports gated on
Envoy's ACK, retries, shutdown, and no token in any log record.

The control plane and Envoy are test doubles here (no processes in unit tests); issuance is
real (`verity.pki`) and so are the SDS server and the readiness endpoint. The same paths run
against a real Envoy and a real TLS control plane in tests/e2e/test_agent_local.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from verity.dataplane.agent import (
    Agent,
    AgentConfig,
    AgentFatal,
    BundleWatch,
    RenewalPolicy,
    prepare_work_dir,
)
from verity.dataplane.cpclient import (
    AgentReport,
    BundleUpdate,
    ControlPlaneTarget,
    PermissionDenied,
    Registration,
    SignedCertificate,
    Unauthenticated,
    Unavailable,
)
from verity.dataplane.envoy import EnvoyOptions
from verity.dataplane.sds import BUNDLE_SECRET, CERT_SECRET, SECRET_TYPE_URL
from verity.observe.logs import JsonFormatter
from verity.pki import (
    CertificateAuthority,
    SpiffeId,
    TrustBundle,
    generate_builtin_ca,
    issue_svid,
)
from verity.resources import Dataplane, load_documents

TOKEN = "plain-agent-token-0b9f3e77"  # not token-shaped: only the agent's care hides it
IDENTITY = SpiffeId.build("cluster.local", "shop", "web")
DATAPLANE_YAML = """\
apiVersion: verity.dev/v1alpha1
kind: Dataplane
metadata: {name: web-1, namespace: shop}
spec:
  service: web
  serviceAccount: web
  address: 127.0.0.1
  inbound: [{port: 8080, appPort: 3000, protocol: http}]
"""


# ---------------------------------------------------------------------------------------------
# Doubles


class FakeWatch:
    def __init__(self, reports: list[AgentReport]) -> None:
        self.queue: asyncio.Queue[BundleUpdate | Exception] = asyncio.Queue()
        self._reports = reports
        self.cancelled = False

    async def send(self, report: AgentReport) -> None:
        self._reports.append(report)

    def __aiter__(self) -> AsyncIterator[BundleUpdate]:
        return self._updates()

    async def _updates(self) -> AsyncIterator[BundleUpdate]:
        while True:
            item = await self.queue.get()
            if isinstance(item, Exception):
                raise item
            yield item

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeControlPlane:
    lifetime: timedelta = timedelta(hours=1)
    ca: CertificateAuthority = field(
        default_factory=lambda: generate_builtin_ca("default", "cluster.local", datetime.now(UTC))
    )
    signing: CertificateAuthority | None = None
    bundle: TrustBundle | None = None
    signing_fingerprint: str | None = None
    failures: dict[str, list[Exception]] = field(default_factory=dict)
    always_fail: dict[str, Exception] = field(default_factory=dict)
    registrations: list[str] = field(default_factory=list)
    csrs: list[bytes] = field(default_factory=list)
    serials: list[int] = field(default_factory=list)
    reports: list[AgentReport] = field(default_factory=list)
    watches: list[FakeWatch] = field(default_factory=list)
    closed: bool = False

    def __post_init__(self) -> None:
        self.signing = self.signing or self.ca
        self.bundle = self.bundle or self.ca.trust_bundle

    def _maybe_fail(self, method: str) -> None:
        if method in self.always_fail:
            raise self.always_fail[method]
        queued = self.failures.get(method)
        if queued:
            raise queued.pop(0)

    def update(self) -> BundleUpdate:
        assert self.bundle is not None and self.signing is not None
        return BundleUpdate(
            trust_domain="cluster.local",
            trust_bundle_pem=self.bundle.pem,
            rotation_stage="stable",
            signing_root_fingerprint=self.signing_fingerprint
            or self.signing.root_fingerprint_sha256,
        )

    def push(self) -> None:
        for watch in self.watches:
            watch.queue.put_nowait(self.update())

    def rotate(self) -> CertificateAuthority:
        new = generate_builtin_ca("default", "cluster.local", datetime.now(UTC))
        assert self.bundle is not None
        self.bundle = self.bundle.with_root(new.certificate)
        self.signing = new
        self.push()
        return new

    async def register_dataplane(self, dataplane_yaml: str) -> Registration:
        self._maybe_fail("register")
        self.registrations.append(dataplane_yaml)
        return Registration("shop", "web-1", len(self.registrations))

    async def sign_certificate(self, csr_pem: bytes) -> SignedCertificate:
        self._maybe_fail("sign")
        assert self.signing is not None and self.bundle is not None
        self.csrs.append(csr_pem)
        issued = issue_svid(self.signing, csr_pem, IDENTITY, datetime.now(UTC), self.lifetime)
        self.serials.append(issued.serial)
        return SignedCertificate(
            spiffe_id=str(IDENTITY),
            certificate_pem=issued.cert_pem,
            chain_pem=b"",
            trust_bundle_pem=self.bundle.pem,
            not_before=issued.not_before,
            not_after=issued.not_after,
            serial_hex=f"{issued.serial:x}",
        )

    async def get_trust_bundle(self) -> BundleUpdate:
        self._maybe_fail("bundle")
        return self.update()

    def watch_trust_bundle(self) -> BundleWatch:
        watch = FakeWatch(self.reports)
        watch.queue.put_nowait(self.update())
        self.watches.append(watch)
        return watch

    async def close(self) -> None:
        self.closed = True


@dataclass
class FakeResponse:
    status_code: int
    text: str = ""
    body: Any = None

    def json(self) -> Any:
        return self.body


class FakeEnvoy:
    """Stands in for EnvoyProcess: live, with one listener, from start to stop."""

    def __init__(self, options: EnvoyOptions) -> None:
        self.options = options
        self.started = False
        self.stopped_draining: bool | None = None

    async def start(self) -> None:
        self.started = True

    async def stop(self, *, drain: bool = False) -> int | None:
        self.stopped_draining = drain
        self.started = False
        return 0

    async def admin_get(self, path: str) -> FakeResponse:
        if not self.started:
            raise httpx.ConnectError("not running")
        if path == "/ready":
            return FakeResponse(200, "LIVE")
        return FakeResponse(200, body={"listener_statuses": [{"name": "inbound:8080"}]})


# ---------------------------------------------------------------------------------------------
# Running the agent


@dataclass
class Running:
    agent: Agent
    cp: FakeControlPlane
    config: AgentConfig
    stop: asyncio.Event
    task: asyncio.Task[None]
    envoys: list[FakeEnvoy]

    async def until(self, condition: Callable[[], bool], what: str, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.task.done():
                self.task.result()
                raise AssertionError(f"the agent stopped before {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.01)

    async def ready(self) -> None:
        deadline = time.monotonic() + 5
        while not (await self.agent.readiness()).ready:
            assert time.monotonic() < deadline, (await self.agent.readiness()).reason
            await asyncio.sleep(0.01)

    async def finish(self) -> None:
        self.stop.set()
        async with asyncio.timeout(5):
            await self.task


def make_config(tmp_path: Path, ca_pem: bytes, **overrides: Any) -> AgentConfig:
    (dataplane,) = load_documents(DATAPLANE_YAML)
    assert isinstance(dataplane, Dataplane)
    work_dir, _ = prepare_work_dir(tmp_path / "w")
    fields: dict[str, Any] = {
        "dataplane": dataplane,
        "dataplane_yaml": DATAPLANE_YAML,
        "control_plane": ControlPlaneTarget(host="127.0.0.1", port=5678, ca_pem=ca_pem),
        "work_dir": work_dir,
        "admin_port": 19901,
        "ready_port": 0,
        "key_file": tmp_path / "workload.key",
        "retry_initial_s": 0.01,
        "retry_max_s": 0.05,
    }
    fields.update(overrides)
    return AgentConfig(**fields)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    runs: list[Running] = []

    def _start(cp: FakeControlPlane | None = None, **overrides: Any) -> Running:
        cp = cp or FakeControlPlane()
        config = make_config(tmp_path, cp.ca.certificate_pem, **overrides)
        envoys: list[FakeEnvoy] = []

        def factory(options: EnvoyOptions) -> FakeEnvoy:
            envoys.append(FakeEnvoy(options))
            return envoys[-1]

        agent = Agent(config, TOKEN, client=cp, envoy_factory=factory)
        stop = asyncio.Event()
        run = Running(agent, cp, config, stop, asyncio.create_task(agent.run(stop)), envoys)
        runs.append(run)
        return run

    yield _start
    for run in runs:
        run.task.cancel()


async def fetch_served_serial(socket_path: Path) -> int:
    """Ask the agent's SDS server, as Envoy would, for the certificate it serves."""
    async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        reply = await stub.FetchSecrets(
            discovery_pb2.DiscoveryRequest(resource_names=[CERT_SECRET], type_url=SECRET_TYPE_URL)
        )
    secret = secret_pb2.Secret()
    reply.resources[0].Unpack(secret)
    chain = secret.tls_certificate.certificate_chain.inline_bytes
    return x509.load_pem_x509_certificate(chain).serial_number


# ---------------------------------------------------------------------------------------------
# Tests


async def test_enrols_serves_over_sds_and_stops_cleanly(start: Callable[..., Running]) -> None:
    run = start()
    await run.ready()
    cp, config, agent = run.cp, run.config, run.agent
    assert cp.registrations == [DATAPLANE_YAML]
    assert b"PRIVATE KEY" not in cp.csrs[0]
    assert agent.certificate is not None
    assert await fetch_served_serial(config.work_dir / "sds.sock") == cp.serials[-1]

    key_file = config.key_file
    assert key_file is not None and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert key.public_key() == agent.certificate.secret.leaf.public_key()

    bootstrap_path = config.work_dir / "envoy-bootstrap.json"
    assert stat.S_IMODE(bootstrap_path.stat().st_mode) == 0o600
    bootstrap = json.loads(bootstrap_path.read_text())
    assert bootstrap["node"]["id"] == "shop/web-1"
    (envoy,) = run.envoys
    assert envoy.options.concurrency == 1 and envoy.options.bootstrap == bootstrap_path
    ads = bootstrap["dynamic_resources"]["lds_config"]
    assert 1 <= float(ads["initial_fetch_timeout"].rstrip("s")) <= 3

    # The watch's first update was applied (no Envoy subscribed yet) and reported.
    await run.until(lambda: bool(cp.reports), "a report")
    report = cp.reports[-1]
    assert report.dataplane == "shop/web-1"
    assert report.applied_root_fingerprints == (cp.ca.root_fingerprint_sha256,)
    assert report.leaf_root_fingerprint == cp.ca.root_fingerprint_sha256
    assert report.leaf_serial_hex == f"{cp.serials[-1]:x}"

    await run.finish()
    assert envoy.stopped_draining is True
    assert cp.closed and cp.watches[-1].cancelled
    assert not bootstrap_path.exists()
    assert not (config.work_dir / "sds.sock").exists()


async def test_renews_with_a_fresh_key_and_reports_each_renewal(
    start: Callable[..., Running],
) -> None:
    cp = FakeControlPlane(lifetime=timedelta(seconds=3))
    run = start(cp, renewal=RenewalPolicy(remaining_fraction=0.9, jitter_fraction=0.05))
    await run.until(lambda: len(cp.serials) >= 3, "two renewals")
    await run.until(lambda: any(r.leaf_serial_hex == f"{cp.serials[2]:x}" for r in cp.reports), "")
    keys = {
        x509.load_pem_x509_csr(csr)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        for csr in cp.csrs
    }
    assert len(keys) == len(cp.csrs)  # a new key for every certificate
    assert run.agent.renewals >= 2
    await run.finish()


async def test_root_change_renews_at_once_and_reports_the_new_root(
    start: Callable[..., Running],
) -> None:
    cp = FakeControlPlane()
    run = start(cp)
    await run.until(lambda: bool(cp.reports), "the first report")
    old = cp.ca.root_fingerprint_sha256
    new = cp.rotate().root_fingerprint_sha256
    await run.until(
        lambda: any(
            r.leaf_root_fingerprint == new and set(r.applied_root_fingerprints) == {old, new}
            for r in cp.reports
        ),
        "a report of the new root",
    )
    assert len(cp.serials) == 2
    await run.finish()


async def test_an_unreachable_signing_root_renews_once_not_in_a_loop(
    start: Callable[..., Running],
) -> None:
    cp = FakeControlPlane()
    run = start(cp)
    await run.until(lambda: bool(cp.reports), "the first report")
    cp.signing_fingerprint = "cc" * 32  # a root the leaves never chain to
    cp.push()
    await run.until(lambda: len(cp.serials) == 2, "one renewal")
    cp.push()
    await asyncio.sleep(0.3)
    assert len(cp.serials) == 2
    await run.finish()


def bundle_request(version: str = "", nonce: str = "") -> Any:
    return discovery_pb2.DiscoveryRequest(
        node={"id": "shop/web-1"},
        resource_names=[BUNDLE_SECRET],
        type_url=SECRET_TYPE_URL,
        version_info=version,
        response_nonce=nonce,
    )


async def test_report_waits_for_envoy_to_ack_the_bundle(start: Callable[..., Running]) -> None:
    cp = FakeControlPlane()
    run = start(cp)
    await run.until(lambda: bool(cp.reports), "the first report")
    socket_path = run.config.work_dir / "sds.sock"
    async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
        # Envoy's side of SDS: subscribe, ACK what is pushed only when the test says so.
        stream = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets()

        async def ack(response: Any) -> None:
            await stream.write(bundle_request(response.version_info, response.nonce))

        await stream.write(bundle_request())
        await ack(await asyncio.wait_for(stream.read(), 2))
        new = cp.rotate().root_fingerprint_sha256
        pushed = await asyncio.wait_for(stream.read(), 2)
        await asyncio.sleep(0.3)
        assert not any(new in r.applied_root_fingerprints for r in cp.reports)
        await ack(pushed)
        await run.until(
            lambda: any(new in r.applied_root_fingerprints for r in cp.reports), "the report"
        )
        stream.cancel()
    await run.finish()


async def test_refused_registration_is_fatal_and_starts_nothing(
    start: Callable[..., Running],
) -> None:
    cp = FakeControlPlane()
    cp.always_fail["register"] = PermissionDenied(
        "the control plane refused (permission denied): the token is for namespace billing"
    )
    run = start(cp)
    with pytest.raises(AgentFatal, match=r"could not register the Dataplane.*namespace billing"):
        async with asyncio.timeout(5):
            await run.task
    assert run.envoys == [] and cp.csrs == []
    assert not (run.config.work_dir / "sds.sock").exists()


async def test_an_unreachable_control_plane_is_retried(start: Callable[..., Running]) -> None:
    cp = FakeControlPlane()
    cp.failures["register"] = [Unavailable("the control plane is unreachable")] * 3
    cp.failures["sign"] = [Unavailable("the control plane is unreachable")] * 2
    run = start(cp)
    await run.ready()
    assert len(cp.registrations) == 1 and len(cp.serials) == 1
    await run.finish()


async def test_stop_while_waiting_for_the_control_plane(start: Callable[..., Running]) -> None:
    cp = FakeControlPlane()
    cp.always_fail["register"] = Unavailable("the control plane is unreachable")
    run = start(cp)
    await asyncio.sleep(0.1)
    assert not (await run.agent.readiness()).ready
    await run.finish()
    assert run.envoys == []


async def test_failed_renewals_keep_the_current_certificate(
    start: Callable[..., Running],
) -> None:
    cp = FakeControlPlane(lifetime=timedelta(seconds=30))
    run = start(cp, renewal=RenewalPolicy(remaining_fraction=0.99, jitter_fraction=0.0))
    await run.ready()
    held = run.agent.certificate
    cp.always_fail["sign"] = Unavailable("the control plane is unreachable")
    await asyncio.sleep(0.5)
    assert run.agent.certificate is held
    assert (await run.agent.readiness()).ready
    assert await fetch_served_serial(run.config.work_dir / "sds.sock") == cp.serials[0]
    del cp.always_fail["sign"]
    await run.until(lambda: len(cp.serials) == 2, "a renewal once the control plane is back")
    await run.finish()


async def test_a_lost_watch_reconnects(start: Callable[..., Running]) -> None:
    cp = FakeControlPlane()
    run = start(cp)
    await run.until(lambda: len(cp.watches) == 1 and bool(cp.reports), "the first watch")
    cp.watches[0].queue.put_nowait(Unavailable("the control plane ended the stream"))
    await run.until(lambda: len(cp.watches) == 2, "a second watch")
    assert cp.watches[0].cancelled
    await run.finish()


class RecordAll(logging.Handler):
    """Keeps every record's message and fields, before any scrubbing, and the JSON lines."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.raw: list[str] = []
        self.json = io.StringIO()
        self._formatter = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.raw.append(record.getMessage() + repr(vars(record)))
        self.json.write(self._formatter.format(record) + "\n")


async def test_the_token_is_never_logged(start: Callable[..., Running]) -> None:
    recorder = RecordAll()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(recorder)
    root.setLevel(logging.DEBUG)
    try:
        cp = FakeControlPlane(lifetime=timedelta(seconds=3))
        cp.failures["sign"] = [Unavailable("unreachable")]
        run = start(cp, renewal=RenewalPolicy(remaining_fraction=0.9, jitter_fraction=0.0))
        await run.until(lambda: len(cp.serials) >= 2, "a renewal")
        cp.always_fail["sign"] = Unauthenticated("the control plane did not accept the token")
        await asyncio.sleep(0.3)
        await run.finish()
        assert TOKEN not in repr(run.agent) and TOKEN not in repr(run.config)
    finally:
        root.removeHandler(recorder)
        root.setLevel(previous)
    assert recorder.raw, "nothing was logged"
    assert not [line for line in recorder.raw if TOKEN in line]
    assert TOKEN not in recorder.json.getvalue()
    assert "PRIVATE KEY" not in recorder.json.getvalue()
