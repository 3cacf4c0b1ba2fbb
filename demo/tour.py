"""The marketplace tour: each step makes real calls through real sidecars and shows the result."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from demo.localmesh import ControlPlane, Mesh, Workload, free_port

MANIFESTS = Path(__file__).resolve().parent / "manifests"
NAMESPACE = "shop"
SERVICES = ("users", "items", "invoices")
# Seed 000: invoices and users may call each other; only invoices may call items.
ALLOWED = frozenset({("invoices", "users"), ("users", "invoices"), ("invoices", "items")})
LIVE_CHANGE = ALLOWED | {("users", "items")}


def spiffe(service: str) -> str:
    return f"spiffe://cluster.local/ns/{NAMESPACE}/sa/{service}"


class Tour:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        # A pipe (make demo | tee, the test) has no width; rich would wrap at 80 columns.
        self.console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
        self.started = time.monotonic()
        self.cp = ControlPlane(
            data_dir=workdir / "data",
            config_dir=workdir / "config",
            port=free_port(),
            log_path=workdir / "control-plane.log",
        )
        self.mesh = Mesh(self.cp, workdir)
        self.calls: Counter[str] = Counter()
        self.mismatches = 0

    @property
    def ok(self) -> bool:
        return self.mismatches == 0

    # -- the steps -------------------------------------------------------------------------

    def run(self) -> bool:
        self._start_mesh()
        self._matrix(
            "Who may call whom: seed 000's policy, enforced by the receiving sidecar", ALLOWED
        )
        self._identities()
        self._outsider()
        self._deny_log("items", "users")
        self._check("items", "users")
        self._live_change()
        self._summary()
        return self.ok

    def _start_mesh(self) -> None:
        self._step("Starting the control plane, the secure default mesh and seed 000's policy")
        self.cp.start()
        self.mesh.apply((MANIFESTS / "mesh.yaml").read_text())
        self.mesh.apply((MANIFESTS / "policy.yaml").read_text())
        self._say(f"control plane at {self.cp.api}, CA service and ADS on {self.cp.grpc_target}")
        for service in SERVICES:
            others = tuple(s for s in SERVICES if s != service)
            w = self.mesh.add(service, namespace=NAMESPACE, calls=others)
            self._say(
                f"{service}: app on 127.0.0.1:{w.app_port}, sidecar inbound "
                f":{w.inbound_port} (mTLS), identity {spiffe(service)}"
            )
        status, _ = self._call("invoices", "users")
        elapsed = time.monotonic() - self.started
        self._say(
            f"first secured call (invoices -> users) answered {status} "
            f"{elapsed:.1f}s after the demo started"
        )

    def _matrix(self, title: str, allowed: frozenset[tuple[str, str]]) -> None:
        self._step(title)
        table = Table(box=None, header_style="bold")
        table.add_column("caller \\ callee")
        for callee in SERVICES:
            table.add_column(callee)
        for caller in SERVICES:
            row = [caller]
            for callee in SERVICES:
                row.append("-" if caller == callee else self._cell(caller, callee, allowed))
            table.add_row(*row)
        self.console.print(table)
        self._say("cells read expected/observed; green when they agree")

    def _cell(self, caller: str, callee: str, allowed: frozenset[tuple[str, str]]) -> str:
        expected = "ALLOW" if (caller, callee) in allowed else "DENY"
        status, _ = self._call(caller, callee)
        observed = {200: "ALLOW", 403: "DENY"}.get(status, f"HTTP {status}")
        agrees = observed == expected
        self.mismatches += not agrees
        self.calls["allowed" if status == 200 else "denied" if status == 403 else "failed"] += 1
        self.calls["matched" if agrees else "unexpected"] += 1
        colour = "green" if agrees else "bold red"
        return f"[{colour}]{expected.lower()}/{observed.lower()} ({status})[/{colour}]"

    def _identities(self) -> None:
        self._step("The caller identity each service saw (from its sidecar, never from the caller)")
        for caller, callee in sorted(ALLOWED):
            _, body = self._call(caller, callee)
            seen = body.get("caller")
            agrees = seen == spiffe(caller)
            self.mismatches += not agrees
            mark = "[green]ok[/green]" if agrees else "[bold red]unexpected[/bold red]"
            self._say(f"{callee} saw {seen} when {caller} called  {mark}")

    def _outsider(self) -> None:
        self._step("A plaintext call from outside the mesh, straight to a sidecar's inbound port")
        users = self.mesh.workloads["users"]
        try:
            httpx.get(f"http://127.0.0.1:{users.inbound_port}/users", timeout=5)
            outcome, refused = "answered: the mesh let a plaintext caller in", False
        except httpx.HTTPError as exc:
            outcome, refused = f"refused ({type(exc).__name__}): STRICT mTLS only", True
        self.mismatches += not refused
        self.calls["denied" if refused else "allowed"] += 1
        self.calls["matched" if refused else "unexpected"] += 1
        colour = "green" if refused else "bold red"
        self._say(f"[{colour}]{outcome}[/{colour}]")

    def _deny_log(self, caller: str, callee: str) -> None:
        self._step(f"The deny log line of {callee}'s sidecar for the call from {caller}")
        lines = self._access_denials(self.mesh.workloads[callee])
        match = next((r for r in reversed(lines) if r.get("caller") == spiffe(caller)), None)
        if match is None:
            self.mismatches += 1
            self._say("[bold red]no deny line found in the sidecar's log[/bold red]")
            return
        self._say(json.dumps(match, sort_keys=True))
        named = bool(match.get("policy"))
        self.mismatches += not named
        self._say(
            "the line names the policy that decided"
            if named
            else "[bold red]the line does not name a policy[/bold red]"
        )

    def _check(self, caller: str, callee: str) -> None:
        self._step(f"verity check: why may {caller} not call {callee}?")
        port = self.mesh.workloads[callee].inbound_port
        args = [
            "check",
            "--from",
            spiffe(caller),
            "--to",
            callee,
            "-n",
            NAMESPACE,
            "--port",
            str(port),
            "--method",
            "GET",
            "--path",
            "/whoami",
            "--explain",
        ]
        self._say("$ verity " + " ".join(args), dim=True)
        result = self.cp.cli(args)
        self.console.print(result.stdout.rstrip(), markup=False, highlight=False)
        if result.returncode != 0 or "DENY" not in result.stdout:
            self.mismatches += 1
            self._say(
                f"[bold red]verity check did not explain a denial[/bold red] "
                f"{result.stderr.strip()}"
            )

    def _live_change(self) -> None:
        self._step("A policy change, live: users may now read items")
        self.mesh.apply((MANIFESTS / "users-may-read-items.yaml").read_text())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._call("users", "items")[0] != 200:
            time.sleep(0.1)
        self._matrix("Who may call whom after the change", LIVE_CHANGE)

    def _summary(self) -> None:
        self._step("Summary")
        made = self.calls["allowed"] + self.calls["denied"] + self.calls["failed"]
        verdict = "[green]as expected[/green]" if self.ok else "[bold red]UNEXPECTED[/bold red]"
        self._say(
            f"calls made: {made}, allowed: {self.calls['allowed']}, denied: "
            f"{self.calls['denied']}, failed: {self.calls['failed']}; matched expectation:"
            f" {self.calls['matched']}, unexpected: {self.calls['unexpected']} -> {verdict}"
        )

    def keep_running(self, stop: threading.Event) -> None:
        self._step("The mesh keeps running; poke at it from another terminal (Ctrl-C stops it)")
        users = self.mesh.workloads["users"]
        env = f"VERITY_CONFIG={self.cp.config_dir / 'config.json'}"
        for line in (
            f"{env} .venv/bin/verity get dataplanes -n {NAMESPACE}",
            f"{env} .venv/bin/verity get authorizationpolicies -n {NAMESPACE}",
            f"{env} .venv/bin/verity inspect dataplane users-1 -n {NAMESPACE}",
            f"{env} .venv/bin/verity audit log",
            f"curl http://127.0.0.1:{users.app_port}/call/invoices/whoami   "
            "# users' app calls invoices through its sidecar",
            f"curl http://127.0.0.1:{users.app_port}/call/items/items   "
            "# ... and items (allowed since the live change)",
        ):
            self._say(line, dim=True)
        while not stop.wait(1):
            pass

    def close(self) -> None:
        self.mesh.close()
        self.cp.stop()

    # -- helpers ---------------------------------------------------------------------------

    def _call(self, caller: str, callee: str) -> tuple[int, dict[str, Any]]:
        """caller's app calls callee through its sidecar; (callee's status, callee's body)."""
        app = self.mesh.workloads[caller].app_port
        try:
            reply = httpx.get(f"http://127.0.0.1:{app}/call/{callee}/whoami", timeout=10).json()
        except (httpx.HTTPError, ValueError):
            return 0, {}
        body = reply.get("body")
        return int(reply.get("status", 0)), body if isinstance(body, dict) else {}

    def _access_denials(self, w: Workload) -> list[dict[str, Any]]:
        records = []
        for line in w.log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("logger") == "verity.access" and str(record.get("status")) == "403":
                records.append(
                    {
                        k: record[k]
                        for k in ("caller", "method", "path", "port", "status", "policy")
                        if k in record
                    }
                )
        return records

    def _step(self, title: str) -> None:
        self.console.print(f"\n[bold cyan]== {title}[/bold cyan]")

    def _say(self, text: str, dim: bool = False) -> None:
        self.console.print(f"[dim]{text}[/dim]" if dim else text)
