"""The agent's health and readiness endpoints: a tiny HTTP server on loopback.

`/healthz` answers 200 while the agent runs. `/ready` answers 200 only when Envoy is live with
its listeners AND the certificate it serves is valid now; otherwise 503 with the reason, so an
orchestrator never sends traffic to a proxy that cannot complete a mutual-TLS handshake.

The decision (`evaluate`) is a pure function; the server is asyncio streams with just enough
HTTP/1.1 to answer a probe (one request per connection, no body).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

log = logging.getLogger("verity.readiness")

HOST = "127.0.0.1"
MAX_HEADER_LINES = 100
READ_TIMEOUT_S = 5.0
CHECK_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class EnvoyState:
    """What Envoy's admin interface said: `/ready` LIVE, and how many listeners it has."""

    live: bool
    listeners: int
    detail: str = ""


@dataclass(frozen=True)
class Verdict:
    ready: bool
    reason: str


READY = Verdict(True, "ready")


def evaluate(
    *,
    envoy: EnvoyState | None,
    validity: tuple[datetime, datetime] | None,
    now: datetime,
    expect_listeners: bool,
) -> Verdict:
    """Ready only if the certificate (`validity` = not_before, not_after) is valid at `now`
    and Envoy is live with listeners (when the Dataplane has ports to serve)."""
    if validity is None:
        return Verdict(False, "no certificate yet")
    not_before, not_after = validity
    if now < not_before:
        return Verdict(False, f"certificate not valid before {not_before.isoformat()}")
    if now >= not_after:
        return Verdict(False, f"certificate expired at {not_after.isoformat()}")
    if envoy is None:
        return Verdict(False, "Envoy not started")
    if not envoy.live:
        return Verdict(False, f"Envoy not live{': ' + envoy.detail if envoy.detail else ''}")
    if expect_listeners and envoy.listeners == 0:
        return Verdict(False, "Envoy has no listeners yet (waiting for the control plane)")
    return READY


AdminGet = Callable[[str], Awaitable[Any]]


async def probe_envoy(admin_get: AdminGet) -> EnvoyState:
    """Ask Envoy's admin API; `admin_get(path)` returns an httpx-like response."""
    try:
        ready = await admin_get("/ready")
        state = ready.text.strip()
        if ready.status_code != 200 or state != "LIVE":
            return EnvoyState(False, 0, f"admin /ready says {state or ready.status_code}")
        listeners = await admin_get("/listeners?format=json")
        if listeners.status_code != 200:
            return EnvoyState(True, 0, f"admin /listeners answered {listeners.status_code}")
        count = len(listeners.json().get("listener_statuses", []))
    except Exception as exc:  # admin unreachable (starting, restarting, stopping)
        return EnvoyState(False, 0, f"admin unreachable ({type(exc).__name__})")
    return EnvoyState(True, count)


# ---------------------------------------------------------------------------------------------
# HTTP


def parse_request_line(line: bytes) -> tuple[str, str] | None:
    """`GET /ready?x HTTP/1.1` -> ("GET", "/ready"); None if it is not an HTTP request line."""
    parts = line.decode("latin-1").strip().split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    method, target, _ = parts
    return method, target.split("?", 1)[0]


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


def response(status: int, body: str, *, head: bool = False) -> bytes:
    payload = (body + "\n").encode()
    headers = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(payload)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    )
    return headers.encode() + (b"" if head else payload)


Check = Callable[[], Awaitable[Verdict]]


class ReadinessServer:
    """Serves /healthz and /ready on 127.0.0.1:`port` (0 picks a free port)."""

    def __init__(self, check: Check, port: int, host: str = HOST) -> None:
        self._check = check
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is not None and self._server.sockets:
            port: int = self._server.sockets[0].getsockname()[1]
            return port
        return self._port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        log.info("readiness endpoint listening", extra={"address": f"{self._host}:{self.port}"})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                request = await _read_request(reader)
            writer.write(await self._answer(request))
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass  # a probe that hung up or sent garbage gets nothing more
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, request: tuple[str, str] | None) -> bytes:
        if request is None:
            return response(400, "bad request")
        method, path = request
        if path not in ("/ready", "/healthz"):
            return response(404, "not found")
        if method not in ("GET", "HEAD"):
            return response(405, "use GET")
        head = method == "HEAD"
        if path == "/healthz":
            return response(200, "ok", head=head)
        verdict = await self._verdict()
        return response(200 if verdict.ready else 503, verdict.reason, head=head)

    async def _verdict(self) -> Verdict:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                return await self._check()
        except TimeoutError:
            return Verdict(False, "readiness check timed out")


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str] | None:
    request = parse_request_line(await reader.readline())
    for _ in range(MAX_HEADER_LINES):
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            return request
    return None
