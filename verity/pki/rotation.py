"""Root rotation without downtime, as a pure state machine.

    STABLE --add_new_root--> NEW_ROOT_ADDED --start_reissuing--> REISSUING
       ^                          |                                  |
       +------abort_rotation------+                          remove_old_root
       |                                                             v
       +-------------------finish_rotation------------------ OLD_ROOT_REMOVED

stage              signs leaves with   trust bundle
STABLE             current             current
NEW_ROOT_ADDED     current             current + incoming
REISSUING          incoming            current + incoming
OLD_ROOT_REMOVED   incoming            incoming
(back to STABLE, where incoming has become current)

A step is only safe once the previous stage has reached every proxy: new leaves must not
be served before every peer trusts the new root, and the old root must not be dropped while
a proxy still holds a leaf from it. Watching proxies is the control plane's job; each gated
step takes `previous_stage_reached_all_proxies` and refuses, saying why, when it is False.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from verity.pki.bundle import TrustBundle
from verity.pki.ca import CertificateAuthority
from verity.pki.errors import RotationError


class RotationStage(StrEnum):
    STABLE = "STABLE"
    NEW_ROOT_ADDED = "NEW_ROOT_ADDED"
    REISSUING = "REISSUING"
    OLD_ROOT_REMOVED = "OLD_ROOT_REMOVED"


@dataclass(frozen=True)
class RotationState:
    stage: RotationStage
    current: CertificateAuthority
    incoming: CertificateAuthority | None = None

    def __post_init__(self) -> None:
        if (self.stage is RotationStage.STABLE) != (self.incoming is None):
            raise RotationError(f"stage {self.stage} requires incoming CA iff not STABLE")

    @property
    def signing_ca(self) -> CertificateAuthority:
        if self.stage in (RotationStage.STABLE, RotationStage.NEW_ROOT_ADDED):
            return self.current
        return self._incoming()

    @property
    def bundle(self) -> TrustBundle:
        match self.stage:
            case RotationStage.STABLE:
                return self.current.trust_bundle
            case RotationStage.NEW_ROOT_ADDED | RotationStage.REISSUING:
                return self.current.trust_bundle.with_root(self._incoming().root)
            case RotationStage.OLD_ROOT_REMOVED:
                return self._incoming().trust_bundle

    def _incoming(self) -> CertificateAuthority:
        assert self.incoming is not None  # guaranteed by __post_init__
        return self.incoming


def stable(ca: CertificateAuthority) -> RotationState:
    return RotationState(RotationStage.STABLE, ca)


def _require(state: RotationState, expected: RotationStage, step: str) -> None:
    if state.stage is not expected:
        raise RotationError(f"cannot {step}: stage is {state.stage}, expected {expected}")


def _require_propagated(state: RotationState, reached: bool, step: str, what: str) -> None:
    if not reached:
        raise RotationError(f"cannot {step} yet: {what} has not reached every proxy")


def add_new_root(state: RotationState, new_ca: CertificateAuthority) -> RotationState:
    """Start trusting the new root everywhere; leaves are still signed by the old CA."""
    _require(state, RotationStage.STABLE, "add a new root")
    if new_ca.trust_domain != state.current.trust_domain or new_ca.mesh != state.current.mesh:
        raise RotationError(
            f"cannot add a new root: it is for mesh {new_ca.mesh!r} / trust domain "
            f"{new_ca.trust_domain!r}, not {state.current.mesh!r} / "
            f"{state.current.trust_domain!r}"
        )
    if new_ca.root_fingerprint_sha256 == state.current.root_fingerprint_sha256:
        raise RotationError("cannot add a new root: it is the root already in use")
    return RotationState(RotationStage.NEW_ROOT_ADDED, state.current, new_ca)


def abort_rotation(state: RotationState) -> RotationState:
    """Drop the new root again; safe only before anything was signed with it."""
    _require(state, RotationStage.NEW_ROOT_ADDED, "abort the rotation")
    return stable(state.current)


def start_reissuing(
    state: RotationState, *, previous_stage_reached_all_proxies: bool
) -> RotationState:
    """Sign with the new CA. Gate: every proxy trusts the two-root bundle."""
    _require(state, RotationStage.NEW_ROOT_ADDED, "start reissuing")
    _require_propagated(
        state, previous_stage_reached_all_proxies, "start reissuing", "the two-root bundle"
    )
    return RotationState(RotationStage.REISSUING, state.current, state.incoming)


def remove_old_root(
    state: RotationState, *, previous_stage_reached_all_proxies: bool
) -> RotationState:
    """Stop trusting the old root. Gate: every proxy holds a leaf from the new CA."""
    _require(state, RotationStage.REISSUING, "remove the old root")
    _require_propagated(
        state, previous_stage_reached_all_proxies, "remove the old root", "a reissued leaf"
    )
    return RotationState(RotationStage.OLD_ROOT_REMOVED, state.current, state.incoming)


def finish_rotation(
    state: RotationState, *, previous_stage_reached_all_proxies: bool
) -> RotationState:
    """The new CA becomes current. Gate: every proxy has the one-root bundle."""
    _require(state, RotationStage.OLD_ROOT_REMOVED, "finish the rotation")
    _require_propagated(
        state, previous_stage_reached_all_proxies, "finish the rotation", "the new-root bundle"
    )
    return stable(state._incoming())


def advance(
    state: RotationState,
    *,
    previous_stage_reached_all_proxies: bool,
    new_ca: CertificateAuthority | None = None,
) -> RotationState:
    """The next step from wherever `state` is; new_ca is needed (only) from STABLE."""
    reached = previous_stage_reached_all_proxies
    match state.stage:
        case RotationStage.STABLE:
            if new_ca is None:
                raise RotationError("cannot add a new root: no new CA given")
            return add_new_root(state, new_ca)
        case RotationStage.NEW_ROOT_ADDED:
            return start_reissuing(state, previous_stage_reached_all_proxies=reached)
        case RotationStage.REISSUING:
            return remove_old_root(state, previous_stage_reached_all_proxies=reached)
        case RotationStage.OLD_ROOT_REMOVED:
            return finish_rotation(state, previous_stage_reached_all_proxies=reached)
