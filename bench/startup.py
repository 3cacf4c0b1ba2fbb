"""Sidecar start-up: from starting `verity dataplane run` to the first mTLS request served
through the new sidecar.

    .venv/bin/python bench/startup.py [--repeats 6]

A real control plane, an app (an Envoy answering 200 with a fixed body) and two workloads,
web calling api through their sidecars (mTLS, RBAC). Two cases, each started `--repeats`
times (stopped in between):

- new client sidecar: api's sidecar runs; web's agent is started, and web's outbound
  listener is called until the first 200 comes back through api's sidecar;
- new server sidecar: web's sidecar runs; api's agent is started, and the same call is
  made until it succeeds (the control plane must also push the new endpoint to web).

The clock starts just before the agent process is spawned (Python start-up, key, CSR,
certificate, bootstrap, Envoy, xDS all count) and the call is retried every 2 ms. Also
reported: the agent's own figure, `startup_s` of its "proxy ready" log line (from the
agent's start to Envoy live with its listeners and a valid certificate).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from _common import (  # the helpers beside this script (its folder is on sys.path)
    ALLOW_WEB_TO_API,
    Agent,
    ControlPlane,
    children,
    command_line,
    dataplane_document,
    free_port,
    responder_envoy,
    running_control_plane,
    wait_until,
)

BODY = b"startup"


def status_of(port: int) -> int:
    """Status of `GET /` on 127.0.0.1:`port`, 0 if there is no answer."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
            head = conn.recv(64)
    except OSError:
        return 0
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def first_ok(port: int, timeout: float = 30.0) -> float:
    """time.monotonic() of the first 200 from 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if status_of(port) == 200:
            return time.monotonic()
        time.sleep(0.002)
    raise TimeoutError(f"no 200 on port {port} within {timeout:.0f} s")


@dataclass(frozen=True)
class Start:
    """One start, in seconds from spawning the agent process."""

    first_request: float
    agent_running: float  # its "agent starting" log line: interpreter, imports, checks done
    startup_s: float  # the agent's own figure, from its start to "proxy ready"
    proxy_ready: float  # its "proxy ready" log line


def log_time(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(record["ts"])).timestamp()


def agent_timeline(agent: Agent, served: float, timeout: float = 10.0) -> Start:
    """The start's figures from the agent's log ("agent starting", "proxy ready")."""

    def find() -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for record in agent.log_records():
            if record.get("msg") in ("agent starting", "proxy ready"):
                found.setdefault(str(record["msg"]), record)
        return found

    wait_until(f"agent {agent.name} logging 'proxy ready'", lambda: len(find()) == 2, timeout)
    records = find()
    ready = records["proxy ready"]
    return Start(
        first_request=served,
        agent_running=log_time(records["agent starting"]) - agent.started_wall,
        startup_s=float(ready["startup_s"]),
        proxy_ready=log_time(ready) - agent.started_wall,
    )


def children_named(pid: int, name: str) -> list[int]:
    found = []
    for child in children(pid):
        try:
            if Path(f"/proc/{child}/comm").read_text().strip() == name:
                found.append(child)
        except OSError:
            continue
    return found


@dataclass
class Workload:
    name: str
    service: str
    document: dict[str, Any]
    token: str
    running: Agent | None = None

    def start(self, cp: ControlPlane, workdir: Path, run: int) -> Agent:
        self.running = Agent(f"{self.name}-{run}", workdir)
        self.running.launch(cp, self.document, self.token)
        return self.running

    def stop(self) -> None:
        """Stop the agent and wait for its Envoy to be gone too: with SO_REUSEPORT a
        lingering Envoy could otherwise answer on the next one's ports."""
        if self.running is None:
            return
        envoy = children_named(self.running.pid, "envoy")
        self.running.stop()
        self.running = None
        for pid in envoy:
            wait_until(f"Envoy {pid} gone", lambda p=pid: not Path(f"/proc/{p}").exists(), 30)


@dataclass
class Mesh:
    cp: ControlPlane
    workdir: Path
    web: Workload
    api: Workload
    outbound_port: int
    runs: int = 0


def summary(values: Sequence[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"p50 {statistics.median(ms):5.0f} ms, max {max(ms):5.0f} ms"


def report(label: str, starts: Sequence[Start]) -> list[str]:
    def column(name: str) -> list[float]:
        return [getattr(start, name) for start in starts]

    return [
        f"{label} (n={len(starts)}):",
        f"  first mTLS request served through it  {summary(column('first_request'))}",
        f"    agent running (interpreter, imports) {summary(column('agent_running'))}",
        f"    agent's 'proxy ready' startup_s      {summary(column('startup_s'))}",
        f"    'proxy ready' logged                 {summary(column('proxy_ready'))}",
    ]


def time_start(mesh: Mesh, new: Workload) -> Start:
    """Start `new`'s agent; when the first 200 came through it, and its log's timeline."""
    mesh.runs += 1
    agent = new.start(mesh.cp, mesh.workdir, mesh.runs)
    try:
        served = first_ok(mesh.outbound_port) - agent.started_at
        return agent_timeline(agent, served)
    finally:
        new.stop()


@contextmanager
def running_mesh(workdir: Path) -> Iterator[Mesh]:
    with ExitStack() as stack:
        app_port = free_port()
        app = responder_envoy("app", app_port, BODY, workdir)
        app.start()
        stack.callback(app.stop)
        cp = stack.enter_context(running_control_plane(workdir))
        cp.apply(ALLOW_WEB_TO_API)
        inbound, local = free_port(), free_port()
        api_doc = dataplane_document("api-1", service="api", inbound=[(inbound, app_port)])
        web_doc = dataplane_document("web-1", service="web", outbound=[("api", inbound, local)])
        api = Workload("api", "api", api_doc, cp.dataplane_token("default", "api"))
        web = Workload("web", "web", web_doc, cp.dataplane_token("default", "web"))
        for workload in (api, web):
            stack.callback(workload.stop)
        yield Mesh(cp, workdir, web, api, local)


def measure(mesh: Mesh, repeats: int) -> tuple[list[Start], list[Start]]:
    client: list[Start] = []
    server: list[Start] = []
    for _ in range(repeats):
        mesh.api.start(mesh.cp, mesh.workdir, 0).wait_ready()
        client.append(time_start(mesh, mesh.web))
        mesh.api.stop()
        mesh.web.start(mesh.cp, mesh.workdir, 0).wait_ready()
        server.append(time_start(mesh, mesh.api))
        mesh.web.stop()
    return client, server


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    print("command:", command_line("startup.py", argv))
    print("times from spawning `verity dataplane run` (before the process exists)")
    begun = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="verity-bench-") as tmp:
        with running_mesh(Path(tmp)) as mesh:
            client, server = measure(mesh, args.repeats)
    print("\n".join(report("new client sidecar (web; api's running)", client)))
    print("\n".join(report("new server sidecar (api; web's running)", server)))
    print(f"took {time.monotonic() - begun:.0f} s")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=6, help="starts of each case")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
