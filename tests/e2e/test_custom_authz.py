"""End to end: a CUSTOM AuthorizationPolicy delegating to a real external authorizer.

The authorizer is a small gRPC ext_authz server (Envoy's envoy.service.auth.v3 API) in this
test; the mesh is real (control plane, agents, Envoys). The provider is declared on the Mesh.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2, status_pb2

from tests.mesh import Mesh, running_mesh, wait_for
from tests.support import free_port

MESH = """\
apiVersion: verity.dev/v1alpha1
kind: Mesh
metadata: {{name: default}}
spec:
  authorization:
    providers:
    - name: corp-authz
      envoyExtAuthzGrpc: {{service: localhost, port: {port}}}
"""

POLICIES = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-from-web, namespace: default}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/web"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: guarded-by-corp, namespace: default}
spec:
  selector: {matchLabels: {app: api}}
  action: CUSTOM
  provider: {name: corp-authz}
  rules:
  - to: [{operation: {paths: ["/whoami"]}}]
"""


class Authorizer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Allows a request that carries `x-approved: yes`; records every check it is asked."""

    def __init__(self) -> None:
        self.checked: list[str] = []

    def Check(self, request: Any, context: Any) -> Any:
        http = request.attributes.request.http
        self.checked.append(http.path)
        allowed = http.headers.get("x-approved") == "yes"
        code = code_pb2.OK if allowed else code_pb2.PERMISSION_DENIED
        return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code))


@pytest.fixture(scope="module")
def authorizer() -> Iterator[tuple[Authorizer, int]]:
    service, port = Authorizer(), free_port()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(service, server)
    server.add_insecure_port(f"[::]:{port}")  # the sidecar resolves localhost: v4 or v6
    server.start()
    yield service, port
    server.stop(0).wait(10)


@pytest.fixture(scope="module")
def mesh(
    tmp_path_factory: pytest.TempPathFactory, authorizer: tuple[Authorizer, int]
) -> Iterator[Mesh]:
    with running_mesh(tmp_path_factory.mktemp("custom"), MESH.format(port=authorizer[1])) as m:
        m.apply(POLICIES)
        m.add("api")
        m.add("web", calls=("api",))
        yield m


def web_get(mesh: Mesh, path: str, **headers: str) -> int:
    url = mesh.workloads["web"].outbound_url("api") + path
    return httpx.get(url, headers=headers, timeout=5).status_code


def test_custom_provider_allows_and_denies(mesh: Mesh, authorizer: tuple[Authorizer, int]) -> None:
    service, _ = authorizer
    wait_for(lambda: web_get(mesh, "/whoami", **{"x-approved": "yes"}) == 200, timeout=15)
    assert web_get(mesh, "/whoami") == 403
    assert "/whoami" in service.checked


def test_requests_outside_the_custom_rules_never_reach_the_provider(
    mesh: Mesh, authorizer: tuple[Authorizer, int]
) -> None:
    service, _ = authorizer
    before = len(service.checked)
    assert web_get(mesh, "/health") == 200
    assert len(service.checked) == before
