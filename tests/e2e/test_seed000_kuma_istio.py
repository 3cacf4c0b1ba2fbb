"""Seed 000's policy written as Kuma TrafficPermissions and as Istio AuthorizationPolicies is
enforced the same by real sidecars: every cell of the permission matrix agrees."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from demo.tour import ALLOWED, NAMESPACE, SERVICES
from tests.mesh import Mesh, running_mesh, wait_for

KUMA = """\
apiVersion: kuma.io/v1alpha1
kind: TrafficPermission
mesh: default
metadata: {name: invoices-to-users-and-items}
spec:
  sources: [{match: {kuma.io/service: invoices}}]
  destinations: [{match: {kuma.io/service: users}}, {match: {kuma.io/service: items}}]
---
type: TrafficPermission
name: users-to-invoices
mesh: default
sources: [{match: {kuma.io/service: users}}]
destinations: [{match: {kuma.io/service: invoices}}]
"""

ISTIO = (Path(__file__).resolve().parents[2] / "demo" / "manifests" / "policy.yaml").read_text()


def matrix(mesh: Mesh) -> dict[tuple[str, str], int]:
    cells = {}
    for caller in SERVICES:
        app = mesh.workloads[caller].app_port
        for callee in SERVICES:
            if caller != callee:
                reply = httpx.get(f"http://127.0.0.1:{app}/call/{callee}/whoami", timeout=10)
                cells[(caller, callee)] = int(reply.json()["status"])
    return cells


EXPECTED = {(a, b): 200 if (a, b) in ALLOWED else 403 for a in SERVICES for b in SERVICES if a != b}


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    with running_mesh(tmp_path) as m:
        for service in SERVICES:
            m.add(service, namespace=NAMESPACE, calls=tuple(s for s in SERVICES if s != service))
        yield m


@pytest.mark.parametrize("policy", [KUMA, ISTIO], ids=["kuma", "istio"])
def test_seed_000_matrix(mesh: Mesh, policy: str) -> None:
    assert set(matrix(mesh).values()) == {403}  # default deny before any policy
    mesh.apply(policy)
    wait_for(lambda: matrix(mesh) == EXPECTED, timeout=15)
