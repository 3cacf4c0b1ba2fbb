"""watch(): replay from the change log, live changes, resume after reopening."""

from __future__ import annotations

import asyncio
from pathlib import Path

from verity.store import SqliteStore
from verity.store.base import EventType, WatchEvent

from .conftest import apply_op, delete_op, events_until


def _summary(events: list[WatchEvent]) -> list[tuple[int, EventType, str]]:
    return [(e.revision, e.type, e.key.name) for e in events]


async def test_replay_from_zero_and_from_the_middle(store: SqliteStore) -> None:
    await store.write([apply_op("a"), apply_op("b")], actor="x")
    await store.write([apply_op("a", app="v2")], actor="x")
    await store.write([delete_op("b")], actor="x")

    assert _summary(await events_until(store, 0, 4)) == [
        (1, EventType.ADDED, "a"),
        (2, EventType.ADDED, "b"),
        (3, EventType.MODIFIED, "a"),
        (4, EventType.DELETED, "b"),
    ]
    assert _summary(await events_until(store, 2, 4)) == [
        (3, EventType.MODIFIED, "a"),
        (4, EventType.DELETED, "b"),
    ]


async def test_deleted_event_carries_the_last_state(store: SqliteStore) -> None:
    [created] = await store.write([apply_op("a", labels={"k": "v"})], actor="x")
    await store.write([delete_op("a")], actor="x")
    [_, deleted] = await events_until(store, 0, 2)
    assert deleted.type is EventType.DELETED and deleted.revision == 2
    assert deleted.object == created.object


async def test_unchanged_apply_and_dry_run_make_no_event(store: SqliteStore) -> None:
    await store.write([apply_op("a")], actor="x")
    await store.write([apply_op("a")], actor="x")
    await store.write([apply_op("b")], actor="x", dry_run=True)
    await store.write([apply_op("c")], actor="x")
    assert _summary(await events_until(store, 0, 2)) == [
        (1, EventType.ADDED, "a"),
        (2, EventType.ADDED, "c"),
    ]


async def test_live_events_follow_replay(store: SqliteStore) -> None:
    await store.write([apply_op("old")], actor="x")
    watcher = asyncio.create_task(events_until(store, 0, 3))
    await asyncio.sleep(0.05)  # let the watcher finish its replay and wait
    await store.write([apply_op("new-1")], actor="x")
    await store.write([apply_op("new-2")], actor="x")
    assert [e.key.name for e in await watcher] == ["old", "new-1", "new-2"]


async def test_event_equals_what_the_write_returned(store: SqliteStore) -> None:
    watcher = asyncio.create_task(events_until(store, 0, 1))
    [result] = await store.write([apply_op("a")], actor="x")
    [event] = await watcher
    assert event.object == result.object == await store.get(result.key)


async def test_concurrent_writes_reach_every_watcher_in_order(store: SqliteStore) -> None:
    watchers = [asyncio.create_task(events_until(store, 0, 40)) for _ in range(3)]
    await asyncio.gather(*(store.write([apply_op(f"p{i}")], actor="x") for i in range(40)))
    for watcher in watchers:
        assert [e.revision for e in await watcher] == list(range(1, 41))


async def test_watcher_starting_mid_stream_misses_nothing(store: SqliteStore) -> None:
    # Watchers join while writes are landing: whatever they replay and whatever they get
    # live must join up without a gap or a repeat.
    async def writer() -> None:
        for i in range(60):
            await store.write([apply_op(f"p{i}")], actor="x")

    async def late_watcher(delay: float) -> list[int]:
        await asyncio.sleep(delay)
        return [e.revision for e in await events_until(store, 0, 60)]

    results = await asyncio.gather(writer(), *(late_watcher(d / 100) for d in range(5)))
    for revisions in results[1:]:
        assert revisions == list(range(1, 61))


async def test_watcher_behind_the_buffer_reads_the_log(db_path: Path) -> None:
    # a tiny buffer: most of the history must come from the log
    async with SqliteStore(db_path, watch_buffer=5) as store:
        await store.write([apply_op(f"p{i}") for i in range(20)], actor="x")
        events = await events_until(store, 3, 20)
        assert [e.revision for e in events] == list(range(4, 21))


async def test_resume_after_reopen(db_path: Path) -> None:
    async with SqliteStore(db_path) as store:
        await store.write([apply_op("a"), apply_op("b")], actor="x")
        seen = await events_until(store, 0, 1)
    async with SqliteStore(db_path) as store:
        assert await store.revision() == 2
        resumed = asyncio.create_task(events_until(store, seen[-1].revision, 3))
        await asyncio.sleep(0.02)
        await store.write([apply_op("c")], actor="x")
        assert [e.key.name for e in await resumed] == ["b", "c"]


async def test_watch_ends_when_the_store_closes(db_path: Path) -> None:
    store = SqliteStore(db_path)
    await store.open()
    first = asyncio.Event()

    async def drain() -> list[WatchEvent]:
        events = []
        async for event in store.watch(0):
            events.append(event)
            first.set()
        return events

    watcher = asyncio.create_task(drain())
    await store.write([apply_op("a")], actor="x")
    await asyncio.wait_for(first.wait(), 2)
    await store.close()
    assert [e.key.name for e in await asyncio.wait_for(watcher, 2)] == ["a"]
