"""`make demo` runs its tour against a real control plane and exits 0 only if every step worked."""

from __future__ import annotations

import subprocess
import sys

from tests.support import REPO


def test_demo_tour_runs_cleanly() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "demo", "--once"],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "demo finished cleanly" in result.stdout
    assert "audit trail intact" in result.stdout
    assert "users-to-invoices" in result.stdout
