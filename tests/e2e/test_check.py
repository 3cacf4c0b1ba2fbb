"""`verity check` against a real control plane: decisions, the deciding policy, and the reasons."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import REPO, ControlPlane, running_control_plane

DATAPLANES = """\
apiVersion: verity.dev/v1alpha1
kind: Dataplane
metadata: {{name: {service}-1, namespace: shop}}
spec:
  service: {service}
  serviceAccount: {service}
  labels: {{app: {service}}}
  address: 127.0.0.1
  inbound: [{{port: {port}, appPort: {app_port}, protocol: http}}]
"""


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with running_control_plane(tmp_path_factory.mktemp("check")) as plane:
        docs = [
            DATAPLANES.format(service=s, port=p, app_port=p + 1)
            for s, p in (("users", 18000), ("items", 18010), ("invoices", 18020))
        ]
        applied = plane.cli(["apply", "-f", "-"], stdin="---\n".join(docs))
        assert applied.returncode == 0, applied.stderr
        policy = plane.cli(["apply", "-f", str(REPO / "demo" / "manifests" / "policy.yaml")])
        assert policy.returncode == 0, policy.stderr
        yield plane


def check(cp: ControlPlane, *args: str) -> dict[str, object]:
    result = cp.cli(["check", "-n", "shop", "-o", "json", *args])
    assert result.returncode == 0, result.stderr
    view: dict[str, object] = json.loads(result.stdout)
    return view


def test_allowed_caller_names_the_policy_and_rule(cp: ControlPlane) -> None:
    view = check(cp, "--from", "spiffe://cluster.local/ns/shop/sa/invoices", "--to", "items")
    assert view["verdict"] == "ALLOW" and view["status"] == 200
    assert "shop/items-from-invoices" in str(view["decidedBy"])


def test_denied_caller_is_denied_by_default_and_says_why(cp: ControlPlane) -> None:
    view = check(cp, "--from", "spiffe://cluster.local/ns/shop/sa/users", "--to", "items")
    assert view["verdict"] == "DENY" and view["status"] == 403
    text = cp.cli(
        [
            "check",
            "-n",
            "shop",
            "--from",
            "spiffe://cluster.local/ns/shop/sa/users",
            "--to",
            "items",
            "--explain",
        ]
    ).stdout
    assert "items-from-invoices" in text and "did not match" in text
    assert "evaluation:" in text


def test_plaintext_caller_is_denied(cp: ControlPlane) -> None:
    assert check(cp, "--to", "users")["verdict"] == "DENY"


def test_unknown_service_and_bad_port_are_clear_errors(cp: ControlPlane) -> None:
    missing = cp.cli(["check", "-n", "shop", "--to", "nobody"])
    assert missing.returncode == 1 and "no Dataplane of service 'nobody'" in missing.stderr
    bad = cp.cli(["check", "-n", "shop", "--to", "users", "--port", "1"])
    assert bad.returncode == 1 and "port" in bad.stderr


def test_check_follows_live_changes(cp: ControlPlane, tmp_path: Path) -> None:
    args = ("--from", "spiffe://cluster.local/ns/shop/sa/users", "--to", "items")
    assert check(cp, *args)["verdict"] == "DENY"
    change = REPO / "demo" / "manifests" / "users-may-read-items.yaml"
    assert cp.cli(["apply", "-f", str(change)]).returncode == 0
    deadline = time.monotonic() + 5
    while check(cp, *args)["verdict"] != "ALLOW" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert check(cp, *args)["verdict"] == "ALLOW"
    assert check(cp, *args, "--method", "POST")["verdict"] == "DENY"


TCP_POLICY = """\
apiVersion: verity.dev/v1alpha1
kind: Dataplane
metadata: {name: db-1, namespace: shop}
spec:
  service: db
  serviceAccount: db
  labels: {app: db}
  address: 127.0.0.1
  inbound: [{port: 15432, appPort: 5432, protocol: tcp}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-readers, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/invoices"]}}]
    to: [{operation: {methods: ["GET"]}}]
"""


def test_apply_warns_about_http_fields_on_a_tcp_port(cp: ControlPlane) -> None:
    result = cp.cli(["apply", "-f", "-"], stdin=TCP_POLICY)
    assert result.returncode == 0, result.stderr
    assert "warning: AuthorizationPolicy shop/db-readers rules[0]" in result.stderr
    assert "on TCP port 15432 this ALLOW rule never matches" in result.stderr
    # ...and the evaluator agrees: the rule cannot admit a TCP connection.
    view = check(cp, "--from", "spiffe://cluster.local/ns/shop/sa/invoices", "--to", "db")
    assert view["verdict"] == "DENY"
