"""End to end: a real control-plane process, its REST API, and the `verity` CLI against it."""

from __future__ import annotations

import json
import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support import REPO, ControlPlane, running_control_plane

POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-web
  namespace: shop
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/web"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/items/*"]
"""

STRICT = """\
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: default
  namespace: {namespace}
spec:
  mtls:
    mode: {mode}
"""


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with running_control_plane(tmp_path_factory.mktemp("cp")) as plane:
        yield plane


def test_admin_token_file_is_private(cp: ControlPlane) -> None:
    mode = stat.S_IMODE((cp.data_dir / "admin-token").stat().st_mode)
    assert mode == 0o600
    assert cp.admin_token.startswith("vrtu_")


def test_health_ready_metrics_openapi(cp: ControlPlane) -> None:
    with cp.client() as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").status_code == 200
        assert "verity_api_requests" in http.get("/metrics").text
        spec = http.get("/openapi.json").json()
        assert "/api/v1/apply" in spec["paths"]


def test_apply_get_round_trip_through_cli(cp: ControlPlane, tmp_path: Path) -> None:
    manifest = tmp_path / "policy.yaml"
    manifest.write_text(POLICY)
    applied = cp.cli(["apply", "-f", str(manifest)])
    assert applied.returncode == 0, applied.stderr
    assert "AuthorizationPolicy shop/allow-web created" in applied.stdout

    again = cp.cli(["apply", "-f", str(manifest)])
    assert "AuthorizationPolicy shop/allow-web unchanged" in again.stdout

    shown = cp.cli(["get", "authorizationpolicy", "allow-web", "-n", "shop", "-o", "yaml"])
    assert shown.returncode == 0, shown.stderr
    got = yaml.safe_load(shown.stdout)
    meta = got["metadata"]
    assert {"uid", "resourceVersion", "generation", "creationTimestamp"} <= set(meta)
    for owned in ("uid", "resourceVersion", "generation", "creationTimestamp", "updateTimestamp"):
        meta.pop(owned, None)
    assert got == yaml.safe_load(POLICY)

    table = cp.cli(["get", "ap", "-n", "shop"])
    assert "allow-web" in table.stdout and "action=ALLOW" in table.stdout


def test_get_output_reapplies_cleanly(cp: ControlPlane, tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY.replace("allow-web", "reapply"))
    assert cp.cli(["apply", "-f", str(tmp_path / "p.yaml")]).returncode == 0
    exported = cp.cli(["get", "ap", "reapply", "-n", "shop", "-o", "yaml"]).stdout
    result = cp.cli(["apply", "-f", "-"], stdin=exported)
    assert result.returncode == 0, result.stderr
    assert "unchanged" in result.stdout


def test_dry_run_changes_nothing(cp: ControlPlane, tmp_path: Path) -> None:
    (tmp_path / "pa.yaml").write_text(STRICT.format(namespace="dry", mode="STRICT"))
    result = cp.cli(["apply", "--dry-run", "-f", str(tmp_path / "pa.yaml")])
    assert result.returncode == 0, result.stderr
    assert "PeerAuthentication dry/default created (dry run)" in result.stdout
    missing = cp.cli(["get", "pa", "default", "-n", "dry"])
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_bad_enum_is_one_clear_line_and_nothing_stored(cp: ControlPlane, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(STRICT.format(namespace="enum", mode="STRCT"))
    result = cp.cli(["apply", "-f", str(tmp_path / "bad.yaml")])
    assert result.returncode == 1
    assert "spec.mtls.mode" in result.stderr and "STRCT" in result.stderr
    assert result.stdout == ""
    with cp.client() as http:
        assert http.get("/api/v1/resources/pa", params={"namespace": "enum"}).json()["items"] == []


def test_malformed_yaml_via_api_is_422_naming_the_document(cp: ControlPlane) -> None:
    with cp.client() as http:
        reply = http.post("/api/v1/apply", content="kind: [unclosed\n")
    assert reply.status_code == 422
    assert "document 1" in reply.json()["error"]


def test_bad_document_in_the_middle_applies_nothing(cp: ControlPlane) -> None:
    docs = "---\n".join(
        [
            STRICT.format(namespace="atomic", mode="STRICT"),
            STRICT.format(namespace="atomic2", mode="STRCT"),
            STRICT.format(namespace="atomic3", mode="PERMISSIVE"),
        ]
    )
    with cp.client() as http:
        reply = http.post("/api/v1/apply", content=docs)
        assert reply.status_code == 422
        assert "document 2" in reply.json()["error"] or "atomic2" in reply.json()["error"]
        for ns in ("atomic", "atomic2", "atomic3"):
            listed = http.get("/api/v1/resources/pa", params={"namespace": ns}).json()
            assert listed["items"] == []


def test_stale_update_is_409_and_changes_nothing(cp: ControlPlane) -> None:
    with cp.client() as http:
        first = http.post("/api/v1/apply", content=STRICT.format(namespace="occ", mode="STRICT"))
        version = first.json()["results"][0]["resourceVersion"]
        http.post("/api/v1/apply", content=STRICT.format(namespace="occ", mode="PERMISSIVE"))
        stale = yaml.safe_load(STRICT.format(namespace="occ", mode="DISABLE"))
        stale["metadata"]["resourceVersion"] = str(version)
        reply = http.post("/api/v1/update", content=yaml.safe_dump(stale))
        assert reply.status_code == 409
        assert "stale" in reply.json()["error"]
        current = http.get("/api/v1/resources/pa/default", params={"namespace": "occ"}).json()
        assert current["spec"]["mtls"]["mode"] == "PERMISSIVE"


def test_oversized_body_is_413(cp: ControlPlane) -> None:
    with cp.client() as http:
        reply = http.post("/api/v1/apply", content="#" * (5 * 1024 * 1024))
    assert reply.status_code == 413


def test_scoped_token_outside_namespace_is_403_and_revoked_is_401(cp: ControlPlane) -> None:
    created = cp.cli(
        [
            "token",
            "create",
            "user",
            "--name",
            "alice",
            "--namespace",
            "shop",
            "--verbs",
            "get,apply",
        ]
    )
    assert created.returncode == 0, created.stderr
    alice = created.stdout.strip()
    assert alice.startswith("vrtu_")
    with cp.client(alice) as http:
        ok = http.post("/api/v1/apply", content=STRICT.format(namespace="shop", mode="STRICT"))
        assert ok.status_code == 200, ok.text
        denied = http.post(
            "/api/v1/apply", content=STRICT.format(namespace="payments", mode="STRICT")
        )
        assert denied.status_code == 403
        assert "apply PeerAuthentication in namespace 'payments'" in denied.json()["error"]
        assert (
            http.delete("/api/v1/resources/pa/default", params={"namespace": "shop"}).status_code
            == 403
        )
        assert http.get("/api/v1/tokens").status_code == 403
    listed = cp.cli(["token", "list"])
    assert "alice" in listed.stdout and alice not in listed.stdout
    assert cp.cli(["token", "revoke", "alice"]).returncode == 0
    with cp.client(alice) as http:
        reply = http.get("/api/v1/resources/pa", params={"namespace": "shop"})
        assert reply.status_code == 401 and "revoked" in reply.json()["error"]
    with cp.client("vrtu_not-a-real-token-at-all-xxxxxxxx") as http:
        assert http.get("/api/v1/resources/pa").status_code == 401
    no_token = httpx.get(f"{cp.api}/api/v1/resources/pa", timeout=10)
    assert no_token.status_code == 401 and "missing bearer token" in no_token.json()["error"]


def test_cli_finds_api_and_token_from_environment(cp: ControlPlane, tmp_path: Path) -> None:
    env = {
        "VERITY_API": cp.api,
        "VERITY_TOKEN": cp.admin_token,
        "VERITY_CONFIG": str(tmp_path / "absent.json"),
    }
    result = cp.cli(["get", "mesh"], env=env)
    assert result.returncode == 0, result.stderr
    wrong = cp.cli(["get", "mesh"], env={**env, "VERITY_TOKEN": "vrtu_wrongwrongwrongwrongwrong"})
    assert (
        wrong.returncode == 1 and "unknown token" in wrong.stderr and "(HTTP 401)" in wrong.stderr
    )


def test_audit_log_and_verify(cp: ControlPlane) -> None:
    with cp.client() as http:
        http.post("/api/v1/apply", content=STRICT.format(namespace="audited", mode="STRICT"))
    log = cp.cli(["audit", "log", "-n", "audited", "-o", "json"])
    entries = json.loads(log.stdout)
    entries = entries if isinstance(entries, list) else [entries]
    assert [(e["action"], e["kind"], e["actor"]) for e in entries] == [
        ("create", "PeerAuthentication", "admin")
    ]
    verified = cp.cli(["audit", "verify"])
    assert verified.returncode == 0 and "intact" in verified.stdout


def test_delete_by_name_and_by_file(cp: ControlPlane, tmp_path: Path) -> None:
    manifest = tmp_path / "del.yaml"
    manifest.write_text(STRICT.format(namespace="gone", mode="STRICT"))
    assert cp.cli(["apply", "-f", str(manifest)]).returncode == 0
    assert "deleted" in cp.cli(["delete", "-f", str(manifest)]).stdout
    assert cp.cli(["apply", "-f", str(manifest)]).returncode == 0
    assert "deleted" in cp.cli(["delete", "pa", "default", "-n", "gone"]).stdout
    missing = cp.cli(["delete", "pa", "default", "-n", "gone"])
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_examples_apply(cp: ControlPlane) -> None:
    result = cp.cli(["apply", "-R", "-f", str(REPO / "examples")])
    assert result.returncode == 0, result.stderr


def test_unwritable_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    plane = ControlPlane(
        data_dir=blocker / "data", config_dir=tmp_path, port=1, log_path=tmp_path / "log"
    )
    result = plane.cli(["control-plane", "run", "--data-dir", str(blocker / "data")])
    assert result.returncode != 0
    assert "data dir" in result.stderr and "Traceback" not in result.stderr


def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    with running_control_plane(tmp_path) as plane:
        assert plane.kill(signal.SIGTERM) == 0
        assert "control plane stopped" in plane.log_path.read_text()


def test_logs_hold_no_tokens(cp: ControlPlane) -> None:
    text = cp.log_path.read_text()
    assert cp.admin_token not in text
    assert "vrtu_" not in text
    assert os.path.getsize(cp.log_path) > 0
