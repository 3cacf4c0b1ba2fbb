"""Which authorization resources apply to a workload (a Dataplane), with Istio's rules.

An AuthorizationPolicy or RequestAuthentication in namespace `P` applies to a workload in
namespace `W` with labels `L` and service `S` when:

- it has `targetRef`/`targetRefs`: `P == W` and one of them names the Service `S` (group ""
  or "core", kind Service). Other kinds (Gateway, ServiceEntry...) never select a sidecar;
- else, with `selector.matchLabels` all in `L` (an empty or missing selector matches every
  workload), and `P == W` or `P` is the mesh's root namespace. So a policy in the root
  namespace without a selector is mesh-wide, and with one it applies to matching workloads
  in every namespace, as in Istio.

A Kuma TrafficPermission applies when it belongs to the workload's mesh and one of its
destinations is the workload's service or '*'. Its sources are services; the identities that
run them are read from the mesh's Dataplanes (`service_identities`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from verity.resources import (
    AuthorizationPolicy,
    Dataplane,
    MeshSpec,
    RequestAuthentication,
    TrafficPermission,
)
from verity.resources.istio import (
    AuthorizationPolicySpec,
    PolicyTargetReference,
    RequestAuthenticationSpec,
    WorkloadSelector,
)

_SERVICE_GROUPS = ("", "core")
_R = TypeVar("_R", AuthorizationPolicy, RequestAuthentication, TrafficPermission)


@dataclass(frozen=True)
class WorkloadPolicies:
    """Everything that decides who may call one workload.

    - `authorization_policies`, `request_authentications`, `traffic_permissions`: the
      resources that select the workload, ordered by (namespace, name);
    - `service_identities`: SPIFFE IDs of the instances of each service of the mesh (what a
      TrafficPermission source names);
    - `revoked`: SPIFFE IDs refused before any policy is consulted.
    """

    mesh: MeshSpec
    workload: Dataplane
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()
    request_authentications: tuple[RequestAuthentication, ...] = ()
    traffic_permissions: tuple[TrafficPermission, ...] = ()
    service_identities: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    revoked: frozenset[str] = frozenset()
    # Compiled rules per protocol, filled by verity.policy.authz on first use.
    cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def trust_domains(self) -> tuple[str, ...]:
        return (self.mesh.trust_domain, *self.mesh.trust_domain_aliases)


def policies_for(
    mesh: MeshSpec,
    workload: Dataplane,
    *,
    authorization_policies: Iterable[AuthorizationPolicy] = (),
    request_authentications: Iterable[RequestAuthentication] = (),
    traffic_permissions: Iterable[TrafficPermission] = (),
    dataplanes: Iterable[Dataplane] = (),
    revoked: Iterable[str] = (),
) -> WorkloadPolicies:
    """The resources among those given that apply to `workload` (see the module docstring).

    `dataplanes` are the mesh's registered workloads: they tell which identities run the
    source services of TrafficPermissions.
    """
    root = mesh.root_namespace
    return WorkloadPolicies(
        mesh=mesh,
        workload=workload,
        authorization_policies=_sorted(
            p for p in authorization_policies if _selects(p.namespace, p.spec, workload, root)
        ),
        request_authentications=_sorted(
            r for r in request_authentications if _selects(r.namespace, r.spec, workload, root)
        ),
        traffic_permissions=_sorted(
            t for t in traffic_permissions if traffic_permission_applies(t, workload)
        ),
        service_identities=service_identities(mesh, workload.spec.mesh, dataplanes),
        revoked=frozenset(revoked),
    )


def _sorted(resources: Iterable[_R]) -> tuple[_R, ...]:
    return tuple(sorted(resources, key=lambda r: (r.namespace, r.name)))


def _selects(
    namespace: str,
    spec: AuthorizationPolicySpec | RequestAuthenticationSpec,
    workload: Dataplane,
    root_namespace: str,
) -> bool:
    targets = [spec.target_ref] if spec.target_ref is not None else (spec.target_refs or [])
    return selects(namespace, spec.selector, targets, workload, root_namespace)


def selects(
    namespace: str,
    selector: WorkloadSelector | None,
    target_refs: Sequence[PolicyTargetReference],
    workload: Dataplane,
    root_namespace: str,
) -> bool:
    """Whether a policy in `namespace` with this selector or these targets applies to
    `workload` (at most one of the two is set, as validation ensures)."""
    if target_refs:
        return namespace == workload.namespace and any(
            _names_service(t, workload) for t in target_refs
        )
    if namespace not in (workload.namespace, root_namespace):
        return False
    match_labels = selector.match_labels if selector else {}
    return all(workload.spec.labels.get(k) == v for k, v in match_labels.items())


def _names_service(target: PolicyTargetReference, workload: Dataplane) -> bool:
    return (
        target.group in _SERVICE_GROUPS
        and target.kind == "Service"
        and target.name == workload.spec.service
    )


def traffic_permission_applies(permission: TrafficPermission, workload: Dataplane) -> bool:
    _, destinations = permission.allowed_services()
    return permission.mesh == workload.spec.mesh and any(
        d in ("*", workload.spec.service) for d in destinations
    )


def service_identities(
    mesh: MeshSpec, mesh_name: str, dataplanes: Iterable[Dataplane]
) -> dict[str, tuple[str, ...]]:
    """Kuma service name -> the SPIFFE IDs its instances run as (services are mesh-wide)."""
    found: dict[str, set[str]] = {}
    for dataplane in dataplanes:
        if dataplane.spec.mesh == mesh_name:
            found.setdefault(dataplane.spec.service, set()).add(
                dataplane.spiffe_id(mesh.trust_domain)
            )
    return {service: tuple(sorted(ids)) for service, ids in sorted(found.items())}
