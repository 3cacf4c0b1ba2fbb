"""Simulated hosts for multi-host end-to-end tests: network namespaces on a private bridge.

Each host is a network namespace with loopback up, one veth into a bridge, an address in a
private test subnet and its own `/etc/netns/<ns>/hosts` (which `ip netns exec` mounts as
/etc/hosts). The bridge lives in a namespace of its own, so the root namespace's interfaces,
routes and firewall are never touched. Processes run on a host with `ip netns exec`; the test
process itself acts from a host for one call by running it on a fresh thread that joined the
host's namespace (setns is per thread, so the rest of the test process is unaffected).

On top of that, `MeshHosts` runs Verity across the hosts: a control plane on one, and per
service an app, a `verity dataplane run --transparent` agent and its Envoy on another, all as
real processes. Everything (processes, namespaces, hosts files) goes in `close()`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from tests.support import REPO

T = TypeVar("T")

SUBNET = "10.231.0"  # a private test range; only ever configured inside our namespaces
PREFIX_LEN = 24
NETNS_DIR = Path("/run/netns")
HOSTS_DIR = Path("/etc/netns")
CLONE_NEWNET = 0x40000000
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be used here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root: network namespaces, veth pairs and iptables"
    if shutil.which("ip") is None:
        return "needs `ip` (iproute2) for network namespaces"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"`ip netns` is unavailable: {probe.stderr.strip()}"
    return None


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of processes on the hosts: no proxies (every call must go where the
    test points it) and no Verity settings of whoever runs the tests."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("VERITY_") and key.lower() not in _PROXY_VARIABLES
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _run(argv: Sequence[str]) -> None:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")


_libc = ctypes.CDLL(None, use_errno=True)


def _join_netns(netns: str) -> None:
    fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {netns}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def in_netns(netns: str, fn: Callable[[], T], timeout: float = 30.0) -> T:
    """fn() on a new thread inside `netns`: its sockets are that host's sockets."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            _join_netns(netns)
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"in-{netns}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"call in {netns} still running after {timeout}s")
    if "error" in outcome:
        raise outcome["error"]
    value: T = outcome["value"]
    return value


@dataclass
class Host:
    """One simulated host: a network namespace with an address on the test bridge."""

    name: str
    netns: str
    address: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def argv(self, command: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *command]

    def run(
        self, command: Sequence[str], *, stdin: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(command),
            input=stdin,
            capture_output=True,
            text=True,
            env=env or clean_env(),
            cwd=REPO,
            timeout=60,
            check=False,
        )

    def spawn(
        self, command: Sequence[str], log_path: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process here (`ip netns exec` execs it: same pid)."""
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                self.argv(command), stdout=log, stderr=log, env=env or clean_env(), cwd=REPO
            )
        self.processes.append(process)
        return process

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        return in_netns(self.netns, fn, timeout)

    def http_get(self, url: str, timeout: float = 5.0) -> httpx.Response:
        return self.call(lambda: httpx.get(url, timeout=timeout, trust_env=False), timeout + 5)

    def status(self, url: str, timeout: float = 5.0) -> int:
        """Status of a GET from this host; 0 if the connection fails."""
        try:
            return self.http_get(url, timeout).status_code
        except httpx.HTTPError:
            return 0

    def nat_table(self) -> str:
        result = self.run(["iptables-save", "-t", "nat"])
        assert result.returncode == 0, result.stderr
        return result.stdout

    def stop_processes(self) -> None:
        for process in reversed(self.processes):
            stop_process(process)
        self.processes.clear()


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            return process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(timeout=15)


class Network:
    """A bridge in its own namespace, and hosts attached to it. `close()` removes it all."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.bridge_netns = f"{tag}-net"
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        _run(["ip", "netns", "add", self.bridge_netns])
        self._namespaces.append(self.bridge_netns)
        bridge = ["ip", "-n", self.bridge_netns, "link"]
        _run([*bridge, "add", "br0", "type", "bridge"])
        _run([*bridge, "set", "br0", "up"])

    def add_host(self, name: str, octet: int) -> Host:
        netns = f"{self.tag}-{name}"
        address = f"{SUBNET}.{octet}"
        _run(["ip", "netns", "add", netns])
        self._namespaces.append(netns)
        port = f"v-{name}"[:15]
        veth = ["type", "veth", "peer", "name", "eth0", "netns", netns]
        _run(["ip", "-n", self.bridge_netns, "link", "add", port, *veth])
        _run(["ip", "-n", self.bridge_netns, "link", "set", port, "master", "br0", "up"])
        _run(["ip", "-n", netns, "addr", "add", f"{address}/{PREFIX_LEN}", "dev", "eth0"])
        _run(["ip", "-n", netns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", netns, "link", "set", "lo", "up"])
        host = Host(name, netns, address)
        self.hosts[name] = host
        return host

    def write_hosts_files(self, names: Mapping[str, str]) -> None:
        """Every host resolves `names` (name -> address) through its own /etc/hosts."""
        lines = ["127.0.0.1 localhost"]
        lines += [f"{address} {name}" for name, address in names.items()]
        for host in self.hosts.values():
            directory = HOSTS_DIR / host.netns
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "hosts").write_text("\n".join([*lines, f"127.0.1.1 {host.name}", ""]))

    def close(self) -> None:
        """Stop our processes, then anything still inside our namespaces, then remove the
        namespaces (the veths and the bridge go with them) and the hosts files."""
        for host in self.hosts.values():
            host.stop_processes()
        for netns in self._namespaces:
            _kill_remaining(netns)
        for netns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
            shutil.rmtree(HOSTS_DIR / netns, ignore_errors=True)
        self._namespaces.clear()
        with contextlib.suppress(OSError):  # only if empty: other tools may keep theirs there
            HOSTS_DIR.rmdir()


def _kill_remaining(netns: str) -> None:
    # Only processes inside a namespace this harness created: ours (e.g. an orphaned Envoy).
    found = subprocess.run(
        ["ip", "netns", "pids", netns], capture_output=True, text=True, check=False
    )
    for pid in found.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@contextmanager
def network(tag: str, addresses: Mapping[str, int]) -> Iterator[Network]:
    """A network with a host per `addresses` entry (name -> last octet), removed on exit."""
    net = Network(tag)
    try:
        for name, octet in addresses.items():
            net.add_host(name, octet)
        yield net
    finally:
        net.close()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until predicate() holds; AssertionError naming `what` on timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout}s")


# ---------------------------------------------------------------------------------------------
# Verity across the hosts

VERITY = [sys.executable, "-m", "verity.cli.main"]
CP_GRPC_PORT = 5678
CP_API = "127.0.0.1:5681"  # the REST API stays on the control-plane host's loopback
ADMIN_PORT = 9901
READY_PORT = 9902


@dataclass
class Service:
    """One service on its own host: the app, its Dataplane and token, its agent."""

    name: str
    host: Host
    namespace: str
    mesh_port: int
    app_port: int
    calls: tuple[str, ...]
    workdir: Path
    app: subprocess.Popen[bytes] | None = None
    agent: subprocess.Popen[bytes] | None = None

    @property
    def dataplane_file(self) -> Path:
        return self.workdir / f"{self.name}.yaml"

    @property
    def token_file(self) -> Path:
        return self.workdir / f"{self.name}.token"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}-agent.log"

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://cluster.local/ns/{self.namespace}/sa/{self.name}"

    def ready(self) -> bool:
        return self.host.status(f"http://127.0.0.1:{READY_PORT}/ready", timeout=1) == 200

    def stats(self, pattern: str) -> dict[str, int]:
        """Envoy's counters and gauges whose names match `pattern` (a regex)."""
        url = f"http://127.0.0.1:{ADMIN_PORT}/stats?filter={pattern}"
        found: dict[str, int] = {}
        for line in self.host.http_get(url).text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                found[name] = int(value)
        return found

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class MeshHosts:
    """A control plane on `cp_host` and services on their own hosts, as real processes."""

    network: Network
    cp_host: Host
    workdir: Path
    services: dict[str, Service] = field(default_factory=dict)
    cp: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.workdir / "cp-data"

    @property
    def cp_log(self) -> Path:
        return self.workdir / "cp.log"

    @property
    def cp_target(self) -> str:
        return f"{self.cp_host.address}:{CP_GRPC_PORT}"

    def env(self) -> dict[str, str]:
        return clean_env({"VERITY_CONFIG": str(self.workdir / "cli" / "config.json")})

    def start_control_plane(self, timeout: float = 30.0) -> None:
        address = self.cp_host.address
        self.cp = self.cp_host.spawn(
            [
                *VERITY,
                "control-plane",
                "run",
                "--data-dir",
                str(self.data_dir),
                "--api-address",
                CP_API,
                "--grpc-address",
                self.cp_target,
                "--server-name",
                address,
            ],
            self.cp_log,
            self.env(),
        )
        wait_until(self._cp_ready, timeout, f"control plane ready (log: {self.cp_log})")

    def _cp_ready(self) -> bool:
        if self.cp is None or self.cp.poll() is not None:
            raise AssertionError(f"control plane exited: {self.cp_log.read_text()[-2000:]}")
        return self.cp_host.status(f"http://{CP_API}/readyz", timeout=1) == 200

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """`verity ...` on the control-plane host."""
        return self.cp_host.run([*VERITY, *args], stdin=stdin, env=self.env())

    def apply(self, text: str) -> None:
        result = self.cli("apply", "-f", "-", stdin=text)
        assert result.returncode == 0, result.stderr

    def add_service(self, service: Service) -> None:
        self.services[service.name] = service
        self._write_dataplane(service)
        token = self.cli(
            *("token", "create", "dataplane", "-n", service.namespace),
            *("--service-account", service.name, "--name", f"{service.name}-dataplane"),
        )
        assert token.returncode == 0, token.stderr
        service.token_file.write_text(token.stdout)
        service.token_file.chmod(0o600)

    def _write_dataplane(self, service: Service) -> None:
        port = service.mesh_port
        doc = {
            "apiVersion": "verity.dev/v1alpha1",
            "kind": "Dataplane",
            "metadata": {"name": f"{service.name}-1", "namespace": service.namespace},
            "spec": {
                "service": service.name,
                "serviceAccount": service.name,
                "labels": {"app": service.name},
                "address": service.host.address,
                "inbound": [{"port": port, "appPort": service.app_port, "protocol": "http"}],
                # No localPort: the app dials service names and iptables brings it here.
                "outbound": [{"service": callee, "port": port} for callee in service.calls],
                "transparentProxy": {"enabled": True},
            },
        }
        service.dataplane_file.write_text(yaml.safe_dump(doc))

    def start_app(self, service: Service) -> None:
        """The app, as a naive app would run: listening on every interface of its host,
        calling its dependencies by service name."""
        upstreams = [f"--upstream={c}=http://{c}:{service.mesh_port}" for c in service.calls]
        everywhere = "0.0.0.0"  # noqa: S104 - deliberately: interception must still cover it
        app = [sys.executable, "-m", "demo.apps", "--service", service.name]
        app += ["--host", everywhere, "--port", str(service.app_port), *upstreams]
        service.app = service.host.spawn(app, self.workdir / f"{service.name}-app.log")

    def start_agent(self, service: Service) -> None:
        service.agent = service.host.spawn(
            [
                *VERITY,
                "dataplane",
                "run",
                "--transparent",
                *("--dataplane-file", str(service.dataplane_file)),
                *("--token-file", str(service.token_file)),
                *("--cp-address", self.cp_target),
                *("--ca-cert", str(self.data_dir / "cp-ca.pem")),
                *("--work-dir", str(self.workdir / f"{service.name}-work")),
                *("--admin-port", str(ADMIN_PORT), "--ready-port", str(READY_PORT)),
                *("--drain-time", "1"),
            ],
            service.log_path,
            self.env(),
        )

    def wait_ready(self, service: Service, timeout: float = 30.0) -> float:
        def ready() -> bool:
            if service.agent is None or service.agent.poll() is not None:
                raise AssertionError(f"agent of {service.name} exited: {service.log()[-3000:]}")
            return service.ready()

        return wait_until(ready, timeout, f"agent of {service.name} ready")

    def call(self, caller: str, callee: str, path: str = "/whoami") -> tuple[int, Any]:
        """`caller`'s app calls `callee` by name (through both sidecars): the callee's status
        as the caller's app saw it (0 if the caller's app did not answer), and its body."""
        service = self.services[caller]
        url = f"http://127.0.0.1:{service.app_port}/call/{callee}{path}"
        try:
            reply = service.host.http_get(url, timeout=10).json()
        except (httpx.HTTPError, ValueError):
            return 0, None
        return int(reply["status"]), reply["body"]

    def close(self) -> None:
        for service in self.services.values():
            for process in (service.agent, service.app):
                if process is not None:
                    stop_process(process)
        if self.cp is not None:
            stop_process(self.cp)
