"""The effective mTLS mode of a workload's inbound ports: Istio's PeerAuthentication semantics.

Which policies count, for a workload in namespace `ns` with labels `L`:

- mesh level: a PeerAuthentication in the mesh's root namespace without a selector (a
  selector with empty `matchLabels` counts as no selector, as in Istio);
- namespace level: one in `ns` without a selector;
- workload level: one in `ns` whose `selector.matchLabels` are all in `L`. Istio ignores
  policies with a selector in the root namespace, and so does Verity;
- port level: `portLevelMtls` of the chosen workload policy.

Precedence is mesh < namespace < workload < port; a narrower level that is UNSET (or has no
`mtls`) inherits the mode of the level above it. With no policy at all the mesh's own
default applies (`Mesh.spec.mtls.mode`, STRICT unless changed); Istio's built-in default is
PERMISSIVE, Verity's is the Mesh resource's.

Several policies at one level: Istio uses the oldest (earliest creation time, ties broken by
name then namespace). The store's creation times are not part of the resource, so callers
pass them in `created_at`; a policy without a known time counts as newer than every policy
with one, and among those without, the first by (namespace, name) wins. Within one level all
candidates share a namespace, so that is the first by name.

Port keys: Istio keys `portLevelMtls` by the workload's own (container) port, the port the
application receives on, not the service port. In a Dataplane that is the inbound
`appPort` (which defaults to `port`), so a port-level entry is looked up by `appPort`.

`security.istio.io/v1` and `v1beta1` objects are the same model and are treated alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from verity.resources import Dataplane, MeshSpec, PeerAuthentication

MtlsMode = Literal["STRICT", "PERMISSIVE", "DISABLE"]
Level = Literal["mesh-default", "mesh", "namespace", "workload", "port"]
PolicyKey = tuple[str, str]
"""(namespace, name) of a PeerAuthentication."""


@dataclass(frozen=True)
class ModeSource:
    """Why a mode applies: the level that decided it and the policy there (none for the
    mesh default)."""

    level: Level
    namespace: str | None = None
    name: str | None = None

    def describe(self) -> str:
        if self.level == "mesh-default":
            return "the mesh default (Mesh spec.mtls.mode)"
        return f"PeerAuthentication {self.namespace}/{self.name} ({self.level} level)"


@dataclass(frozen=True)
class PortMtls:
    """The effective mode of one inbound port (`port` is the sidecar's, `app_port` the app's)."""

    port: int
    app_port: int
    mode: MtlsMode
    source: ModeSource


@dataclass(frozen=True)
class EffectiveMtls:
    """A workload's effective mode (what ports without a port-level setting get) and each
    inbound port's, ordered by port."""

    mode: MtlsMode
    source: ModeSource
    ports: tuple[PortMtls, ...]

    def port_mode(self, port: int) -> PortMtls:
        """The effective mode of the inbound `port` (the sidecar port, not the app port)."""
        for entry in self.ports:
            if entry.port == port:
                return entry
        raise KeyError(f"no inbound port {port}")


@dataclass(frozen=True)
class _Candidates:
    mesh: PeerAuthentication | None
    namespace: PeerAuthentication | None
    workload: PeerAuthentication | None


def effective_mtls(
    mesh: MeshSpec,
    policies: Iterable[PeerAuthentication],
    dataplane: Dataplane,
    *,
    created_at: Mapping[PolicyKey, datetime] | None = None,
) -> EffectiveMtls:
    """The effective mTLS mode of each inbound port of `dataplane`, and why."""
    chosen = _choose(
        mesh.root_namespace,
        dataplane.namespace,
        dataplane.spec.labels,
        policies,
        created_at or {},
    )
    mode, source = _workload_mode(mesh, chosen)
    port_modes = chosen.workload.spec.port_modes() if chosen.workload else {}
    ports = []
    for inbound in sorted(dataplane.spec.inbound, key=lambda i: i.port):
        port_mode, port_source = mode, source
        written = port_modes.get(inbound.target_port, "UNSET")
        if written != "UNSET" and chosen.workload is not None:
            port_mode, port_source = written, _source("port", chosen.workload)
        ports.append(PortMtls(inbound.port, inbound.target_port, port_mode, port_source))
    return EffectiveMtls(mode, source, tuple(ports))


def _workload_mode(mesh: MeshSpec, chosen: _Candidates) -> tuple[MtlsMode, ModeSource]:
    mode: MtlsMode = mesh.mtls.mode
    source = ModeSource("mesh-default")
    levels: tuple[tuple[Level, PeerAuthentication | None], ...] = (
        ("mesh", chosen.mesh),
        ("namespace", chosen.namespace),
        ("workload", chosen.workload),
    )
    for level, policy in levels:
        if policy is not None and policy.spec.mode != "UNSET":
            mode, source = policy.spec.mode, _source(level, policy)
    return mode, source


def _source(level: Level, policy: PeerAuthentication) -> ModeSource:
    return ModeSource(level, policy.namespace, policy.name)


def _choose(
    root_namespace: str,
    namespace: str,
    labels: Mapping[str, str],
    policies: Iterable[PeerAuthentication],
    created_at: Mapping[PolicyKey, datetime],
) -> _Candidates:
    mesh: list[PeerAuthentication] = []
    ns: list[PeerAuthentication] = []
    workload: list[PeerAuthentication] = []
    for policy in policies:
        selector = policy.spec.selector.match_labels if policy.spec.selector else {}
        if not selector:
            if policy.namespace == root_namespace:
                mesh.append(policy)
            elif policy.namespace == namespace:
                ns.append(policy)
        elif policy.namespace == namespace != root_namespace and _selects(selector, labels):
            workload.append(policy)
    return _Candidates(
        _oldest(mesh, created_at), _oldest(ns, created_at), _oldest(workload, created_at)
    )


def _selects(match_labels: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in match_labels.items())


def _oldest(
    policies: list[PeerAuthentication], created_at: Mapping[PolicyKey, datetime]
) -> PeerAuthentication | None:
    def age_key(policy: PeerAuthentication) -> tuple[bool, datetime, str, str]:
        created = created_at.get((policy.namespace, policy.name))
        # Unknown creation time sorts after every known one; datetime.min only fills the slot.
        return (created is None, created or datetime.min, policy.name, policy.namespace)

    return min(policies, key=age_key, default=None)
