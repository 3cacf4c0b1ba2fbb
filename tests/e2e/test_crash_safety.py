"""Crash safety end to end: SIGKILL the control plane while a client applies in a loop.

After every restart, each write that got a 2xx must be there, and no multi-document apply may
be half present.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx

from tests.support import ControlPlane, free_port

KILLS = 4


def batch(i: int) -> str:
    docs = []
    for part in ("a", "b", "c"):
        docs.append(
            f"""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: batch-{i}-{part}
  namespace: crash
  labels:
    batch: "b{i}"
spec:
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/batch/{i}"]
"""
        )
    return "---\n".join(docs)


class Writer(threading.Thread):
    def __init__(self, plane: ControlPlane) -> None:
        super().__init__(daemon=True)
        self.plane = plane
        self.acknowledged: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        token = self.plane.admin_token
        while not self.stop.is_set():
            try:
                reply = httpx.post(
                    f"{self.plane.api}/api/v1/apply",
                    content=batch(i),
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=5,
                )
                if reply.status_code == 200:
                    self.acknowledged.append(i)
                    i += 1
                else:
                    assert reply.status_code < 500, reply.text
            except httpx.HTTPError:
                time.sleep(0.02)  # control plane down: retry the same batch


def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    plane = ControlPlane(
        data_dir=tmp_path / "data",
        config_dir=tmp_path,
        port=free_port(),
        log_path=tmp_path / "cp.log",
    )
    plane.start()
    writer = Writer(plane)
    writer.start()
    rng = random.Random(7)
    try:
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.3, 0.9))
            plane.kill()
            plane.start()
        time.sleep(0.3)
    finally:
        writer.stop.set()
        writer.join(timeout=10)
    try:
        with plane.client() as http:
            items = http.get("/api/v1/resources/ap", params={"namespace": "crash"}).json()["items"]
    finally:
        plane.stop()

    parts: dict[str, set[str]] = defaultdict(set)
    for item in items:
        name = item["metadata"]["name"]
        parts[item["metadata"]["labels"]["batch"]].add(name.rsplit("-", 1)[1])
    assert len(writer.acknowledged) > 5, "the writer made too little progress to prove anything"
    assert plane.starts == KILLS + 1
    for i in writer.acknowledged:
        assert parts[f"b{i}"] == {"a", "b", "c"}, f"acknowledged batch {i} lost"
    for label, present in parts.items():
        assert present == {"a", "b", "c"}, f"batch {label} is half present: {present}"
