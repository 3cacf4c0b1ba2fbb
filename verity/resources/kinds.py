"""The registry of supported kinds: document (apiVersion, kind) -> model, and CLI spellings."""

from __future__ import annotations

from dataclasses import dataclass

from verity.resources.common import Model
from verity.resources.errors import describe
from verity.resources.istio import (
    ISTIO_API_VERSIONS,
    AuthorizationPolicy,
    AuthorizationPolicySpec,
    PeerAuthentication,
    PeerAuthenticationSpec,
    RequestAuthentication,
    RequestAuthenticationSpec,
)
from verity.resources.kuma import (
    KUMA_API_VERSION,
    KumaMesh,
    KumaMeshSpec,
    TrafficPermission,
    TrafficPermissionSpec,
)
from verity.resources.resource import Resource
from verity.resources.verity_kinds import (
    VERITY_API_VERSION,
    Dataplane,
    DataplaneSpec,
    Mesh,
    MeshSpec,
    RevocationList,
    RevocationListSpec,
)


@dataclass(frozen=True)
class KindInfo:
    """One (apiVersion, kind) users may write, and how it is read."""

    api_version: str
    kind: str  # as written: `kind`, or `type` in Kuma's universal form
    resource: type[Resource]
    spec_model: type[Model]
    top_level: tuple[str, ...] = ()  # fields beside metadata and spec (Kuma's `mesh`)
    kuma: bool = False  # Kuma kind: also accepted in the universal form

    @property
    def store_kind(self) -> str:
        return self.resource.STORE_KIND

    @property
    def namespaced(self) -> bool:
        return self.resource.NAMESPACED


KINDS: tuple[KindInfo, ...] = (
    KindInfo(VERITY_API_VERSION, "Mesh", Mesh, MeshSpec),
    KindInfo(VERITY_API_VERSION, "Dataplane", Dataplane, DataplaneSpec),
    KindInfo(VERITY_API_VERSION, "RevocationList", RevocationList, RevocationListSpec),
    *(
        KindInfo(version, kind, resource, spec)
        for version in ISTIO_API_VERSIONS
        for kind, resource, spec in (
            ("PeerAuthentication", PeerAuthentication, PeerAuthenticationSpec),
            ("AuthorizationPolicy", AuthorizationPolicy, AuthorizationPolicySpec),
            ("RequestAuthentication", RequestAuthentication, RequestAuthenticationSpec),
        )
    ),
    KindInfo(KUMA_API_VERSION, "Mesh", KumaMesh, KumaMeshSpec, kuma=True),
    KindInfo(
        KUMA_API_VERSION,
        "TrafficPermission",
        TrafficPermission,
        TrafficPermissionSpec,
        ("mesh",),
        kuma=True,
    ),
)

SUPPORTED_KINDS: list[tuple[str, str]] = [(info.api_version, info.kind) for info in KINDS]
API_VERSIONS: tuple[str, ...] = tuple(dict.fromkeys(info.api_version for info in KINDS))
STORE_KINDS: tuple[str, ...] = tuple(sorted({info.store_kind for info in KINDS}))
UNIVERSAL_TYPES: tuple[str, ...] = tuple(info.kind for info in KINDS if info.kuma)

_GROUPS = ("verity.dev", "security.istio.io", "kuma.io")
_SHORT_NAMES = {
    "dp": "Dataplane",
    "ap": "AuthorizationPolicy",
    "pa": "PeerAuthentication",
    "ra": "RequestAuthentication",
    "tp": "TrafficPermission",
    "rl": "RevocationList",
}


def find_kind(api_version: str, kind: str) -> KindInfo | None:
    return next((i for i in KINDS if i.api_version == api_version and i.kind == kind), None)


def find_universal(type_name: str) -> KindInfo | None:
    return next((i for i in KINDS if i.kuma and i.kind == type_name), None)


def kinds_of(api_version: str) -> list[str]:
    return [i.kind for i in KINDS if i.api_version == api_version]


def _plural(singular: str) -> str:
    if singular.endswith("y"):
        return singular[:-1] + "ies"
    return singular + ("es" if singular.endswith("sh") else "s")


def _build_aliases() -> dict[str, str]:
    aliases = dict(_SHORT_NAMES)
    for kind in STORE_KINDS:
        aliases[kind.lower()] = kind
        aliases[_plural(kind.lower())] = kind
    return aliases


_ALIASES = _build_aliases()


def kind_alias(name: str) -> str:
    """The store kind for a CLI spelling: `ap`, `authorizationpolicies`, `meshes.kuma.io`."""
    spelled = name.strip().lower()
    base, _, group = spelled.partition(".")
    if group in _GROUPS:
        spelled = base
    if spelled not in _ALIASES:
        raise ValueError(f"unknown kind {describe(name)}; known kinds: {', '.join(STORE_KINDS)}")
    return _ALIASES[spelled]


def is_namespaced(kind: str) -> bool:
    """Whether resources of this store kind (or CLI spelling) live in a namespace."""
    store_kind = kind_alias(kind)
    return next(i.namespaced for i in KINDS if i.store_kind == store_kind)
