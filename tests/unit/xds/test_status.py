"""StatusBoard bookkeeping, waiting for ACKs, and NACK scrubbing."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from verity.xds.status import MAX_ERROR_CHARS, StatusBoard, scrub_error
from verity.xds.typeurls import CLUSTER, LISTENER

KEY = "MHcCAQEEIBkg4LVWM9nuwNSk3yByxZpYRTBnVJk5oNxjA7r3yGsgoAoGCCqGSM49"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


@pytest.mark.parametrize(
    "text",
    [
        f"bad secret: -----BEGIN PRIVATE KEY-----\n{KEY}\n-----END PRIVATE KEY----- end",
        f"bad secret: -----BEGIN EC PRIVATE KEY-----\\n{KEY}\\n-----END EC PRIVATE KEY-----",
        f"cut short: -----BEGIN RSA PRIVATE KEY-----\n{KEY}",
        f"{KEY}\n-----END PRIVATE KEY----- cut at the start",
        f'private_key {{ inline_string: "{KEY[:20]}" }}',
        f'"privateKey": {{"inlineBytes": "{KEY[:30]}"}}',
        "blob " + "QUJD" * 40,
    ],
)
def test_scrub_removes_key_material(text: str) -> None:
    scrubbed = scrub_error(text)
    assert KEY[:16] not in scrubbed and "QUJDQUJD" not in scrubbed
    assert "removed]" in scrubbed


def test_scrub_keeps_the_reason_and_bounds_the_length() -> None:
    assert scrub_error("malformed IP address: 999.0.0.1") == "malformed IP address: 999.0.0.1"
    long = scrub_error("x " * 5000)
    assert len(long) <= MAX_ERROR_CHARS + len(" [truncated]") and long.endswith("[truncated]")


def test_snapshot_is_an_immutable_view() -> None:
    board = StatusBoard(clock=Clock())
    board.stream_opened("a")
    board.requested("a", LISTENER)
    board.sent("a", LISTENER, "v1", "1")
    board.acked("a", LISTENER, "v1")
    board.sent("a", LISTENER, "v2", "2")
    nack = board.nacked("a", LISTENER, "v2", f"-----BEGIN PRIVATE KEY-----{KEY}")

    status = board.snapshot("a")
    assert status is not None
    lds = status.types[LISTENER]
    assert (lds.version_sent, lds.nonce_sent, lds.version_acked) == ("v2", "2", "v1")
    assert lds.last_nack == nack and KEY not in nack.error
    assert status.connected and status.connected_since == 1001.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.streams = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        status.types["x"] = lds  # type: ignore[index]


def test_connection_counts_streams() -> None:
    board = StatusBoard()
    assert board.stream_opened("a") and not board.stream_opened("a")
    assert not board.stream_closed("a") and board.stream_closed("a")
    assert board.connected_nodes() == frozenset() and board.nodes() == {"a"}
    board.forget("a")
    assert board.snapshot("a") is None


def test_all_acked() -> None:
    board = StatusBoard()
    board.acked("a", CLUSTER, "v1")
    board.acked("b", CLUSTER, "v1")
    assert board.all_acked(["a", "b"], CLUSTER, "v1")
    assert not board.all_acked(["a", "b", "c"], CLUSTER, "v1")


async def test_wait_acked_resolves_when_the_last_ack_arrives() -> None:
    board = StatusBoard()
    board.acked("a", CLUSTER, "v2")
    expected = {("a", CLUSTER): "v2", ("b", CLUSTER): "v2", ("b", LISTENER): "l1"}

    def version(node: str, type_url: str) -> str | None:
        return expected.get((node, type_url))

    waiting = asyncio.create_task(board.wait_acked(["a", "b"], [CLUSTER, LISTENER], version, 2))
    await asyncio.sleep(0)
    board.acked("b", CLUSTER, "v1")  # not the version waited for
    board.acked("b", CLUSTER, "v2")
    await asyncio.sleep(0)
    assert not waiting.done()
    board.acked("b", LISTENER, "l1")

    assert await waiting is True
    assert board._waiters == {}


async def test_wait_acked_times_out_and_fails_fast_on_a_known_nack() -> None:
    board = StatusBoard()
    assert await board.wait_acked(["a"], [CLUSTER], {CLUSTER: "v1"}, 0.05) is False
    board.nacked("a", CLUSTER, "v1", "no")
    assert await board.wait_acked(["a"], [CLUSTER], {CLUSTER: "v1"}, 5) is False
    assert await board.wait_acked([], [CLUSTER], {CLUSTER: "v1"}, 5) is True
