"""Child process of the crash-safety test: multi-op writes in a loop until it is killed.

After every write that returned it prints `<batch> <revision>` (flushed), so the parent knows
exactly which writes were committed. Each write creates BATCH_SIZE objects labelled with the
batch and updates the shared `counter` object to name that batch.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from verity.store import SqliteStore
from verity.store.base import ObjectKey, WriteAction, WriteOp

BATCH_SIZE = 3
COUNTER = ObjectKey("Mesh", "", "counter")


def batch_ops(batch: str) -> list[WriteOp]:
    ops = [
        WriteOp(
            WriteAction.CREATE,
            ObjectKey("AuthorizationPolicy", "crash", f"{batch}-{i}"),
            "security.istio.io/v1",
            {"batch": batch},
            {"spec": {"action": "ALLOW", "batch": batch, "index": i}},
        )
        for i in range(BATCH_SIZE)
    ]
    ops.append(WriteOp(WriteAction.APPLY, COUNTER, "verity/v1", {}, {"last_batch": batch}))
    return ops


async def write_forever(db: Path, run: int) -> None:
    store = SqliteStore(db)
    await store.open()
    number = 0
    while True:
        batch = f"r{run}-b{number}"
        results = await store.write(batch_ops(batch), actor="crash-test")
        revision = max(r.object.resource_version for r in results if r.object)
        print(batch, revision, flush=True)
        number += 1


if __name__ == "__main__":
    asyncio.run(write_forever(Path(sys.argv[1]), int(sys.argv[2])))
