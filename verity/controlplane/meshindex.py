"""The control plane's in-memory view of the resources translate() needs, kept by the watch.

Each stored document is parsed once when it changes (not once per proxy or per push), and
the index knows which meshes a change touches, so only those meshes' proxies are recomputed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from verity.policy import PolicyKey
from verity.resources import (
    AuthorizationPolicy,
    Dataplane,
    KumaMesh,
    Mesh,
    PeerAuthentication,
    RequestAuthentication,
    Resource,
    RevocationList,
    TrafficPermission,
    parse_document,
)
from verity.store.base import EventType, ObjectKey, StoredObject, WatchEvent
from verity.xds.snapshot import MeshSnapshot, dataplane_key

# Kinds that change every mesh's config (policies are namespaced, not per mesh).
_ALL_MESHES = "*"
RELEVANT_KINDS = frozenset(
    {
        "Mesh",
        "Dataplane",
        "PeerAuthentication",
        "RevocationList",
        "AuthorizationPolicy",
        "RequestAuthentication",
        "TrafficPermission",
    }
)


def _created(obj: StoredObject) -> datetime:
    return datetime.fromisoformat(obj.created_at.replace("Z", "+00:00"))


@dataclass
class MeshIndex:
    resources: dict[ObjectKey, Resource] = field(default_factory=dict)
    created: dict[ObjectKey, datetime] = field(default_factory=dict)

    def load(self, objects: Iterable[StoredObject]) -> None:
        for obj in objects:
            self._put(obj)

    def apply(self, event: WatchEvent) -> frozenset[str]:
        """Apply one change; return the meshes it affects ("*" for all)."""
        if event.key.kind not in RELEVANT_KINDS:
            return frozenset()
        before = self.resources.get(event.key)
        if event.type is EventType.DELETED:
            self.resources.pop(event.key, None)
            self.created.pop(event.key, None)
        elif event.object is not None:
            self._put(event.object)
        after = self.resources.get(event.key)
        return frozenset(m for r in (before, after) if r is not None for m in _meshes_of(r))

    def _put(self, obj: StoredObject) -> None:
        if obj.key.kind in RELEVANT_KINDS:
            self.resources[obj.key] = parse_document(obj.document)
            self.created[obj.key] = _created(obj)

    def of_kind(self, kind: str) -> list[Resource]:
        return [r for k, r in self.resources.items() if k.kind == kind]

    def dataplane(self, key: str) -> Dataplane | None:
        namespace, _, name = key.partition("/")
        found = self.resources.get(ObjectKey("Dataplane", namespace, name))
        return found if isinstance(found, Dataplane) else None

    def meshes(self) -> list[str]:
        return sorted(k.name for k in self.resources if k.kind == "Mesh")

    def snapshot(self, mesh_name: str, ready: frozenset[str]) -> MeshSnapshot | None:
        mesh = self.resources.get(ObjectKey("Mesh", "", mesh_name))
        if not isinstance(mesh, Mesh | KumaMesh):
            return None
        dataplanes = tuple(
            r
            for r in self.of_kind("Dataplane")
            if isinstance(r, Dataplane) and r.spec.mesh == mesh_name
        )
        policies = tuple(
            r for r in self.of_kind("PeerAuthentication") if isinstance(r, PeerAuthentication)
        )
        created: dict[PolicyKey, datetime] = {
            (k.namespace, k.name): t
            for k, t in self.created.items()
            if k.kind == "PeerAuthentication"
        }
        revocations = self.resources.get(ObjectKey("RevocationList", "", mesh_name))
        revoked = revocations.revoked() if isinstance(revocations, RevocationList) else frozenset()
        keys = {dataplane_key(d) for d in dataplanes}
        return MeshSnapshot(
            mesh_name=mesh_name,
            mesh=mesh.as_verity_mesh(),
            dataplanes=dataplanes,
            peer_authentications=policies,
            authorization_policies=tuple(
                r for r in self.of_kind("AuthorizationPolicy") if isinstance(r, AuthorizationPolicy)
            ),
            request_authentications=tuple(
                r
                for r in self.of_kind("RequestAuthentication")
                if isinstance(r, RequestAuthentication)
            ),
            traffic_permissions=tuple(
                r
                for r in self.of_kind("TrafficPermission")
                if isinstance(r, TrafficPermission) and r.mesh == mesh_name
            ),
            revoked=revoked,
            ready=frozenset(ready & keys),
            policy_created_at=created,
        )


def _meshes_of(resource: Resource) -> tuple[str, ...]:
    if isinstance(resource, Mesh | KumaMesh | RevocationList):
        return (resource.name,)
    if isinstance(resource, Dataplane):
        return (resource.spec.mesh,)
    return (_ALL_MESHES,)
