"""translate() on the marketplace: golden files, determinism, order independence.

The marketplace: users, items and invoices in namespace shop; invoices calls users and items,
users calls invoices, and AuthorizationPolicies allow exactly those calls (plus reports to
users) and refuse /admin from outside the namespace. A second snapshot adds `reports`, with a
transparent proxy, gRPC and TCP ports, port-level modes and its own AuthorizationPolicy.
These snapshots are also what the real-Envoy test loads.

Regenerate the golden files after an intended change with VERITY_UPDATE_GOLDEN=1, and review
the diff like code.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Iterable
from pathlib import Path

from google.protobuf import json_format
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from verity.resources import (
    AuthorizationPolicy,
    Dataplane,
    Mesh,
    PeerAuthentication,
    load_documents,
)
from verity.xds import typeurls
from verity.xds.snapshot import MeshSnapshot
from verity.xds.translate import Resources, translate

GOLDEN = Path(__file__).parent / "golden"
REVOKED = "spiffe://cluster.local/ns/shop/sa/retired"

MESH = """
apiVersion: verity.dev/v1alpha1
kind: Mesh
metadata: {name: default}
spec:
  mtls: {mode: MODE}
  egress: {defaultAction: EGRESS}
"""

MARKETPLACE = """
apiVersion: verity.dev/v1alpha1
kind: Dataplane
metadata: {name: users-1, namespace: shop}
spec:
  service: users
  serviceAccount: users
  labels: {app: users}
  address: 10.0.0.11
  inbound: [{name: http, port: 8080, appPort: 3001, protocol: http}]
  outbound: [{service: invoices, port: 8080, localPort: 10003}]
---
apiVersion: verity.dev/v1alpha1
kind: Dataplane
metadata: {name: items-1, namespace: shop}
spec:
  service: items
  serviceAccount: items
  labels: {app: items}
  address: 10.0.0.12
  inbound: [{name: http, port: 8080, appPort: 3002, protocol: http}]
---
apiVersion: verity.dev/v1alpha1
kind: Dataplane
metadata: {name: invoices-1, namespace: shop}
spec:
  service: invoices
  serviceAccount: invoices
  labels: {app: invoices}
  address: 10.0.0.13
  inbound: [{name: http, port: 8080, appPort: 3003, protocol: http}]
  outbound:
  - {service: users, port: 8080, localPort: 10001}
  - {service: items, namespace: shop, port: 8080, localPort: 10002}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: users, namespace: shop}
spec:
  selector: {matchLabels: {app: users}}
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/shop/sa/invoices, cluster.local/ns/shop/sa/reports]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: items, namespace: shop}
spec:
  selector: {matchLabels: {app: items}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/invoices]}}]
    to: [{operation: {methods: [GET, HEAD]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: invoices, namespace: shop}
spec:
  selector: {matchLabels: {app: invoices}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/users]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin-from-outside, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {notNamespaces: [shop]}}]
    to: [{operation: {paths: ["/admin", "/admin/{**}"]}}]
"""

REPORTS = """
apiVersion: verity.dev/v1alpha1
kind: Dataplane
metadata: {name: users-2, namespace: shop}
spec:
  service: users
  serviceAccount: users
  labels: {app: users}
  address: 10.0.0.21
  inbound: [{name: http, port: 8080, appPort: 3001, protocol: http}]
---
apiVersion: verity.dev/v1alpha1
kind: Dataplane
metadata: {name: reports-1, namespace: shop}
spec:
  service: reports
  serviceAccount: reports
  labels: {app: reports}
  address: 10.0.0.30
  transparentProxy: {enabled: true}
  inbound:
  - {name: http, port: 8080, protocol: http}
  - {name: grpc, port: 9090, appPort: 3090, protocol: grpc}
  - {name: db, port: 5432, protocol: tcp}
  outbound:
  - {service: users, port: 8080}
  - {service: items, port: 8080, localPort: 10002}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: reports, namespace: shop}
spec:
  selector: {matchLabels: {app: reports}}
  mtls: {mode: UNSET}
  portLevelMtls:
    5432: {mode: PERMISSIVE}
    8080: {mode: DISABLE}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reports, namespace: shop}
spec:
  selector: {matchLabels: {app: reports}}
  rules:
  - from: [{source: {namespaces: [shop]}}]
    to: [{operation: {ports: ["9090", "5432"]}}]
  - to: [{operation: {ports: ["8080"], methods: [GET]}}]
"""

MARKETPLACE_KEYS = ("shop/users-1", "shop/items-1", "shop/invoices-1")


def snapshot(
    mode: str = "STRICT",
    *,
    extra: str = "",
    egress: str = "DENY",
    ready: Iterable[str] | None = None,
    revoked: Iterable[str] = (REVOKED,),
) -> MeshSnapshot:
    """The marketplace (plus `extra` YAML documents) as one mesh snapshot; every Dataplane
    is ready unless `ready` says otherwise."""
    mesh_doc = MESH.replace("MODE", mode).replace("EGRESS", egress)
    (mesh,) = load_documents(textwrap.dedent(mesh_doc))
    assert isinstance(mesh, Mesh)
    documents = load_documents(MARKETPLACE + ("---\n" + extra if extra else ""))
    dataplanes = tuple(d for d in documents if isinstance(d, Dataplane))
    policies = tuple(d for d in documents if isinstance(d, PeerAuthentication))
    authorization = tuple(d for d in documents if isinstance(d, AuthorizationPolicy))
    keys = {f"{d.namespace}/{d.name}" for d in dataplanes}
    return MeshSnapshot(
        mesh_name=mesh.name,
        mesh=mesh.as_verity_mesh(),
        dataplanes=dataplanes,
        peer_authentications=policies,
        revoked=frozenset(revoked),
        ready=frozenset(keys if ready is None else ready),
        authorization_policies=authorization,
    )


def with_reports(mode: str = "STRICT", *, revoked: Iterable[str] = (REVOKED,)) -> MeshSnapshot:
    """The marketplace plus a second users instance (not ready) and reports."""
    ready = {*MARKETPLACE_KEYS, "shop/reports-1"}
    return snapshot(mode, extra=REPORTS, egress="ALLOW", ready=ready, revoked=revoked)


def as_json(resources: Resources) -> str:
    """Stable JSON of translate()'s output: short type name -> resource name -> message."""
    document = {
        typeurls.short_name(type_url): {name: _dict(m) for name, m in named.items()}
        for type_url, named in resources.items()
    }
    return json.dumps(document, indent=1, sort_keys=True) + "\n"


def _dict(message: Message) -> object:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def wire(resources: Resources) -> list[tuple[str, str, bytes]]:
    return [
        (type_url, name, message.SerializeToString(deterministic=True))
        for type_url, named in resources.items()
        for name, message in named.items()
    ]


def check_golden(name: str, resources: Resources) -> None:
    path = GOLDEN / f"{name}.json"
    text = as_json(resources)
    if os.environ.get("VERITY_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path.name} missing: run with VERITY_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{path.name} differs: review, then VERITY_UPDATE_GOLDEN=1"


# --- golden files ------------------------------------------------------------------------------


def test_marketplace_golden() -> None:
    mesh = snapshot()
    for key in MARKETPLACE_KEYS:
        check_golden("marketplace-" + key.replace("/", "-"), translate(mesh, key))


def test_transparent_proxy_golden() -> None:
    check_golden("transparent-shop-reports-1", translate(with_reports(), "shop/reports-1"))


# --- determinism -------------------------------------------------------------------------------


def test_same_input_same_bytes() -> None:
    for key in MARKETPLACE_KEYS:
        assert wire(translate(snapshot(), key)) == wire(translate(snapshot(), key))
    reports = "shop/reports-1"
    assert wire(translate(with_reports(), reports)) == wire(translate(with_reports(), reports))


def _shuffled(base: MeshSnapshot, order: list[int], policy_order: list[int]) -> MeshSnapshot:
    return MeshSnapshot(
        mesh_name=base.mesh_name,
        mesh=base.mesh,
        dataplanes=tuple(base.dataplanes[i] for i in order),
        peer_authentications=tuple(base.peer_authentications[i] for i in policy_order),
        revoked=base.revoked,
        ready=base.ready,
        authorization_policies=tuple(reversed(base.authorization_policies)),
    )


def _outbound_reversed(dataplane: Dataplane) -> Dataplane:
    spec = dataplane.spec.model_copy(
        update={
            "outbound": list(reversed(dataplane.spec.outbound)),
            "inbound": list(reversed(dataplane.spec.inbound)),
        }
    )
    return dataplane.model_copy(update={"spec": spec})


BASE = with_reports(revoked=(REVOKED, "spiffe://cluster.local/ns/shop/sa/gone"))
BASE_OUTPUT = {key: wire(translate(BASE, f"shop/{key}")) for key in ("reports-1", "invoices-1")}


@settings(max_examples=40, deadline=None)
@given(
    order=st.permutations(range(len(BASE.dataplanes))),
    policy_order=st.permutations(range(len(BASE.peer_authentications))),
    reverse_lists=st.booleans(),
)
def test_input_order_does_not_change_the_output(
    order: list[int], policy_order: list[int], reverse_lists: bool
) -> None:
    shuffled = _shuffled(BASE, order, policy_order)
    if reverse_lists:
        shuffled = MeshSnapshot(
            mesh_name=shuffled.mesh_name,
            mesh=shuffled.mesh,
            dataplanes=tuple(_outbound_reversed(d) for d in shuffled.dataplanes),
            peer_authentications=shuffled.peer_authentications,
            revoked=frozenset(reversed(sorted(shuffled.revoked))),
            ready=shuffled.ready,
            authorization_policies=shuffled.authorization_policies,
        )
    for key, expected in BASE_OUTPUT.items():
        assert wire(translate(shuffled, f"shop/{key}")) == expected
