"""Benchmark of the resource store (SQLite backend). A script, not a test: prints figures.

    .venv/bin/python bench/store.py [--quick]

Makes a store in a fresh temp dir (on the temp dir's real file system: commits are fsynced),
measures write throughput, then fills it to 10,000 AuthorizationPolicy-shaped resources
(100 namespaces x 100) and measures get / list latency and write-to-watch-event latency.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from verity.store import SqliteStore
from verity.store.base import ObjectKey, WriteAction, WriteOp

NAMESPACES = 100
PER_NAMESPACE = 100
TEAMS = 100  # label team=tN: each selects ~100 of the 10,000
APPS = 10


def policy_op(namespace: int, index: int, revision_note: str = "") -> WriteOp:
    """An Istio AuthorizationPolicy as the API would store it (~0.6 kB of JSON)."""
    ns, name = f"ns-{namespace:03d}", f"allow-{index:03d}"
    labels = {"app": f"app-{index % APPS}", "team": f"t{(namespace * 7 + index) % TEAMS}"}
    document: dict[str, Any] = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "selector": {"matchLabels": {"app": labels["app"]}},
            "action": "ALLOW",
            "rules": [
                {
                    "from": [{"source": {"principals": [f"cluster.local/ns/{ns}/sa/frontend"]}}],
                    "to": [{"operation": {"methods": ["GET", "POST"], "paths": ["/api/*"]}}],
                    "when": [{"key": "request.headers[x-tenant]", "values": [revision_note or ns]}],
                }
            ],
        },
    }
    key = ObjectKey("AuthorizationPolicy", ns, name)
    return WriteOp(WriteAction.APPLY, key, "security.istio.io/v1", labels, document)


def spread_keys(count: int) -> list[ObjectKey]:
    """Keys of stored objects, spread over all namespaces."""
    return [
        ObjectKey("AuthorizationPolicy", f"ns-{(i * 37) % NAMESPACES:03d}",
                  f"allow-{(i * 11) % PER_NAMESPACE:03d}")
        for i in range(count)
    ]


def percentiles_ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {p50 * 1e3:7.3f} ms   p99 {p99 * 1e3:7.3f} ms   (n={len(ordered)})"


async def timed(call: Callable[[], Awaitable[object]], times: int) -> list[float]:
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return samples


def report(what: str, how: str, figure: str) -> None:
    print(f"{what:<44} {figure}")
    print(f"{'':<44}   [{how}]")


async def bench_writes(store: SqliteStore, quick: bool) -> None:
    singles = 100 if quick else 300
    start = time.perf_counter()
    for i in range(singles):
        await store.write([policy_op(900, i % 100, f"s{i}")], actor="bench")
    elapsed = time.perf_counter() - start
    report("applies/s, single-op writes", f"{singles} sequential store.write([1 APPLY])",
           f"{singles / elapsed:8.0f} writes/s ({elapsed / singles * 1e3:.2f} ms each)")

    tasks, per_task = 8, singles // 8
    start = time.perf_counter()
    await asyncio.gather(*(
        _writer(store, t, per_task) for t in range(tasks)
    ))
    elapsed = time.perf_counter() - start
    report("applies/s, single-op writes, 8 concurrent", f"8 tasks x {per_task} store.write",
           f"{tasks * per_task / elapsed:8.0f} writes/s")

    batches = 10 if quick else 30
    start = time.perf_counter()
    for b in range(batches):
        await store.write(
            [policy_op(901 + b % 9, i, f"b{b}") for i in range(100)], actor="bench"
        )
    elapsed = time.perf_counter() - start
    report("applies/s, 100-op batches", f"{batches} sequential store.write([100 APPLY])",
           f"{batches * 100 / elapsed:8.0f} objects/s ({elapsed / batches * 1e3:.1f} ms/batch)")


async def _writer(store: SqliteStore, task: int, count: int) -> None:
    for i in range(count):
        await store.write([policy_op(950 + task, i % 100, f"c{i}")], actor="bench")


async def fill(store: SqliteStore) -> None:
    for namespace in range(NAMESPACES):
        ops = [policy_op(namespace, i) for i in range(PER_NAMESPACE)]
        await store.write(ops, actor="bench")


async def bench_reads(store: SqliteStore, quick: bool) -> None:
    total = len(await store.list(kind="AuthorizationPolicy"))
    print(f"-- reads with {total} AuthorizationPolicies stored "
          f"({NAMESPACES} namespaces x {PER_NAMESPACE}, plus the write-benchmark leftovers)")
    gets = 300 if quick else 2000
    it = iter(spread_keys(gets))
    samples = await timed(lambda: store.get(next(it)), gets)
    report("get by key", "store.get(key), random keys", percentiles_ms(samples))

    rounds = 50 if quick else 300
    samples = await timed(lambda: store.list(namespace="ns-042"), rounds)
    report("list one namespace (100 objects)", "store.list(namespace='ns-042')",
           percentiles_ms(samples))
    samples = await timed(lambda: store.list(kind="AuthorizationPolicy", namespace="ns-042"),
                          rounds)
    report("list kind + namespace (100 objects)", "store.list(kind=..., namespace='ns-042')",
           percentiles_ms(samples))
    matched = len(await store.list(labels={"team": "t17"}))
    samples = await timed(lambda: store.list(labels={"team": "t17"}), rounds)
    report(f"list by label selector ({matched} objects)", "store.list(labels={'team': 't17'})",
           percentiles_ms(samples))
    matched = len(await store.list(labels={"team": "t17", "app": "app-3"}))
    samples = await timed(lambda: store.list(labels={"team": "t17", "app": "app-3"}), rounds)
    report(f"list by 2-label selector ({matched} objects)",
           "store.list(labels={'team': 't17', 'app': 'app-3'})", percentiles_ms(samples))
    samples = await timed(lambda: store.list(), 5 if quick else 20)
    report(f"list all ({total} objects)", "store.list()", percentiles_ms(samples))


async def bench_watch(store: SqliteStore, quick: bool) -> None:
    writes = 100 if quick else 400
    called: dict[int, float] = {}
    returned: dict[int, float] = {}
    arrived: dict[int, float] = {}
    all_arrived = asyncio.Event()

    async def watcher(after: int) -> None:
        async for event in store.watch(after):
            arrived[event.revision] = time.perf_counter()
            if len(arrived) == writes:
                all_arrived.set()
                return

    task = asyncio.create_task(watcher(await store.revision()))
    await asyncio.sleep(0.05)
    for i in range(writes):
        start = time.perf_counter()
        [result] = await store.write([policy_op(7, i % 100, f"w{i}")], actor="bench")
        assert result.object is not None
        called[result.object.resource_version] = start
        returned[result.object.resource_version] = time.perf_counter()
        await asyncio.sleep(0)  # an idle loop between writes, like a server between requests
    await asyncio.wait_for(all_arrived.wait(), 10)
    await task
    lags = [arrived[r] - returned[r] for r in returned]
    before = sum(1 for lag in lags if lag < 0)
    report("write() returned -> watch event arrived",
           f"{writes} sequential writes, one watcher; negative: the event came first "
           f"({before}/{writes} did)", signed_percentiles_ms(lags))
    report("write() called -> watch event arrived", "same writes",
           percentiles_ms([arrived[r] - called[r] for r in called]))
    report("write() called -> write() returned", "same writes",
           percentiles_ms([returned[r] - called[r] for r in called]))


def signed_percentiles_ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {p50 * 1e3:+7.3f} ms   p99 {p99 * 1e3:+7.3f} ms   (n={len(ordered)})"


async def bench_reads_during_writes(store: SqliteStore, quick: bool) -> None:
    stop = asyncio.Event()
    batches = 0

    async def writer() -> None:
        nonlocal batches
        while not stop.is_set():
            await store.write(
                [policy_op(800, i, f"busy{batches}") for i in range(100)], actor="bench"
            )
            batches += 1

    task = asyncio.create_task(writer())
    await asyncio.sleep(0.05)
    gets = 300 if quick else 1000
    it = iter(spread_keys(gets))
    samples = await timed(lambda: store.get(next(it)), gets)
    stop.set()
    await task
    report("get by key while 100-op batches commit",
           f"store.get(key) x{gets}, keys as above, beside a writer task "
           f"({batches} batches meanwhile); reads have their own connection, so they do not "
           "queue behind a commit",
           percentiles_ms(samples))


async def bench_thread_hop() -> None:
    samples = await timed(lambda: asyncio.to_thread(int), 2000)
    report("asyncio.to_thread round trip (no SQLite)",
           "the cost every store call pays to keep SQLite off the event loop",
           percentiles_ms(samples))


async def main(quick: bool) -> None:
    command = shlex.join([".venv/bin/python", "bench/store.py", *sys.argv[1:]])
    print(f"$ {command}")
    print(f"python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
          f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="verity-bench-") as tmp:
        async with SqliteStore(Path(tmp) / "verity.db") as store:
            print("-- writes (WAL, synchronous=FULL: each commit is fsynced)")
            await bench_writes(store, quick)
            fill_start = time.perf_counter()
            await fill(store)
            print(f"(filled {NAMESPACES * PER_NAMESPACE} objects in 100-op batches in "
                  f"{time.perf_counter() - fill_start:.1f} s)")
            await bench_reads(store, quick)
            await bench_reads_during_writes(store, quick)
            print("-- watch")
            await bench_watch(store, quick)
            await bench_thread_hop()
    print(f"total {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    asyncio.run(main(parser.parse_args().quick))
