"""Helpers shared by the test suites: free ports, a real control-plane process, the CLI."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


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
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"control plane exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.api}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"control plane not ready after {timeout}s")

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.process is not None
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
