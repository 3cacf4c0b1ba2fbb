"""What each proxy was sent and what it accepted: the xDS status board.

The ADS server records every response, ACK and NACK here. Readers get immutable views
(`snapshot`) for `verity inspect`, and can wait until proxies have ACKed given versions
(`wait_acked`), which is how the control plane gates a change on "reached every connected
proxy" and how benchmarks measure push-to-ACK.

A NACK's error text can contain the rejected resource, private key included; it is scrubbed
here, before it is stored, whatever the caller did.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

MAX_ERROR_CHARS = 1024

_PEM_PRIVATE_KEY = re.compile(
    r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END[A-Z0-9 ]*PRIVATE KEY-----|\Z)",
    re.DOTALL,
)
# The tail of a key whose BEGIN marker was cut off before the text reached us.
_PEM_KEY_TAIL = re.compile(r"\A.*?-----END[A-Z0-9 ]*PRIVATE KEY-----", re.DOTALL)
# Inline secret data as Envoy prints it (text format or JSON), PEM or not.
_INLINE_DATA = re.compile(
    r"""(inline_(?:bytes|string)|inlineBytes|inlineString)(["']?\s*:\s*)"(?:[^"\\]|\\.)*"?"""
)
# Long base64 runs: key material without PEM markers.
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{100,}={0,2}")


def scrub_error(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """NACK text fit to store and log: no private keys or inline secret data, bounded length."""
    text = _PEM_PRIVATE_KEY.sub("[private key removed]", text)
    text = _PEM_KEY_TAIL.sub("[private key removed]", text)
    text = _INLINE_DATA.sub(r'\1\2"[removed]"', text)
    text = _BASE64_RUN.sub("[data removed]", text)
    if len(text) > limit:
        text = text[:limit] + " [truncated]"
    return text


@dataclass(frozen=True, slots=True)
class Nack:
    version: str
    error: str
    at: float


@dataclass(frozen=True, slots=True)
class TypeStatus:
    """One proxy's state for one type URL."""

    type_url: str
    version_sent: str | None
    nonce_sent: str | None
    sent_at: float | None
    version_acked: str | None
    acked_at: float | None
    last_nack: Nack | None
    last_request_at: float | None


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """One proxy's connection and per-type state (times are seconds since the epoch)."""

    node_id: str
    connected: bool
    streams: int
    connected_since: float | None
    disconnected_at: float | None
    last_request_at: float | None
    types: Mapping[str, TypeStatus]


@dataclass(slots=True)
class _TypeRecord:
    version_sent: str | None = None
    nonce_sent: str | None = None
    sent_at: float | None = None
    version_acked: str | None = None
    acked_at: float | None = None
    last_nack: Nack | None = None
    last_request_at: float | None = None

    def view(self, type_url: str) -> TypeStatus:
        return TypeStatus(
            type_url=type_url,
            version_sent=self.version_sent,
            nonce_sent=self.nonce_sent,
            sent_at=self.sent_at,
            version_acked=self.version_acked,
            acked_at=self.acked_at,
            last_nack=self.last_nack,
            last_request_at=self.last_request_at,
        )


@dataclass(slots=True)
class _NodeRecord:
    streams: int = 0
    connected_since: float | None = None
    disconnected_at: float | None = None
    last_request_at: float | None = None
    types: dict[str, _TypeRecord] = field(default_factory=dict)

    def type(self, type_url: str) -> _TypeRecord:
        record = self.types.get(type_url)
        if record is None:
            record = self.types[type_url] = _TypeRecord()
        return record

    def view(self, node_id: str) -> NodeStatus:
        return NodeStatus(
            node_id=node_id,
            connected=self.streams > 0,
            streams=self.streams,
            connected_since=self.connected_since,
            disconnected_at=self.disconnected_at,
            last_request_at=self.last_request_at,
            types=MappingProxyType({t: r.view(t) for t, r in self.types.items()}),
        )


Key = tuple[str, str]  # (node id, type URL)
Versions = Mapping[str, str] | Callable[[str, str], str | None]


@dataclass(slots=True, eq=False)
class _Waiter:
    remaining: dict[Key, str]
    done: asyncio.Future[bool]


class StatusBoard:
    """Per proxy and type: version and nonce sent, version ACKed, last NACK, times.

    Updated by the ADS server from the event loop; read from the same loop.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._nodes: dict[str, _NodeRecord] = {}
        self._waiters: dict[Key, list[_Waiter]] = {}

    # Updates, by the ADS server.

    def stream_opened(self, node_id: str) -> bool:
        """Count a new stream; True if it is the proxy's only one (it just connected)."""
        node = self._node(node_id)
        node.streams += 1
        if node.streams == 1:
            node.connected_since = self._clock()
            node.disconnected_at = None
        return node.streams == 1

    def stream_closed(self, node_id: str) -> bool:
        """Count a closed stream; True if it was the proxy's last one (it disconnected)."""
        node = self._node(node_id)
        node.streams = max(0, node.streams - 1)
        if node.streams == 0:
            node.disconnected_at = self._clock()
        return node.streams == 0

    def requested(self, node_id: str, type_url: str) -> None:
        now = self._clock()
        node = self._node(node_id)
        node.last_request_at = now
        node.type(type_url).last_request_at = now

    def sent(self, node_id: str, type_url: str, version: str, nonce: str) -> None:
        record = self._node(node_id).type(type_url)
        record.version_sent, record.nonce_sent, record.sent_at = version, nonce, self._clock()

    def acked(self, node_id: str, type_url: str, version: str) -> None:
        record = self._node(node_id).type(type_url)
        record.version_acked, record.acked_at = version, self._clock()
        self._resolve((node_id, type_url), version, True)

    def nacked(self, node_id: str, type_url: str, version: str, error: str) -> Nack:
        """Record a NACK; the error is scrubbed before it is kept. Returns what was kept."""
        nack = Nack(version=version, error=scrub_error(error), at=self._clock())
        self._node(node_id).type(type_url).last_nack = nack
        self._resolve((node_id, type_url), version, False)
        return nack

    def forget(self, node_id: str) -> None:
        """Drop a proxy's record (e.g. its Dataplane was deleted)."""
        self._nodes.pop(node_id, None)

    def _node(self, node_id: str) -> _NodeRecord:
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = _NodeRecord()
        return node

    # Views.

    def snapshot(self, node_id: str) -> NodeStatus | None:
        node = self._nodes.get(node_id)
        return None if node is None else node.view(node_id)

    def nodes(self) -> frozenset[str]:
        return frozenset(self._nodes)

    def connected_nodes(self) -> frozenset[str]:
        return frozenset(n for n, record in self._nodes.items() if record.streams > 0)

    def acked_version(self, node_id: str, type_url: str) -> str | None:
        node = self._nodes.get(node_id)
        record = None if node is None else node.types.get(type_url)
        return None if record is None else record.version_acked

    def all_acked(self, node_ids: Iterable[str], type_url: str, version: str) -> bool:
        """True if every listed proxy has ACKed `version` of `type_url`."""
        return all(self.acked_version(n, type_url) == version for n in node_ids)

    # Waiting.

    async def wait_acked(
        self,
        node_ids: Iterable[str],
        type_urls: Iterable[str],
        versions: Versions,
        timeout: float,
    ) -> bool:
        """Wait until every proxy has ACKed the expected version of every type.

        `versions` is either type URL -> version (the same for every proxy) or a function
        (node id, type URL) -> version, e.g. `SnapshotCache.version`; a missing or None
        version expects nothing for that pair. Returns True when all are ACKed, False on
        timeout or as soon as one proxy NACKs an expected version. A proxy that is not
        connected cannot ACK: to gate on "every connected proxy", pass `connected_nodes()`.
        """
        expected = _expected(node_ids, type_urls, versions)
        remaining = {k: v for k, v in expected.items() if self.acked_version(*k) != v}
        if not remaining:
            return True
        if any(self._nacked(key, version) for key, version in remaining.items()):
            return False
        waiter = _Waiter(remaining, asyncio.get_running_loop().create_future())
        registered = list(remaining)
        for key in registered:
            self._waiters.setdefault(key, []).append(waiter)
        try:
            async with asyncio.timeout(timeout):
                return await waiter.done
        except TimeoutError:
            return False
        finally:
            self._unregister(waiter, registered)

    def _nacked(self, key: Key, version: str) -> bool:
        node = self._nodes.get(key[0])
        record = None if node is None else node.types.get(key[1])
        return (
            record is not None
            and record.last_nack is not None
            and (record.last_nack.version == version)
        )

    def _resolve(self, key: Key, version: str, accepted: bool) -> None:
        for waiter in tuple(self._waiters.get(key, ())):
            if waiter.done.done() or waiter.remaining.get(key) != version:
                continue
            if not accepted:
                waiter.done.set_result(False)
                continue
            del waiter.remaining[key]
            if not waiter.remaining:
                waiter.done.set_result(True)

    def _unregister(self, waiter: _Waiter, keys: Iterable[Key]) -> None:
        for key in keys:
            waiters = self._waiters.get(key)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[key]


def _expected(
    node_ids: Iterable[str], type_urls: Iterable[str], versions: Versions
) -> dict[Key, str]:
    type_list = list(type_urls)
    expected: dict[Key, str] = {}
    for node_id in node_ids:
        for type_url in type_list:
            version = (
                versions.get(type_url)
                if isinstance(versions, Mapping)
                else versions(node_id, type_url)
            )
            if version is not None:
                expected[(node_id, type_url)] = version
    return expected
