"""A real mesh on one host, for the demo and the end-to-end tests.

A control-plane process, the marketplace apps, and a `verity dataplane run` agent (with its
Envoy) per workload, wired exactly as a user would wire them: the CLI for tokens and
resources, Dataplane YAML files, the control plane's CA file for the agents.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path

import httpx
import yaml

from demo.apps import serve

REPO = Path(__file__).resolve().parent.parent


class MeshError(RuntimeError):
    """A step of bringing the mesh up failed; the message says which and why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cli_env(config_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERITY_")}
    env["VERITY_CONFIG"] = str(config_dir / "config.json")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass
class ControlPlane:
    data_dir: Path
    config_dir: Path
    port: int
    log_path: Path
    grpc_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = field(default=0)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def ca_file(self) -> Path:
        return self.data_dir / "cp-ca.pem"

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()

    def start(self, timeout: float = 20.0) -> None:
        self.starts += 1
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "verity.cli.main",
                "control-plane",
                "run",
                "--data-dir",
                str(self.data_dir),
                "--api-address",
                f"127.0.0.1:{self.port}",
                "--grpc-address",
                self.grpc_target,
            ],
            env=cli_env(self.config_dir),
            stdout=log,
            stderr=log,
            cwd=REPO,
        )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise MeshError(f"control plane exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.api}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"control plane not ready after {timeout}s")

    def kill(self, sig: int = signal.SIGKILL) -> int:
        if self.process is None:
            return 0
        self.process.send_signal(sig)
        return self.process.wait(timeout=20)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill(signal.SIGTERM)

    def client(self, token: str | None = None) -> httpx.Client:
        secret = self.admin_token if token is None else token
        return httpx.Client(
            base_url=self.api, headers={"Authorization": f"Bearer {secret}"}, timeout=10
        )

    def cli(
        self, args: Sequence[str], stdin: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "verity.cli.main", *args],
            env=cli_env(self.config_dir, env),
            input=stdin,
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )


@contextmanager
def running_control_plane(tmp: Path) -> Iterator[ControlPlane]:
    cp = ControlPlane(
        data_dir=tmp / "data", config_dir=tmp / "config", port=free_port(), log_path=tmp / "cp.log"
    )
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


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
    service_ports: dict[str, int] = field(default_factory=dict)

    def service_port(self, service: str) -> int:
        """The inbound port of a service, chosen once, so dependencies can be declared first."""
        return self.service_ports.setdefault(service, free_port())

    def apply(self, text: str) -> None:
        result = self.cp.cli(["apply", "-f", "-"], stdin=text)
        if result.returncode != 0:
            raise MeshError(f"apply failed: {result.stderr.strip()}")

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
            inbound_port=self.service_port(service),
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
        if token.returncode != 0:
            raise MeshError(f"token for {service} failed: {token.stderr.strip()}")
        workload.token_file.write_text(token.stdout)
        workload.token_file.chmod(0o600)
        upstreams = {dep: workload.outbound_url(dep) for dep in calls}
        workload.app = serve(service, "127.0.0.1", workload.app_port, upstreams)
        self.start_agent(workload)
        return workload

    def _write_dataplane(self, w: Workload, protocol: str) -> None:
        outbound = []
        for dep, local in w.outbound.items():
            outbound.append({"service": dep, "port": self.service_port(dep), "localPort": local})
        doc = {
            "apiVersion": "verity.dev/v1alpha1",
            "kind": "Dataplane",
            "metadata": {"name": w.name, "namespace": w.namespace},
            "spec": {
                "service": w.service,
                "serviceAccount": w.service_account,
                "labels": {"app": w.service},
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
            if w.agent is None or w.agent.poll() is not None:
                raise MeshError(f"agent {w.name} exited: {w.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(w.ready_url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"agent {w.name} not ready: {w.log_path.read_text()[-3000:]}")

    def stop_agent(self, w: Workload, sig: int = signal.SIGTERM) -> int:
        if w.agent is None:
            return 0
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


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.1) -> float:
    """Seconds until predicate() holds; AssertionError on timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
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
