"""Readiness: the pure verdict, the Envoy admin probe, and the tiny HTTP server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from verity.dataplane import readiness
from verity.dataplane.readiness import (
    EnvoyState,
    ReadinessServer,
    Verdict,
    evaluate,
    parse_request_line,
    probe_envoy,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
VALID = (T0 - timedelta(hours=1), T0 + timedelta(hours=1))
LIVE = EnvoyState(live=True, listeners=2)


def verdict(**overrides: Any) -> Verdict:
    arguments: dict[str, Any] = {
        "envoy": LIVE,
        "validity": VALID,
        "now": T0,
        "expect_listeners": True,
    }
    arguments.update(overrides)
    return evaluate(**arguments)


def test_ready_when_envoy_is_live_with_listeners_and_the_certificate_is_valid() -> None:
    assert verdict() == Verdict(True, "ready")


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"validity": None}, "no certificate yet"),
        ({"now": T0 - timedelta(hours=2)}, "certificate not valid before"),
        ({"now": T0 + timedelta(hours=1)}, "certificate expired at"),
        ({"envoy": None}, "Envoy not started"),
        ({"envoy": EnvoyState(False, 0, "admin /ready says PRE_INITIALIZING")}, "PRE_INITIALIZING"),
        ({"envoy": EnvoyState(True, 0)}, "no listeners yet"),
    ],
)
def test_not_ready_says_why(overrides: dict[str, Any], reason: str) -> None:
    result = verdict(**overrides)
    assert not result.ready
    assert reason in result.reason


def test_a_dataplane_without_ports_needs_no_listeners() -> None:
    assert verdict(envoy=EnvoyState(True, 0), expect_listeners=False).ready


def test_an_expired_certificate_wins_over_a_live_envoy() -> None:
    # Envoy would still serve, but every peer would refuse the handshake.
    assert not verdict(now=VALID[1] + timedelta(seconds=1)).ready


# ---------------------------------------------------------------------------------------------
# The admin probe


@dataclass
class FakeResponse:
    status_code: int
    text: str = ""
    body: Any = None

    def json(self) -> Any:
        return self.body


def admin(responses: dict[str, FakeResponse | Exception]) -> Any:
    async def get(path: str) -> FakeResponse:
        answer = responses[path]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return get


async def test_probe_counts_listeners_of_a_live_envoy() -> None:
    state = await probe_envoy(
        admin(
            {
                "/ready": FakeResponse(200, "LIVE\n"),
                "/listeners?format=json": FakeResponse(
                    200, body={"listener_statuses": [{"name": "a"}, {"name": "b"}]}
                ),
            }
        )
    )
    assert state == EnvoyState(True, 2)


async def test_probe_of_an_initializing_envoy() -> None:
    state = await probe_envoy(admin({"/ready": FakeResponse(503, "PRE_INITIALIZING")}))
    assert not state.live and "PRE_INITIALIZING" in state.detail


async def test_probe_of_an_unreachable_admin() -> None:
    state = await probe_envoy(admin({"/ready": ConnectionRefusedError()}))
    assert not state.live and "unreachable" in state.detail


async def test_probe_with_failing_listener_listing() -> None:
    state = await probe_envoy(
        admin({"/ready": FakeResponse(200, "LIVE"), "/listeners?format=json": FakeResponse(500)})
    )
    assert state.live and state.listeners == 0


# ---------------------------------------------------------------------------------------------
# HTTP


def test_request_line_parsing() -> None:
    assert parse_request_line(b"GET /ready HTTP/1.1\r\n") == ("GET", "/ready")
    assert parse_request_line(b"HEAD /healthz?verbose=1 HTTP/1.0\r\n") == ("HEAD", "/healthz")
    for bad in (b"", b"GET /ready\r\n", b"\x16\x03\x01 tls", b"GET / SPDY/3\r\n"):
        assert parse_request_line(bad) is None


@dataclass
class Served:
    server: ReadinessServer
    verdicts: list[Verdict]

    async def request(self, raw: bytes) -> tuple[int, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        writer.write(raw)
        await writer.drain()
        data = await reader.read()
        writer.close()
        head, _, body = data.decode().partition("\r\n\r\n")
        status = int(head.split(" ")[1]) if head else 0
        return status, body.strip()

    async def get(self, path: str) -> tuple[int, str]:
        return await self.request(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    verdicts = [Verdict(False, "no certificate yet")]

    async def check() -> Verdict:
        return verdicts[-1]

    server = ReadinessServer(check, port=0)
    await server.start()
    try:
        yield Served(server, verdicts)
    finally:
        await server.stop()


async def test_healthz_is_always_ok(served: Served) -> None:
    assert await served.get("/healthz") == (200, "ok")


async def test_ready_follows_the_check(served: Served) -> None:
    assert await served.get("/ready") == (503, "no certificate yet")
    served.verdicts.append(Verdict(True, "ready"))
    assert await served.get("/ready?probe=1") == (200, "ready")


async def test_unknown_paths_methods_and_garbage(served: Served) -> None:
    assert (await served.get("/metrics"))[0] == 404
    assert (await served.request(b"POST /ready HTTP/1.1\r\n\r\n"))[0] == 405
    assert (await served.request(b"\x16\x03\x01\x00garbage\r\n\r\n"))[0] == 400


async def test_head_has_no_body(served: Served) -> None:
    status, body = await served.request(b"HEAD /healthz HTTP/1.1\r\n\r\n")
    assert (status, body) == (200, "")


async def test_a_hanging_check_answers_503(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readiness, "CHECK_TIMEOUT_S", 0.05)

    async def hang() -> Verdict:
        await asyncio.sleep(10)
        raise AssertionError("unreachable")

    server = ReadinessServer(hang, port=0)
    await server.start()
    try:
        status, body = await Served(server, []).get("/ready")
    finally:
        await server.stop()
    assert (status, body) == (503, "readiness check timed out")


async def test_listens_on_loopback_only(served: Served) -> None:
    assert served.server._server is not None
    hosts = {sock.getsockname()[0] for sock in served.server._server.sockets}
    assert hosts == {"127.0.0.1"}
