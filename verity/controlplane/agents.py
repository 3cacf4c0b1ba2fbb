"""Connected agents and what their proxies have applied: the gate of root rotation.

Each agent keeps a WatchTrustBundle stream open and reports, after Envoy ACKed the SDS update,
which roots its proxy trusts and which root its leaf chains to. A rotation stage may only
follow the previous one when every connected agent of the mesh has reported it applied.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field

from verity.pki import RotationStage, RotationState


@dataclass
class AgentStatus:
    dataplane: str  # "<namespace>/<name>"
    mesh: str
    spiffe_id: str
    applied_roots: frozenset[str] = frozenset()
    leaf_root: str = ""
    leaf_serial: str = ""
    leaf_not_after: int = 0
    reported: bool = False


@dataclass(frozen=True)
class Progress:
    stage: RotationStage
    reached: int
    total: int
    lagging: tuple[str, ...]

    @property
    def complete(self) -> bool:
        return self.reached == self.total


def stage_reached(state: RotationState, agent: AgentStatus) -> bool:
    """Whether this agent's proxy has applied what the current stage asks of it."""
    if not agent.reported:
        return False
    bundle = set(state.bundle.fingerprints)
    match state.stage:
        case RotationStage.NEW_ROOT_ADDED | RotationStage.STABLE:
            return bundle <= agent.applied_roots
        case RotationStage.REISSUING:
            return (
                bundle <= agent.applied_roots
                and agent.leaf_root == state.signing_ca.root_fingerprint_sha256
            )
        case RotationStage.OLD_ROOT_REMOVED:
            return agent.applied_roots == bundle


def progress(state: RotationState, agents: Iterable[AgentStatus]) -> Progress:
    members = list(agents)
    lagging = tuple(sorted(a.dataplane for a in members if not stage_reached(state, a)))
    return Progress(state.stage, len(members) - len(lagging), len(members), lagging)


@dataclass
class AgentRegistry:
    """The agents connected to this control-plane process, with wake-ups for their streams."""

    _agents: dict[int, AgentStatus] = field(default_factory=dict)
    _changed: dict[str, asyncio.Event] = field(default_factory=dict)

    def connect(self, status: AgentStatus) -> int:
        handle = id(status)
        self._agents[handle] = status
        return handle

    def disconnect(self, handle: int) -> None:
        self._agents.pop(handle, None)

    def of_mesh(self, mesh: str) -> list[AgentStatus]:
        return [a for a in self._agents.values() if a.mesh == mesh]

    def all(self) -> list[AgentStatus]:
        return list(self._agents.values())

    def bundle_event(self, mesh: str) -> asyncio.Event:
        return self._changed.setdefault(mesh, asyncio.Event())

    def notify_bundle_changed(self, mesh: str) -> None:
        """Wake every stream of the mesh to send the new bundle."""
        self._changed.pop(mesh, asyncio.Event()).set()
