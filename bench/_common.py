"""Helpers the end-to-end benchmarks share: a real control plane, agents, plain Envoys, and
what /proc says about a process (CPU time, private memory).

Self-contained on purpose (only the `verity` package and its CLI): the test harness may
change shape without breaking the benchmarks.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere: `verity` comes from here
    sys.path.insert(0, str(REPO))
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- small things --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (`fraction` in 0..1) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def command_line(script: str, argv: Sequence[str]) -> str:
    """How to run this benchmark again with the same options, from the repository root."""
    return shlex.join([".venv/bin/python", f"bench/{script}", *argv])


def wait_until(what: str, predicate: Any, timeout: float, interval: float = 0.05) -> float:
    """Seconds until predicate() is true; TimeoutError naming `what` if it never is."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


# --- /proc -----------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()  # fields from the 3rd on (state) after "(comm)"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the whole process (all threads), in seconds."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: fields 14 and 15


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat_fields(int(entry.name))[1]) == pid:  # ppid
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def envoy_child(pid: int, timeout: float = 10.0) -> int:
    """The Envoy process an agent supervises (its child named envoy)."""

    def find() -> int | None:
        for child in children(pid):
            with_name = Path(f"/proc/{child}/comm")
            if with_name.exists() and with_name.read_text().strip() == "envoy":
                return child
        return None

    wait_until(f"the Envoy of process {pid}", lambda: find() is not None, timeout)
    found = find()
    assert found is not None
    return found


@dataclass(frozen=True)
class Memory:
    rss_kb: int
    pss_kb: int
    uss_kb: int  # private: Private_Clean + Private_Dirty

    def line(self) -> str:
        return (
            f"USS {self.uss_kb / 1024:5.1f} MB  PSS {self.pss_kb / 1024:5.1f} MB"
            f"  RSS {self.rss_kb / 1024:5.1f} MB"
        )


def memory(pid: int) -> Memory:
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        values[name] = int(rest.split()[0])
    private = values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)
    return Memory(values.get("Rss", 0), values.get("Pss", 0), private)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --- a plain Envoy from a static configuration -----------------------------------------------


def envoy_binary() -> str:
    from verity.dataplane.envoybinary import envoy_binary as find

    return str(find())


@dataclass
class PlainEnvoy:
    """An Envoy with a static bootstrap, one worker thread, no hot restart."""

    name: str
    bootstrap: dict[str, Any]
    workdir: Path
    admin_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        config = dict(self.bootstrap)
        config["admin"] = {"address": socket_address(self.admin_port)}
        path = self.workdir / f"{self.name}.json"
        path.write_text(json.dumps(config))
        log = (self.workdir / f"{self.name}.log").open("ab")
        argv = [envoy_binary(), "-c", str(path), "--concurrency", "1"]
        argv += ["--disable-hot-restart", "--log-level", "warn"]
        self.process = subprocess.Popen(argv, stdout=log, stderr=log)
        ready = f"http://127.0.0.1:{self.admin_port}/ready"
        wait_until(f"Envoy {self.name} ready", lambda: http_ok(ready), timeout)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        stop_process(self.process)


def socket_address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def http_listener(name: str, port: int, route: dict[str, Any]) -> dict[str, Any]:
    """A plaintext HTTP listener whose only route does `route` (a route action or answer)."""
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "codec_type": "AUTO",
        "route_config": {
            "virtual_hosts": [
                {"name": name, "domains": ["*"], "routes": [{"match": {"prefix": "/"}, **route}]}
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    chain = {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                          "typed_config": manager}]}  # fmt: skip
    return {"name": name, "address": socket_address(port), "filter_chains": [chain]}


def static_cluster(name: str, port: int) -> dict[str, Any]:
    endpoint = {"endpoint": {"address": socket_address(port)}}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]},
    }


def forwarding_envoy(name: str, port: int, upstream: int, workdir: Path) -> PlainEnvoy:
    """One bare proxy hop: HTTP on `port` to 127.0.0.1:`upstream`, no TLS, no RBAC."""
    route = {"route": {"cluster": "upstream", "timeout": "0s"}}
    resources = {
        "listeners": [http_listener(name, port, route)],
        "clusters": [static_cluster("upstream", upstream)],
    }
    return PlainEnvoy(name, {"static_resources": resources}, workdir)


def responder_envoy(name: str, port: int, body: bytes, workdir: Path) -> PlainEnvoy:
    """An "app" that answers every request with 200 and a fixed body (direct_response)."""
    route = {"direct_response": {"status": 200, "body": {"inline_string": body.decode()}}}
    resources = {"listeners": [http_listener(name, port, route)]}
    return PlainEnvoy(name, {"static_resources": resources}, workdir)


# --- the control plane and agents --------------------------------------------------------------


def cli_env(config_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERITY_")}
    env["VERITY_CONFIG"] = str(config_dir / "config.json")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class ControlPlane:
    workdir: Path
    api_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0  # time.monotonic() when the process was started

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def ca_file(self) -> Path:
        return self.data_dir / "cp-ca.pem"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 30.0) -> None:
        argv = [sys.executable, "-m", "verity.cli.main", "control-plane", "run"]
        argv += ["--data-dir", str(self.data_dir), "--api-address", f"127.0.0.1:{self.api_port}"]
        argv += ["--grpc-address", self.grpc_target]
        log = (self.workdir / "control-plane.log").open("ab")
        env = cli_env(self.workdir / "config")
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=log, cwd=REPO)
        wait_until("control plane ready", self._ready, timeout)

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            tail = (self.workdir / "control-plane.log").read_text()[-2000:]
            raise RuntimeError(f"control plane exited: {tail}")
        return http_ok(f"{self.api}/readyz")

    def stop(self) -> None:
        stop_process(self.process, timeout=30)

    def client(self) -> httpx.Client:
        token = (self.data_dir / "admin-token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        return httpx.Client(base_url=self.api, headers=headers, timeout=60)

    def apply(self, documents: Sequence[dict[str, Any]] | str) -> None:
        """Apply YAML text or documents through the REST API (all or nothing)."""
        body = documents if isinstance(documents, str) else yaml.safe_dump_all(documents)
        with self.client() as api:
            reply = api.post("/api/v1/apply", content=body)
        if reply.status_code != 200:
            raise RuntimeError(f"apply refused ({reply.status_code}): {reply.text[:500]}")

    def dataplane_token(self, namespace: str, service_account: str) -> str:
        body = {"namespace": namespace, "serviceAccount": service_account}
        with self.client() as api:
            reply = api.post("/api/v1/tokens/dataplane", json=body)
        reply.raise_for_status()
        token: str = reply.json()["token"]
        return token


@contextmanager
def running_control_plane(workdir: Path) -> Iterator[ControlPlane]:
    cp = ControlPlane(workdir)
    try:
        cp.start()
        yield cp
    finally:
        cp.stop()


def dataplane_document(
    name: str,
    *,
    namespace: str = "default",
    service: str,
    inbound: Sequence[tuple[int, int]] = (),
    outbound: Sequence[tuple[str, int, int]] = (),
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Dataplane on 127.0.0.1: inbound (port, appPort), outbound (service, port, localPort);
    `labels` (default app=<service>) are the workload's, which policy selectors match."""
    labels = labels or {"app": service}
    spec: dict[str, Any] = {
        "service": service,
        "labels": dict(labels),
        "serviceAccount": service,
        "address": "127.0.0.1",
        "inbound": [{"port": p, "appPort": a, "protocol": "http"} for p, a in inbound],
        "outbound": [{"service": s, "port": p, "localPort": lp} for s, p, lp in outbound],
    }
    metadata = {"name": name, "namespace": namespace, "labels": labels}
    return {"apiVersion": "verity.dev/v1alpha1", "kind": "Dataplane", "metadata": metadata,
            "spec": spec}  # fmt: skip


@dataclass
class Agent:
    """A `verity dataplane run` process and its Envoy."""

    name: str
    workdir: Path
    admin_port: int = field(default_factory=free_port)
    ready_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0  # time.monotonic() just before the process was spawned
    started_wall: float = 0.0  # time.time() then, to compare with the log's timestamps

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def launch(self, cp: ControlPlane, document: dict[str, Any], token: str) -> None:
        dataplane_file = self.workdir / f"{self.name}.yaml"
        dataplane_file.write_text(yaml.safe_dump(document))
        token_file = self.workdir / f"{self.name}.token"
        token_file.write_text(token)
        token_file.chmod(0o600)
        argv = [sys.executable, "-m", "verity.cli.main", "dataplane", "run"]
        argv += ["--dataplane-file", str(dataplane_file), "--token-file", str(token_file)]
        argv += ["--cp-address", cp.grpc_target, "--ca-cert", str(cp.ca_file)]
        argv += ["--admin-port", str(self.admin_port), "--ready-port", str(self.ready_port)]
        argv += ["--concurrency", "1", "--drain-time", "1"]
        log = self.log_path.open("ab")
        env = cli_env(cp.workdir / "config")
        self.started_at, self.started_wall = time.monotonic(), time.time()
        self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=log, cwd=REPO)

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_until(f"agent {self.name} ready", self._ready, timeout)

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"agent {self.name} exited: {self.log_path.read_text()[-3000:]}")
        return http_ok(f"http://127.0.0.1:{self.ready_port}/ready")

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
        return records

    def stop(self) -> None:
        stop_process(self.process, timeout=30)


MESH = {
    "apiVersion": "verity.dev/v1alpha1",
    "kind": "Mesh",
    "metadata": {"name": "default"},
    "spec": {"certificates": {"validity": "1h"}},
}

ALLOW_WEB_TO_API = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-from-web, namespace: default}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/web"]}}]
"""


if __name__ == "__main__":  # `make bench` runs every script here; this one only has helpers
    print("helpers for the benchmarks beside this file; nothing to measure")
