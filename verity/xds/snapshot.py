"""`MeshSnapshot`: everything `translate()` needs to know about one mesh, frozen.

The control plane builds a snapshot from the store and the ADS status board and hands it to
`translate()` once per proxy; nothing here does I/O. Collections are normalized on
construction (sorted, deduplicated), so two snapshots of the same facts are equal and give the
same output whatever order the facts were read in.

A Dataplane is known by its key, `<namespace>/<name>`: the node id its bootstrap announces.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

from verity.policy import (
    EffectiveMtls,
    PolicyKey,
    WorkloadPolicies,
    effective_mtls,
    policies_for,
)
from verity.resources import (
    AuthorizationPolicy,
    Dataplane,
    MeshSpec,
    PeerAuthentication,
    RequestAuthentication,
    TrafficPermission,
)


def dataplane_key(dataplane: Dataplane) -> str:
    """The key (and xDS node id) of a Dataplane: `<namespace>/<name>`."""
    return f"{dataplane.namespace}/{dataplane.name}"


@dataclass(frozen=True)
class MeshSnapshot:
    """One mesh at one moment.

    - `mesh_name`, `mesh`: the Mesh's name and settings (a Kuma Mesh's `as_verity_mesh()`).
    - `dataplanes`: every Dataplane registered in this mesh (connected or not).
    - `peer_authentications`: every PeerAuthentication that applies to this mesh.
    - `policy_created_at`: creation times of those policies, by (namespace, name), when the
      store knows them (the oldest of competing policies wins, as in Istio).
    - `revoked`: SPIFFE IDs whose certificates must no longer be accepted.
    - `ready`: keys of the Dataplanes that are connected and ready to take traffic; only
      these are endpoints.
    - `authorization_policies`, `request_authentications`: every AuthorizationPolicy and
      RequestAuthentication (all namespaces; which apply to a workload is decided here).
    - `traffic_permissions`: the Kuma TrafficPermissions of this mesh.
    """

    mesh_name: str
    mesh: MeshSpec
    dataplanes: tuple[Dataplane, ...] = ()
    peer_authentications: tuple[PeerAuthentication, ...] = ()
    revoked: frozenset[str] = frozenset()
    ready: frozenset[str] = frozenset()
    policy_created_at: Mapping[PolicyKey, datetime] = field(default_factory=dict)
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()
    request_authentications: tuple[RequestAuthentication, ...] = ()
    traffic_permissions: tuple[TrafficPermission, ...] = ()
    _by_key: Mapping[str, Dataplane] = field(init=False, repr=False, compare=False)
    _by_service: Mapping[tuple[str, str], tuple[Dataplane, ...]] = field(
        init=False, repr=False, compare=False
    )
    _modes: dict[str, EffectiveMtls] = field(init=False, repr=False, compare=False)
    _authorization: dict[str, WorkloadPolicies] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        dataplanes = tuple(sorted(self.dataplanes, key=dataplane_key))
        by_key = {dataplane_key(dp): dp for dp in dataplanes}
        if len(by_key) != len(dataplanes):
            raise ValueError("dataplanes: the same namespace/name appears more than once")
        for key, dp in by_key.items():
            if dp.spec.mesh != self.mesh_name:
                raise ValueError(f"dataplane {key} belongs to mesh {dp.spec.mesh!r}")
        policies = tuple(sorted(self.peer_authentications, key=lambda p: (p.namespace, p.name)))
        self._set("dataplanes", dataplanes)
        self._set("peer_authentications", policies)
        self._set("revoked", frozenset(self.revoked))
        self._set("ready", frozenset(self.ready))
        self._set("policy_created_at", MappingProxyType(dict(self.policy_created_at)))
        for name in ("authorization_policies", "request_authentications", "traffic_permissions"):
            self._set(name, tuple(sorted(getattr(self, name), key=_resource_order)))
        self._set("_by_key", MappingProxyType(by_key))
        self._set("_by_service", MappingProxyType(_group_by_service(dataplanes)))
        # Memo of effective modes: each Dataplane's is needed by every proxy that calls it.
        self._set("_modes", {})
        self._set("_authorization", {})

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)

    @property
    def trust_domains(self) -> tuple[str, ...]:
        """The mesh's trust domain, then its aliases: identities the mesh accepts."""
        return (self.mesh.trust_domain, *self.mesh.trust_domain_aliases)

    def dataplane(self, key: str) -> Dataplane:
        try:
            return self._by_key[key]
        except KeyError:
            raise KeyError(f"no dataplane {key!r} in mesh {self.mesh_name!r}") from None

    def spiffe_id(self, dataplane: Dataplane) -> str:
        return dataplane.spiffe_id(self.mesh.trust_domain)

    def is_ready(self, dataplane: Dataplane) -> bool:
        return dataplane_key(dataplane) in self.ready

    def is_revoked(self, dataplane: Dataplane) -> bool:
        return self.spiffe_id(dataplane) in self.revoked

    def mtls(self, dataplane: Dataplane) -> EffectiveMtls:
        """The effective mTLS mode of each inbound port of `dataplane`."""
        key = dataplane_key(dataplane)
        if key not in self._modes:
            self._modes[key] = effective_mtls(
                self.mesh,
                self.peer_authentications,
                dataplane,
                created_at=self.policy_created_at,
            )
        return self._modes[key]

    def authorization(self, dataplane: Dataplane) -> WorkloadPolicies:
        """The authorization resources that apply to `dataplane` (and the revoked identities),
        compiled once per snapshot for all its inbound ports."""
        key = dataplane_key(dataplane)
        if key not in self._authorization:
            self._authorization[key] = policies_for(
                self.mesh,
                dataplane,
                authorization_policies=self.authorization_policies,
                request_authentications=self.request_authentications,
                traffic_permissions=self.traffic_permissions,
                dataplanes=self.dataplanes,
                revoked=self.revoked,
            )
        return self._authorization[key]

    def serving(self, service: str, namespace: str, port: int) -> tuple[Dataplane, ...]:
        """Registered Dataplanes of `service` in `namespace` with inbound `port`, by key."""
        return tuple(
            dp
            for dp in self._by_service.get((namespace, service), ())
            if any(i.port == port for i in dp.spec.inbound)
        )


def _resource_order(
    resource: AuthorizationPolicy | RequestAuthentication | TrafficPermission,
) -> tuple[str, str]:
    return (resource.namespace, resource.name)


def _group_by_service(
    dataplanes: tuple[Dataplane, ...],
) -> dict[tuple[str, str], tuple[Dataplane, ...]]:
    groups: dict[tuple[str, str], list[Dataplane]] = {}
    for dp in dataplanes:
        groups.setdefault((dp.namespace, dp.spec.service), []).append(dp)
    return {group: tuple(members) for group, members in groups.items()}
