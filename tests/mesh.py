"""A small real mesh for end-to-end tests: a control plane, app processes and their agents.

Everything is real: the control-plane process, `verity dataplane run` agents with their Envoys,
TLS with certificates from the mesh CA. Apps are the demo's stdlib HTTP services, run in this
process on loopback ports.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path

import httpx
import yaml

from demo.apps import serve
from tests.support import REPO, ControlPlane, cli_env, free_port, running_control_plane


@dataclass
class Workload:
    name: str
    service: str
    service_account: str
    namespace: str
    inbound_port: int
    app_port: int
    admin_port: int
    ready_port: int
    outbound: dict[str, int]  # service -> local port the app calls
    dataplane_file: Path
    token_file: Path
    log_path: Path
    extra_args: list[str]
    app: ThreadingHTTPServer | None = None
    agent: subprocess.Popen[bytes] | None = None

    @property
    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.ready_port}/ready"

    def outbound_url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.outbound[service]}"


@dataclass
class Mesh:
    cp: ControlPlane
    workdir: Path
    workloads: dict[str, Workload] = field(default_factory=dict)

    def apply(self, text: str) -> None:
        result = self.cp.cli(["apply", "-f", "-"], stdin=text)
        assert result.returncode == 0, result.stderr

    def add(
        self,
        service: str,
        *,
        namespace: str = "default",
        protocol: str = "http",
        calls: tuple[str, ...] = (),
        extra_args: tuple[str, ...] = (),
    ) -> Workload:
        name = f"{service}-1"
        outbound = {dep: free_port() for dep in calls}
        workload = Workload(
            name=name,
            service=service,
            service_account=service,
            namespace=namespace,
            inbound_port=free_port(),
            app_port=free_port(),
            admin_port=free_port(),
            ready_port=free_port(),
            outbound=outbound,
            dataplane_file=self.workdir / f"{name}.yaml",
            token_file=self.workdir / f"{name}.token",
            log_path=self.workdir / f"{name}.log",
            extra_args=list(extra_args),
        )
        self.workloads[service] = workload
        self._write_dataplane(workload, protocol)
        token = self.cp.cli(
            ["token", "create", "dataplane", "-n", namespace, "--service-account", service]
        )
        assert token.returncode == 0, token.stderr
        workload.token_file.write_text(token.stdout)
        workload.token_file.chmod(0o600)
        upstreams = {dep: workload.outbound_url(dep) for dep in calls}
        workload.app = serve(service, "127.0.0.1", workload.app_port, upstreams)
        self.start_agent(workload)
        return workload

    def _write_dataplane(self, w: Workload, protocol: str) -> None:
        outbound = []
        for dep, local in w.outbound.items():
            outbound.append(
                {"service": dep, "port": self.workloads[dep].inbound_port, "localPort": local}
            )
        doc = {
            "apiVersion": "verity.dev/v1alpha1",
            "kind": "Dataplane",
            "metadata": {"name": w.name, "namespace": w.namespace},
            "spec": {
                "service": w.service,
                "serviceAccount": w.service_account,
                "address": "127.0.0.1",
                "inbound": [{"port": w.inbound_port, "appPort": w.app_port, "protocol": protocol}],
                "outbound": outbound,
            },
        }
        w.dataplane_file.write_text(yaml.safe_dump(doc))

    def start_agent(self, w: Workload, timeout: float = 20.0) -> None:
        log = w.log_path.open("ab")
        w.agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "verity.cli.main",
                "dataplane",
                "run",
                "--dataplane-file",
                str(w.dataplane_file),
                "--token-file",
                str(w.token_file),
                "--cp-address",
                self.cp.grpc_target,
                "--ca-cert",
                str(self.cp.ca_file),
                "--admin-port",
                str(w.admin_port),
                "--ready-port",
                str(w.ready_port),
                "--drain-time",
                "1",
                *w.extra_args,
            ],
            env=cli_env(self.cp.config_dir),
            stdout=log,
            stderr=log,
            cwd=REPO,
        )
        self.wait_ready(w, timeout)

    def wait_ready(self, w: Workload, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert w.agent is not None
            if w.agent.poll() is not None:
                raise RuntimeError(f"agent {w.name} exited: {w.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(w.ready_url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"agent {w.name} not ready: {w.log_path.read_text()[-3000:]}")

    def stop_agent(self, w: Workload, sig: int = signal.SIGTERM) -> int:
        assert w.agent is not None
        w.agent.send_signal(sig)
        return w.agent.wait(timeout=30)

    def close(self) -> None:
        for w in self.workloads.values():
            if w.agent is not None and w.agent.poll() is None:
                self.stop_agent(w)
            if w.app is not None:
                w.app.shutdown()


def call(url: str, timeout: float = 5.0) -> int:
    """Status of a GET; 0 when the connection fails."""
    try:
        return httpx.get(url, timeout=timeout).status_code
    except httpx.HTTPError:
        return 0


def wait_for(predicate: object, timeout: float = 10.0, interval: float = 0.1) -> float:
    """Seconds until predicate() holds; fails the test on timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - start
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


@contextmanager
def running_mesh(tmp: Path, mesh_yaml: str | None = None) -> Iterator[Mesh]:
    with running_control_plane(tmp) as cp:
        mesh = Mesh(cp, tmp)
        if mesh_yaml:
            mesh.apply(mesh_yaml)
        try:
            yield mesh
        finally:
            mesh.close()
