"""`make demo`: start a control plane in a temporary data dir, apply examples/, list what is
stored, show the audit trail, and stop.

It drives the real `verity` command against a real control-plane process, exactly as a user
would from a terminal.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _step(title: str) -> None:
    print(f"\n\033[1;36m== {title}\033[0m", flush=True)


def _verity(env: dict[str, str], *args: str) -> int:
    print(f"\033[2m$ verity {' '.join(args)}\033[0m", flush=True)
    return subprocess.run([sys.executable, "-m", "verity.cli.main", *args], env=env).returncode


def _wait_ready(api: str, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the control plane exited during start-up")
        try:
            if httpx.get(f"{api}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit("the control plane did not become ready")


def run_tour(workdir: Path) -> int:
    port = _free_port()
    env = dict(os.environ, VERITY_CONFIG=str(workdir / "config.json"))
    log = (workdir / "control-plane.log").open("wb")
    _step(f"Starting the control plane (data dir {workdir / 'data'})")
    plane = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "verity.cli.main",
            "control-plane",
            "run",
            "--data-dir",
            str(workdir / "data"),
            "--api-address",
            f"127.0.0.1:{port}",
            "--grpc-address",
            f"127.0.0.1:{_free_port()}",
        ],
        env=env,
        stdout=log,
        stderr=log,
    )
    failures = 0
    try:
        _wait_ready(f"http://127.0.0.1:{port}", plane)
        _step("Applying examples/ (every kind: Verity, Istio and Kuma)")
        failures += _verity(env, "apply", "-R", "-f", str(REPO / "examples")) != 0
        for kind in (
            "mesh",
            "dataplane",
            "peerauthentication",
            "authorizationpolicy",
            "requestauthentication",
            "trafficpermission",
        ):
            _step(f"verity get {kind} -A")
            failures += _verity(env, "get", kind, "-A") != 0
        _step("The audit trail: who changed what, hash-chained")
        failures += _verity(env, "audit", "log", "--limit", "8") != 0
        failures += _verity(env, "audit", "verify") != 0
    finally:
        _step("Stopping the control plane")
        plane.send_signal(signal.SIGTERM)
        plane.wait(timeout=20)
    print("\ndemo finished " + ("cleanly" if not failures else f"with {failures} failure(s)"))
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description="The Verity demo.")
    parser.add_argument("--once", action="store_true", help="run the tour and exit (default)")
    parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="verity-demo-") as tmp:
        sys.exit(run_tour(Path(tmp)))


if __name__ == "__main__":
    main()
