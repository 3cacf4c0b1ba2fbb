"""`make demo ARGS=--once`: the marketplace tour against real processes; exit 0 only if every
observed result matched the expected one."""

from __future__ import annotations

import subprocess
import sys

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
