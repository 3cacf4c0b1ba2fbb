"""SIGKILL a process in the middle of multi-op writes, several times, then check the store:
every write it reported as committed is there, and no write is half there.

(A SIGKILL loses nothing the kernel already holds, so this proves atomicity and the WAL's
recovery; durability across power loss rests on synchronous=FULL, which no test here can cut.)
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

from verity.store import SqliteStore

from .conftest import events_until
from .crash_child import BATCH_SIZE, COUNTER

REPO_ROOT = Path(__file__).resolve().parents[3]
ROUNDS = 8


class _Child:
    """The writer process and the `batch revision` lines it printed before it died."""

    def __init__(self, db: Path, run: int) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.unit.store.crash_child", str(db), str(run)],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.committed: list[tuple[str, int]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.endswith("\n"):  # a line cut by the kill was not a complete report
                batch, revision = line.split()
                self.committed.append((batch, int(revision)))

    def kill_after(self, writes: int, jitter_s: float) -> None:
        deadline = time.monotonic() + 30
        while len(self.committed) < writes:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read() if self.process.stderr else ""
                raise AssertionError(f"the writer died on its own: {stderr}")
            assert time.monotonic() < deadline, "the writer made no progress"
            time.sleep(0.001)
        time.sleep(jitter_s)
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self._reader.join()
        assert self.process.returncode == -signal.SIGKILL


def _batches_in(db: Path) -> tuple[dict[str, int], str | None]:
    """Objects per batch label, and the batch the counter names (read with plain sqlite3)."""
    conn = sqlite3.connect(db)
    try:
        per_batch: dict[str, int] = defaultdict(int)
        rows = conn.execute("SELECT value FROM object_labels WHERE key = 'batch'")
        for (batch,) in rows:
            per_batch[batch] += 1
        counter = conn.execute(
            "SELECT json_extract(document, '$.last_batch') FROM objects"
            " WHERE kind = ? AND name = ?",
            (COUNTER.kind, COUNTER.name),
        ).fetchone()
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return per_batch, counter[0] if counter else None
    finally:
        conn.close()


def _batch_number(batch: str) -> tuple[int, int]:
    run, number = batch[1:].split("-b")
    return int(run), int(number)


async def test_sigkill_during_writes_loses_no_committed_write_and_tears_none(
    tmp_path: Path,
) -> None:
    db = tmp_path / "verity.db"
    rng = random.Random(1234)
    reported: list[tuple[str, int]] = []
    for run in range(ROUNDS):
        child = _Child(db, run)
        child.kill_after(writes=rng.randint(3, 30), jitter_s=rng.uniform(0, 0.02))
        reported.extend(child.committed)

        per_batch, counter_batch = _batches_in(db)
        # (a) every write the child saw return is there
        missing = [batch for batch, _ in reported if per_batch.get(batch) != BATCH_SIZE]
        assert missing == [], f"round {run}: committed writes lost: {missing}"
        # (b) every write is all there or not there at all
        torn = {batch: n for batch, n in per_batch.items() if n != BATCH_SIZE}
        assert torn == {}, f"round {run}: half-applied writes: {torn}"
        # the counter update of the newest present write went in with it
        assert counter_batch == max(per_batch, key=_batch_number)

    async with SqliteStore(db) as store:
        revision = await store.revision()
        assert revision >= max(r for _, r in reported)
        assert [e.revision for e in await events_until(store, 0, revision)] == list(
            range(1, revision + 1)
        )
        assert len(await store.audit_log()) == revision
        assert await store.audit_verify() == []
