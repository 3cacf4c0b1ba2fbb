"""`make demo ARGS=--once`: the marketplace tour against real processes; exit 0 only if every
observed result matched the expected one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.support import REPO


def test_demo_tour_runs_cleanly() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "demo", "--once"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-3000:]
    assert "demo finished cleanly" in out
    assert "unexpected: 0" in out and "failed: 0" in out
    assert out.count("deny/deny (403)") >= 5 and out.count("allow/allow (200)") >= 7
    assert "refused" in out and "STRICT mTLS only" in out
    assert '"caller": "spiffe://cluster.local/ns/shop/sa/items"' in out
    assert "decided by: no ALLOW policy matched" in out
    # Nothing is left running: the demo stops every process it started.
    leftover = subprocess.run(["pgrep", "-f", "verity-demo-"], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""


def test_ctrl_c_in_the_middle_stops_everything() -> None:
    """Ctrl-C reaches the whole foreground process group, as a terminal sends it."""
    demo = subprocess.Popen(
        [sys.executable, "-m", "demo"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        time.sleep(6)  # in the middle of bringing the mesh up
        os.killpg(demo.pid, signal.SIGINT)
        out, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    assert "every process it started is gone" in out or "demo finished" in out, out[-2000:]
    time.sleep(1)
    leftover = subprocess.run(["pgrep", "-g", str(demo.pid)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "processes of the demo are still running"
