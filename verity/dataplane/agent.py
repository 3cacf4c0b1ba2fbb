"""The data-plane agent: enrols the workload with the control plane and runs its Envoy.

What it does, in order: register the Dataplane; make a private key on this host and have a
CSR for it signed (the control plane never sees the key); serve key, chain and trust bundle
to Envoy over the local SDS socket; write Envoy's bootstrap and supervise Envoy. Then, for as
long as it runs: renew the certificate before it expires (and at once when the mesh starts
signing with another root), keep the trust-bundle watch open, apply each bundle and report
what Envoy has ACKed (the reports gate root rotation on the control plane), and answer
/healthz and /ready.

The decisions (when to renew, whether a root change needs a new leaf, what a report says,
which root a chain ends at) are small pure functions with `now` passed in; `Agent` is the I/O
loop around them. If the control plane goes away, Envoy keeps serving with what it holds and
the agent retries with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization

from verity.dataplane.bootstrap import BootstrapParams, ControlPlaneEndpoint, write_bootstrap
from verity.dataplane.cpclient import (
    AgentReport,
    BundleUpdate,
    CaClient,
    ControlPlaneError,
    ControlPlaneTarget,
    Registration,
    SignedCertificate,
)
from verity.dataplane.envoy import EnvoyOptions, EnvoyProcess
from verity.dataplane.keys import KeyAlgorithm, WorkloadKey
from verity.dataplane.readiness import ReadinessServer, Verdict, evaluate, probe_envoy
from verity.dataplane.sds import (
    BUNDLE_SECRET,
    CERT_SECRET,
    CertificateSecret,
    InvalidSecret,
    SdsServer,
    SpiffeTrustBundle,
)
from verity.dataplane.transparent import (
    Interception,
    InterceptionError,
    InterceptionPlan,
    Interceptor,
)
from verity.resources import Dataplane

log = logging.getLogger("verity.agent")

T = TypeVar("T")

SDS_SOCKET = "sds.sock"
BOOTSTRAP_FILE = "envoy-bootstrap.json"
BUNDLE_ACK_TIMEOUT_S = 30.0
RENEWAL_RECHECK_S = 60.0
MAX_UNIX_SOCKET_PATH = 107


class BundleWatch(Protocol):
    """One trust-bundle stream (TrustBundleWatch is the real one)."""

    async def send(self, report: AgentReport) -> None: ...
    def __aiter__(self) -> AsyncIterator[BundleUpdate]: ...
    def cancel(self) -> None: ...


class CaService(Protocol):
    """What the agent needs of the control plane (CaClient is the real one)."""

    async def register_dataplane(self, dataplane_yaml: str) -> Registration: ...
    async def sign_certificate(self, csr_pem: bytes) -> SignedCertificate: ...
    async def get_trust_bundle(self) -> BundleUpdate: ...
    def watch_trust_bundle(self) -> BundleWatch: ...
    async def close(self) -> None: ...


class Envoy(Protocol):
    """What the agent needs of its Envoy (EnvoyProcess is the real one)."""

    async def start(self) -> None: ...
    async def stop(self, *, drain: bool = False) -> int | None: ...
    async def admin_get(self, path: str) -> Any: ...


class AgentFatal(Exception):
    """The agent cannot go on (the control plane refused it, Envoy cannot start): exit."""


class InvalidIssuance(ControlPlaneError):
    """The control plane's answer cannot be served (bad leaf, wrong key, already expired)."""


# ---------------------------------------------------------------------------------------------
# Pure decisions


@dataclass(frozen=True)
class RenewalPolicy:
    """Renew when `remaining_fraction` of the lifetime is left, or earlier by up to
    `jitter_fraction` of the time until then (so a fleet started together does not renew
    together). The defaults renew a 24 h certificate between 13.6 h and 16 h."""

    remaining_fraction: float = 1 / 3
    jitter_fraction: float = 0.15

    def __post_init__(self) -> None:
        if not 0 < self.remaining_fraction < 1:
            raise ValueError("renewal: the remaining fraction must be between 0 and 1")
        if not 0 <= self.jitter_fraction < 1:
            raise ValueError("renewal: the jitter fraction must be at least 0 and below 1")


def renewal_time(
    *,
    received_at: datetime,
    not_before: datetime,
    not_after: datetime,
    policy: RenewalPolicy,
    jitter: float,
) -> datetime:
    """When to renew a certificate valid [not_before, not_after), received at `received_at`.

    The lifetime counts from when the certificate was received, not from its not_before: CAs
    backdate not_before for clock skew (five minutes here), which would otherwise eat a short
    lifetime and renew a fresh certificate at once. `jitter` is a random value in [0, 1).
    """
    start = min(max(not_before, received_at), not_after)
    lifetime = not_after - start
    earlier = policy.jitter_fraction * min(max(jitter, 0.0), 1.0)
    return start + lifetime * (1 - policy.remaining_fraction) * (1 - earlier)


def renewal_delay(
    now: datetime, held: HeldCertificate, policy: RenewalPolicy, jitter: float
) -> float:
    """Seconds from `now` until `held` should be renewed (0 if that time has passed)."""
    when = renewal_time(
        received_at=held.received_at,
        not_before=held.not_before,
        not_after=held.not_after,
        policy=policy,
        jitter=jitter,
    )
    return max(0.0, (when - now).total_seconds())


def backoff_delay(attempt: int, *, initial: float, maximum: float, jitter: float) -> float:
    """Exponential backoff for retry `attempt` (1-based), with up to +20% `jitter` ([0, 1))."""
    base = min(maximum, initial * 2 ** min(max(0, attempt - 1), 32))
    return float(min(maximum, base * (1 + 0.2 * jitter)))


def normalize_fingerprint(fingerprint: str) -> str:
    """Lowercase hex without separators or a `sha256:` prefix, so formats compare equal."""
    text = fingerprint.strip().lower().removeprefix("sha256:")
    return text.replace(":", "")


def root_change_needs_renewal(
    signing_root: str, leaf_root: str, already_renewed_for: str | None
) -> bool:
    """Whether a bundle update's signing root means the leaf must be renewed now.

    Only once per signing root: if the new leaf still does not chain to it (the control plane
    is mid-switch, or the chain is odd), the regular schedule takes over rather than a storm.
    """
    signing = normalize_fingerprint(signing_root)
    if not signing or signing == normalize_fingerprint(leaf_root):
        return False
    return signing != already_renewed_for


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the DER, lowercase hex: the form the control plane's messages use."""
    return certificate.fingerprint(hashes.SHA256()).hex()


def _is_self_signed(certificate: x509.Certificate) -> bool:
    return certificate.issuer == certificate.subject and _signed_by(certificate, certificate)


def _signed_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def served_chain(certificate_pem: bytes, chain_pem: bytes) -> list[x509.Certificate]:
    """The chain Envoy serves: the leaf, then intermediates; never a root, never twice.

    Roots travel in the trust bundle; a control plane that also puts the leaf or the root in
    `chain_pem` is tolerated.
    """
    leaf = x509.load_pem_x509_certificate(certificate_pem)
    extra = x509.load_pem_x509_certificates(chain_pem) if chain_pem.strip() else []
    chain = [leaf]
    for certificate in extra:
        if certificate in chain or _is_self_signed(certificate):
            continue
        chain.append(certificate)
    return chain


def chain_root_fingerprint(
    chain: Sequence[x509.Certificate], roots: Iterable[x509.Certificate]
) -> str:
    """The fingerprint of the root in `roots` that signed the top of `chain`; "" if none."""
    top = chain[-1]
    for root in roots:
        if top.issuer == root.subject and _signed_by(top, root):
            return fingerprint(root)
    return ""


def spiffe_id_of(certificate: x509.Certificate) -> str:
    """The single spiffe:// URI SAN of a leaf; ValueError if it does not have exactly one."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError("the leaf has no subjectAltName") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or not uris[0].startswith("spiffe://"):
        raise ValueError("the leaf must carry exactly one spiffe:// URI SAN")
    return uris[0]


@dataclass(frozen=True)
class HeldCertificate:
    """The SVID the agent serves, with the facts it reports; the key stays inside `secret`."""

    secret: CertificateSecret
    spiffe_id: str
    not_before: datetime
    not_after: datetime
    received_at: datetime
    root_fingerprint: str  # "" if it chains to no root the agent knows

    @property
    def serial_hex(self) -> str:
        return f"{self.secret.serial:x}"

    def valid_at(self, now: datetime) -> bool:
        return self.not_before <= now < self.not_after


def held_certificate(
    signed: SignedCertificate,
    key: WorkloadKey,
    *,
    received_at: datetime,
    roots: Iterable[x509.Certificate],
) -> HeldCertificate:
    """Check a signing answer and turn it into what the agent serves (InvalidIssuance if it
    cannot be served). Dates and serial come from the certificate itself, not the message."""
    try:
        chain = served_chain(signed.certificate_pem, signed.chain_pem)
        leaf = chain[0]
        spiffe_id = spiffe_id_of(leaf)
        chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
        secret = CertificateSecret.from_key(key, chain_pem)
    except (ValueError, InvalidSecret) as exc:
        raise InvalidIssuance(f"the issued certificate cannot be served: {exc}") from None
    if leaf.not_valid_after_utc <= received_at:
        raise InvalidIssuance("the issued certificate has already expired")
    return HeldCertificate(
        secret=secret,
        spiffe_id=spiffe_id,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        received_at=received_at,
        root_fingerprint=chain_root_fingerprint(chain, roots),
    )


def build_report(
    dataplane: str, applied_roots: Sequence[str], held: HeldCertificate
) -> AgentReport:
    return AgentReport(
        dataplane=dataplane,
        applied_root_fingerprints=tuple(applied_roots),
        leaf_root_fingerprint=held.root_fingerprint,
        leaf_serial_hex=held.serial_hex,
        leaf_not_after_unix=int(held.not_after.timestamp()),
    )


def expects_listeners(dataplane: Dataplane) -> bool:
    """Whether the control plane will give this proxy listeners (so readiness waits for them)."""
    spec = dataplane.spec
    return bool(spec.inbound or spec.outbound or spec.transparent_proxy.enabled)


# ---------------------------------------------------------------------------------------------
# Configuration


def prepare_work_dir(path: Path | None) -> tuple[Path, bool]:
    """The agent's private directory (0700): `path`, created if missing, or a fresh temporary
    one. Returns it and whether it is the temporary one (which the agent removes at exit; a
    chosen directory is kept, it may hold other files)."""
    if path is None:
        return Path(tempfile.mkdtemp(prefix="verity-dataplane-")).absolute(), True
    path = path.absolute()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise PermissionError(f"{path}: must be a directory owned by this user")
    if info.st_mode & 0o077:
        raise PermissionError(
            f"{path}: open to others (mode {stat.S_IMODE(info.st_mode):o}); "
            "it holds the SDS socket and the token, make it 0700"
        )
    if len(os.fsencode(path / SDS_SOCKET)) > MAX_UNIX_SOCKET_PATH:
        raise ValueError(f"{path}: too long a path for the SDS socket; use a shorter one")
    return path, False


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    dataplane: Dataplane
    dataplane_yaml: str = field(repr=False)
    control_plane: ControlPlaneTarget
    work_dir: Path
    remove_work_dir: bool = False
    admin_port: int = 9901
    ready_port: int | None = None  # None: admin_port + 1
    concurrency: int = 1
    key_file: Path | None = None
    key_algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256
    renewal: RenewalPolicy = RenewalPolicy()
    drain_time_s: int = 5
    initial_fetch_timeout_s: float = 2.5
    envoy_log_level: str = "warn"
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0
    interception: InterceptionPlan | None = None  # --transparent: the iptables rules

    @property
    def node_id(self) -> str:
        return f"{self.dataplane.namespace}/{self.dataplane.name}"

    @property
    def effective_ready_port(self) -> int:
        return self.ready_port if self.ready_port is not None else self.admin_port + 1


# ---------------------------------------------------------------------------------------------
# The agent


class Agent:
    """Runs one dataplane: `await agent.run(stop)` until `stop` is set.

    Must run on the main thread's event loop: Envoy is spawned from it and dies with it.
    """

    def __init__(
        self,
        config: AgentConfig,
        token: str,
        *,
        client: CaService | None = None,
        envoy_factory: Callable[[EnvoyOptions], Envoy] = EnvoyProcess,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        interceptor: Interceptor | None = None,
    ) -> None:
        self.config = config
        self._token = token
        self._client: CaService = (
            client if client is not None else CaClient(config.control_plane, token)
        )
        self._envoy_factory = envoy_factory
        plan = config.interception
        self._interceptor = interceptor or (Interception(plan) if plan is not None else None)
        self._now = clock
        self._random = secrets.SystemRandom()
        self._sds = SdsServer(config.work_dir / SDS_SOCKET)
        self._readiness = ReadinessServer(self.readiness, config.effective_ready_port)
        self._envoy: Envoy | None = None
        self._stop = asyncio.Event()
        self._renew_now = asyncio.Event()
        self._watch: BundleWatch | None = None
        self._held: HeldCertificate | None = None
        self._trust_domain = ""
        self._known_roots: dict[str, x509.Certificate] = {}
        self._applied_roots: tuple[str, ...] = ()
        self._root_renewal_for: str | None = None
        self._jitter = 0.0  # drawn per certificate, so rechecks keep its renewal time
        self._started_at = time.monotonic()
        self.renewals = 0
        self.reports_sent = 0

    def __repr__(self) -> str:
        return f"Agent({self.config.node_id})"

    # -- public view ----------------------------------------------------------------------------

    @property
    def certificate(self) -> HeldCertificate | None:
        return self._held

    @property
    def ready_port(self) -> int:
        return self._readiness.port

    @property
    def envoy(self) -> Envoy | None:
        return self._envoy

    async def readiness(self) -> Verdict:
        if self._stop.is_set():
            return Verdict(False, "shutting down")
        held = self._held
        envoy = self._envoy
        state = None if envoy is None else await probe_envoy(envoy.admin_get)
        return evaluate(
            envoy=state,
            validity=None if held is None else (held.not_before, held.not_after),
            now=self._now(),
            expect_listeners=expects_listeners(self.config.dataplane),
        )

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Enrol, start Envoy and keep it supplied until `stop` is set; then drain and clean up.

        Raises AgentFatal if the control plane refuses this dataplane or Envoy cannot start.
        """
        self._started_at = time.monotonic()
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(self._client.close)
            stack.callback(self._remove_private_files)
            # Before anything talks to the network; out only after Envoy has drained.
            self._intercept(stack)
            stack.push_async_callback(self._readiness.stop)
            await self._readiness.start()
            stack.push_async_callback(self._sds.stop)
            await self._sds.start()
            if not await _unless_stopped(stop, self._enrol()):
                self._stop.set()
                return
            stack.push_async_callback(self._stop_envoy)
            await self._start_envoy()
            tasks = [
                asyncio.create_task(self._renewal_loop(), name="agent-renewal"),
                asyncio.create_task(self._watch_loop(), name="agent-bundle-watch"),
                asyncio.create_task(self._monitor_readiness(), name="agent-readiness"),
            ]
            stack.push_async_callback(_cancel_all, tasks)
            await stop.wait()
            self._stop.set()
            log.info("stopping: draining Envoy", extra={"drain_time_s": self.config.drain_time_s})

    def _intercept(self, stack: contextlib.AsyncExitStack) -> None:
        """Install the interception rules, or stop here (fail closed). After a failure the
        rules are left as they are: whatever is in place (say, a killed agent's) still sends
        the app's traffic to the sidecar's ports, where nothing answers."""
        interceptor = self._interceptor
        if interceptor is None:
            return
        try:
            interceptor.install()
        except InterceptionError as exc:
            raise AgentFatal(f"transparent interception: {exc}") from None
        stack.callback(interceptor.remove)

    async def _enrol(self) -> None:
        yaml_text = self.config.dataplane_yaml
        registration = await self._retry(
            "register the Dataplane",
            lambda: self._client.register_dataplane(yaml_text),
            refusal_is_fatal=True,
        )
        log.info(
            "Dataplane registered",
            extra={
                "dataplane": f"{registration.namespace}/{registration.name}",
                "resource_version": registration.resource_version,
            },
        )
        bundle = await self._retry(
            "fetch the trust bundle", self._client.get_trust_bundle, refusal_is_fatal=True
        )
        if not bundle.trust_domain:
            raise AgentFatal("the control plane named no trust domain for this mesh")
        self._trust_domain = bundle.trust_domain
        try:
            self._push_bundle(bundle)
        except InvalidIssuance as exc:
            raise AgentFatal(str(exc)) from None
        held, key = await self._retry("get a certificate", self._issue, refusal_is_fatal=True)
        self._install(held, key)

    async def _start_envoy(self) -> None:
        config = self.config
        bootstrap = config.work_dir / BOOTSTRAP_FILE
        write_bootstrap(bootstrap, self._bootstrap_params())
        self._envoy = self._envoy_factory(
            EnvoyOptions(
                bootstrap=bootstrap,
                admin_port=config.admin_port,
                concurrency=config.concurrency,
                log_level=config.envoy_log_level,
                drain_time_s=config.drain_time_s,
                group=None if config.interception is None else config.interception.proxy_gid,
            )
        )
        try:
            await self._envoy.start()
        except OSError as exc:
            raise AgentFatal(f"could not start Envoy: {exc}") from None

    def _bootstrap_params(self) -> BootstrapParams:
        config, target = self.config, self.config.control_plane
        endpoint = ControlPlaneEndpoint(
            host=target.verified_name,
            address=target.host if target.server_name else None,
            port=target.port,
            token=self._token,
            ca_pem=target.ca_pem.decode(),
        )
        spec = config.dataplane.spec
        return BootstrapParams(
            namespace=config.dataplane.namespace,
            dataplane=config.dataplane.name,
            service=spec.service,
            mesh=spec.mesh,
            service_account=spec.service_account,
            sds_socket=self._sds.socket_path,
            control_plane=endpoint,
            admin_port=config.admin_port,
            initial_fetch_timeout_s=config.initial_fetch_timeout_s,
        )

    async def _stop_envoy(self) -> None:
        if self._envoy is not None:
            code = await self._envoy.stop(drain=True)
            log.info("Envoy stopped", extra={"exit_code": code})

    def _remove_private_files(self) -> None:
        # The bootstrap holds the token: it goes with the agent.
        with contextlib.suppress(FileNotFoundError):
            (self.config.work_dir / BOOTSTRAP_FILE).unlink()
        if self.config.remove_work_dir:
            shutil.rmtree(self.config.work_dir, ignore_errors=True)

    # -- retries --------------------------------------------------------------------------------

    async def _retry(
        self, what: str, call: Callable[[], Awaitable[T]], *, refusal_is_fatal: bool
    ) -> T:
        """`call()` until it succeeds; backoff on failures. A refusal (bad token, wrong
        identity, invalid request) is fatal at enrolment and retried slowly afterwards."""
        attempt = 0
        while True:
            try:
                return await call()
            except ControlPlaneError as exc:
                if not exc.retryable and refusal_is_fatal:
                    raise AgentFatal(f"could not {what}: {exc}") from None
                attempt += 1
                delay = self._backoff(attempt if exc.retryable else 1_000)
                log.log(
                    logging.WARNING if exc.retryable else logging.ERROR,
                    f"could not {what}; retrying",
                    extra={"error": str(exc), "attempt": attempt, "retry_in_s": round(delay, 2)},
                )
                await asyncio.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        return backoff_delay(
            attempt,
            initial=self.config.retry_initial_s,
            maximum=self.config.retry_max_s,
            jitter=self._random.random(),
        )

    # -- certificates ---------------------------------------------------------------------------

    def _spiffe_id(self) -> str:
        if self._held is not None:
            return self._held.spiffe_id
        return self.config.dataplane.spiffe_id(self._trust_domain)

    async def _issue(self) -> tuple[HeldCertificate, WorkloadKey]:
        """A fresh key (made here, never sent) and a certificate for it."""
        key = WorkloadKey.generate(self.config.key_algorithm)
        signed = await self._client.sign_certificate(key.build_csr(self._spiffe_id()))
        try:
            self._remember_roots(signed.trust_bundle_pem)
        except ValueError as exc:
            raise InvalidIssuance(f"the trust bundle sent with the certificate: {exc}") from None
        held = held_certificate(
            signed, key, received_at=self._now(), roots=self._known_roots.values()
        )
        return held, key

    def _install(self, held: HeldCertificate, key: WorkloadKey) -> None:
        if self.config.key_file is not None:
            key.write(self.config.key_file)
        version = self._sds.update(certificate=held.secret)
        self._held = held
        self._jitter = self._random.random()
        renew_at = renewal_time(
            received_at=held.received_at,
            not_before=held.not_before,
            not_after=held.not_after,
            policy=self.config.renewal,
            jitter=self._jitter,
        )
        log.info(
            "certificate installed",
            extra={
                "spiffe_id": held.spiffe_id,
                "serial": held.serial_hex,
                "not_after": held.not_after.isoformat(),
                "renew_after": renew_at.isoformat(),
                "root": held.root_fingerprint or "unknown",
                "sds_version": version.get(CERT_SECRET),
            },
        )
        if not held.root_fingerprint:
            log.warning("the issued certificate chains to no root of the trust bundle")

    async def _renewal_loop(self) -> None:
        while True:
            reason = await self._next_renewal()
            try:
                await self._renew(reason)
            except Exception:  # a bug must not stop renewals for good: log, try again later
                log.exception("certificate renewal failed")
                await asyncio.sleep(self.config.retry_max_s)

    async def _next_renewal(self) -> str:
        """Wait for the renewal point or a root change; returns which. The wait is cut into
        short pieces checked against the wall clock: timers of a suspended host stand still
        while certificates keep expiring."""
        while True:
            held = self._held
            assert held is not None
            delay = renewal_delay(self._now(), held, self.config.renewal, self._jitter)
            if delay <= 0:
                return "renewal point reached"
            if await _wait_event(self._renew_now, min(delay, RENEWAL_RECHECK_S)):
                self._renew_now.clear()
                return "signing root changed"

    async def _renew(self, reason: str) -> None:
        log.info("renewing the certificate", extra={"reason": reason})
        held, key = await self._retry("renew the certificate", self._issue, refusal_is_fatal=False)
        self._install(held, key)
        self.renewals += 1
        await self._report()

    # -- trust bundle ---------------------------------------------------------------------------

    def _remember_roots(self, bundle_pem: bytes) -> list[x509.Certificate]:
        roots = x509.load_pem_x509_certificates(bundle_pem) if bundle_pem.strip() else []
        for root in roots:
            self._known_roots.setdefault(fingerprint(root), root)
        return roots

    def _push_bundle(self, update: BundleUpdate) -> tuple[str, tuple[str, ...]]:
        """Serve the bundle over SDS; returns its SDS version and its root fingerprints."""
        domain = update.trust_domain or self._trust_domain
        try:
            roots = self._remember_roots(update.trust_bundle_pem)
            bundle = SpiffeTrustBundle({domain: update.trust_bundle_pem})
        except (ValueError, InvalidSecret) as exc:
            raise InvalidIssuance(f"the trust bundle cannot be served: {exc}") from None
        version = self._sds.update(trust_bundle=bundle)[BUNDLE_SECRET]
        return version, tuple(fingerprint(root) for root in roots)

    async def _watch_loop(self) -> None:
        attempt = 0
        while True:
            watch = self._client.watch_trust_bundle()
            self._watch = watch
            try:
                async for update in watch:
                    attempt = 0
                    await self._apply_bundle(update)
            except ControlPlaneError as exc:
                error = str(exc)
            except Exception as exc:  # a bug must not end the watch for good: log, reconnect
                log.exception("trust-bundle update failed")
                error = type(exc).__name__
            finally:
                self._watch = None
                watch.cancel()
            attempt += 1
            delay = self._backoff(attempt)
            log.warning(
                "trust-bundle stream lost; reconnecting",
                extra={"error": error, "retry_in_s": round(delay, 2)},
            )
            await asyncio.sleep(delay)

    async def _apply_bundle(self, update: BundleUpdate) -> None:
        try:
            version, roots = self._push_bundle(update)
        except InvalidIssuance as exc:
            log.error("ignoring a trust-bundle update", extra={"error": str(exc)})
            return
        self._check_signing_root(update.signing_root_fingerprint)
        if not await self._bundle_applied(version):
            log.warning(
                "Envoy has not ACKed the trust bundle; not reporting it applied",
                extra={"sds_version": version, "nack": str(self._sds.last_nack(BUNDLE_SECRET))},
            )
            return
        self._applied_roots = roots
        log.info(
            "trust bundle applied",
            extra={"roots": list(roots), "stage": update.rotation_stage, "sds_version": version},
        )
        await self._report()

    def _check_signing_root(self, signing_root: str) -> None:
        held = self._held
        if held is None:
            return
        if root_change_needs_renewal(signing_root, held.root_fingerprint, self._root_renewal_for):
            self._root_renewal_for = normalize_fingerprint(signing_root)
            log.info(
                "the mesh signs with another root; renewing now",
                extra={"signing_root": self._root_renewal_for, "leaf_root": held.root_fingerprint},
            )
            self._renew_now.set()

    def _bundle_subscribed(self) -> bool:
        return any(
            not s.resource_names or BUNDLE_SECRET in s.resource_names for s in self._sds.streams()
        )

    async def _bundle_applied(self, version: str) -> bool:
        """Wait until Envoy ACKed `version` of the bundle. With no subscriber it counts as
        applied: whatever subscribes later is served the current bundle first."""
        deadline = time.monotonic() + BUNDLE_ACK_TIMEOUT_S
        while True:
            acked = self._sds.acked_version(BUNDLE_SECRET)
            if not self._bundle_subscribed() or (acked is not None and int(acked) >= int(version)):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                # Short waits: a stream that goes away changes the answer without an ACK.
                await self._sds.wait_acked(BUNDLE_SECRET, version, min(0.5, remaining))

    async def _report(self) -> None:
        watch, held = self._watch, self._held
        if watch is None or held is None:
            return  # the next stream's first update is answered with a report
        report = build_report(self.config.node_id, self._applied_roots, held)
        try:
            await watch.send(report)
        except ControlPlaneError as exc:
            log.info("report not sent; the stream reconnects", extra={"error": str(exc)})
            return
        self.reports_sent += 1
        log.info(
            "reported to the control plane",
            extra={
                "applied_roots": list(report.applied_root_fingerprints),
                "leaf_root": report.leaf_root_fingerprint,
                "serial": report.leaf_serial_hex,
            },
        )

    # -- readiness ------------------------------------------------------------------------------

    async def _monitor_readiness(self) -> None:
        """Log readiness changes; the first says how long the start took. Polls fast until
        the first ready, slowly after."""
        was_ready: bool | None = None  # None until ready once
        while True:
            verdict = await self.readiness()
            if was_ready is None and verdict.ready:
                startup = round(time.monotonic() - self._started_at, 3)
                log.info("proxy ready", extra={"startup_s": startup})
                was_ready = True
            elif was_ready is not None and verdict.ready != was_ready:
                log.log(
                    logging.INFO if verdict.ready else logging.WARNING,
                    "proxy ready" if verdict.ready else "proxy not ready",
                    extra={"reason": verdict.reason},
                )
                was_ready = verdict.ready
            await asyncio.sleep(0.05 if was_ready is None else 1.0)


async def _wait_event(event: asyncio.Event, timeout: float) -> bool:
    """True if `event` was set within `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def _unless_stopped(stop: asyncio.Event, work: Awaitable[None]) -> bool:
    """Run `work` unless `stop` is set first (then cancel it); True if it completed."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        task.result()
        return True
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return False


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for task, result in zip(tasks, results, strict=True):
        if isinstance(result, Exception):
            log.error("agent task failed", extra={"task": task.get_name(), "error": repr(result)})
