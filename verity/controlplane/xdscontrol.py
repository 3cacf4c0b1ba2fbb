"""Drives xDS from the store: watch -> index -> snapshot -> translate() -> cache -> ADS.

A change is coalesced with others that arrive within a short debounce, then each affected
mesh's snapshot is built once and translate() runs once per connected proxy of that mesh.
The cache versions each type by content, so only proxies whose config really changed get a
push, and only of the types that changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime

from verity.controlplane import auth
from verity.controlplane.identity import authenticate_dataplane, bearer_secret
from verity.controlplane.meshindex import MeshIndex
from verity.store.base import Store
from verity.xds.ads import AdsServer, Forbidden, Unauthenticated
from verity.xds.cache import SnapshotCache
from verity.xds.snapshot import MeshSnapshot
from verity.xds.status import StatusBoard
from verity.xds.translate import translate

log = logging.getLogger("verity.xds")

DEBOUNCE_SECONDS = 0.05
# After a control-plane (re)start, proxies reconnect one by one. Until they have had time to,
# every registered Dataplane counts as an endpoint, so the first proxy back does not lose the
# endpoints of the ones still reconnecting (traffic must not notice a control-plane restart).
STARTUP_GRACE_SECONDS = 10.0
ALL = "*"


class XdsController:
    def __init__(
        self,
        store: Store,
        debounce: float = DEBOUNCE_SECONDS,
        startup_grace: float = STARTUP_GRACE_SECONDS,
    ) -> None:
        self.store = store
        self._startup_grace = startup_grace
        self._in_grace = startup_grace > 0
        self.index = MeshIndex()
        self.cache = SnapshotCache()
        self.status = StatusBoard()
        self.ads = AdsServer(
            self.cache,
            self.authenticate,
            status=self.status,
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
        )
        self._debounce = debounce
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.pushes = 0

    async def start(self) -> None:
        revision = await self.store.revision()
        self.index.load(await self.store.list())
        self._tasks = [
            asyncio.create_task(self._follow(revision), name="xds-watch"),
            asyncio.create_task(self._push_loop(), name="xds-push"),
            asyncio.create_task(self._end_grace(), name="xds-grace"),
        ]

    async def _end_grace(self) -> None:
        await asyncio.sleep(self._startup_grace)
        self._in_grace = False
        self._mark({ALL})  # proxies that never came back stop being endpoints

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _follow(self, revision: int) -> None:
        async for event in self.store.watch(revision):
            self._mark(self.index.apply(event))

    def _mark(self, meshes: frozenset[str] | set[str]) -> None:
        if meshes:
            self._dirty |= set(meshes)
            self._wake.set()

    async def _push_loop(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self._debounce)  # coalesce a burst of changes
            self._wake.clear()
            dirty, self._dirty = self._dirty, set()
            meshes = self.index.meshes() if ALL in dirty else sorted(dirty)
            for mesh in meshes:
                self._recompute_mesh(mesh)

    def _connected(self) -> frozenset[str]:
        return self.ads.connected_nodes()

    def _ready(self) -> frozenset[str]:
        if self._in_grace:
            return frozenset(f"{d.namespace}/{d.name}" for d in self.index.of_kind("Dataplane"))
        return self._connected()

    def _recompute_mesh(self, mesh: str) -> None:
        connected = self._connected()
        snapshot = self.index.snapshot(mesh, self._ready())
        if snapshot is None:
            return
        for key in sorted(connected):
            dataplane = self.index.dataplane(key)
            if dataplane is None or dataplane.spec.mesh != mesh:
                continue
            if snapshot.is_revoked(dataplane):
                self.ads.disconnect(key, reason="identity revoked")
                continue
            self._set(snapshot, key)

    def _set(self, snapshot: MeshSnapshot, key: str) -> None:
        try:
            changed = self.cache.set_resources(key, translate(snapshot, key))
        except Exception:  # a bug in translate must not stop pushes to other proxies
            log.exception("translate failed", extra={"node": key})
            return
        if changed:
            self.pushes += 1
            log.info("config updated", extra={"node": key, "types": sorted(changed)})

    async def authenticate(self, metadata: Sequence[tuple[str, str]], node_id: str) -> str:
        """The ADS stream's token must name the identity of the Dataplane it asks for."""
        try:
            caller = await authenticate_dataplane(
                self.store, bearer_secret(metadata), datetime.now(UTC)
            )
        except auth.Unauthenticated as exc:
            raise Unauthenticated(str(exc)) from exc
        dataplane = self.index.dataplane(node_id)
        if dataplane is None:
            raise Forbidden(f"no Dataplane {node_id} is registered")
        identity = caller.identity
        if (dataplane.namespace, dataplane.spec.service_account, dataplane.spec.mesh) != (
            identity.namespace,
            identity.service_account,
            identity.mesh,
        ):
            raise Forbidden(f"token {caller.token_name!r} may not act as Dataplane {node_id}")
        return node_id

    def _on_connect(self, node_id: str) -> None:
        dataplane = self.index.dataplane(node_id)
        if dataplane is None:
            return
        snapshot = self.index.snapshot(dataplane.spec.mesh, self._ready() | {node_id})
        if snapshot is not None:
            self._set(snapshot, node_id)
        self._mark({dataplane.spec.mesh})  # the others gain an endpoint
        log.info("proxy connected", extra={"node": node_id})

    def _on_disconnect(self, node_id: str) -> None:
        dataplane = self.index.dataplane(node_id)
        self.cache.remove(node_id)
        if dataplane is not None:
            self._mark({dataplane.spec.mesh})  # the others lose an endpoint
        log.info("proxy disconnected", extra={"node": node_id})

    def snapshot_for(self, node_id: str) -> MeshSnapshot | None:
        dataplane = self.index.dataplane(node_id)
        if dataplane is None:
            return None
        return self.index.snapshot(dataplane.spec.mesh, self._ready())
