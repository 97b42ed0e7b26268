"""Retention through Kafka: completed promises past their retention leave RocksDB and every restore; pending
ones stay; a purged id can be created anew."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from consumers.partition import Partition
from consumers.store import PartitionStore
from dp.client import Promises
from dp.settings import Kafka, Topics
from dp.topics import config_of
from tests.support import TEST_PARTITIONS, ServeProcess, complete, create, now_ms, unique
from tests.test_commit_path import set_configs
from tests.test_faults import Crash, in_process, partition_0_ids
from tests.wire_client import WireClient, read_topic


def stored(data_dir: Path, group: str) -> dict[str, str]:
    """Every record of every partition store under `data_dir`, id → state (the processor stopped)."""
    states: dict[str, str] = {}
    for partition in range(TEST_PARTITIONS):
        path = data_dir / group / f"partition-{partition}"
        if path.exists():
            store = PartitionStore(path)
            try:
                states.update((id, promise.state) for id, promise in store.records().items())
            finally:
                store.close()
    return states


async def test_completed_promises_are_purged_after_the_retention_and_pending_ones_stay(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    first = spawn("a", options=("--retention", "2s"))
    done, pending = [unique("done") for _ in range(10)], [unique("pending") for _ in range(5)]
    async with Promises(kafka=kafka, topics=topics) as promises:
        await asyncio.gather(*(promises.create(id, timeout=3600) for id in [*done, *pending]))
        await asyncio.gather(*(promises.resolve(id) for id in done))
        deadline = time.monotonic() + 60
        while {(await promises.get(id)).status for id in done} != {"not_found"}:
            assert time.monotonic() < deadline, "the completed promises were not purged in time"
            await asyncio.sleep(0.5)  # the purge runs on the processor's clock, seconds after the completion
        assert {(await promises.get(id)).status for id in pending} == {"found"}
        again = await promises.create(done[0], timeout=3600)
        assert again.status == "created" and again.promise is not None and again.promise.state == "PENDING"
    assert first.stop() == 0
    group = first.group
    assert stored(tmp_path / "data-a", group) == {id: "PENDING" for id in [*pending, done[0]]}

    fresh = spawn("b", options=("--retention", "2s"))  # an empty data dir: everything from the changelog
    async with Promises(kafka=kafka, topics=topics) as promises:
        assert (await promises.get(done[1])).status == "not_found"
        assert (await promises.get(done[0])).status == "found"
    assert fresh.stop() == 0
    assert stored(tmp_path / "data-b", group) == {id: "PENDING" for id in [*pending, done[0]]}


async def test_compaction_then_removes_purged_promises_from_the_changelog(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    """With the changelog compacting within seconds, a purged promise's records and then its tombstone go."""
    fast = {"segment.ms": "3000", "delete.retention.ms": "3000", "min.cleanable.dirty.ratio": "0.01"}
    await set_configs(kafka, topics.changelog, **{**config_of(topics, topics.changelog), **fast})
    spawn("a", options=("--retention", "1s"))
    done = [unique("gone") for _ in range(10)]
    async with Promises(kafka=kafka, topics=topics) as promises:
        await asyncio.gather(*(promises.create(id, timeout=3600) for id in done))
        await asyncio.gather(*(promises.resolve(id) for id in done))
        deadline = time.monotonic() + 180
        while any(record.key.decode() in done for record in await read_topic(kafka, topics.changelog) if record.key):
            assert time.monotonic() < deadline, "compaction did not remove the purged promises in time"
            # New records (progress records, on every partition) roll the segments the log cleaner may compact.
            await asyncio.gather(*(promises.get(f"tick-{n}") for n in range(4 * TEST_PARTITIONS)))
            await asyncio.sleep(1.0)
        assert {(await promises.get(id)).status for id in done} == {"not_found"}


async def test_a_promise_tagged_with_its_own_retention_is_purged_at_its_own_time(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    spawn("a")  # no --retention: everything else is kept forever
    short, plain = unique("short"), unique("plain")
    async with Promises(kafka=kafka, topics=topics) as promises:
        await promises.create(short, timeout=3600, tags={"dp:retention": "1s"})
        await promises.create(plain, timeout=3600)
        await asyncio.gather(promises.resolve(short), promises.resolve(plain))
        deadline = time.monotonic() + 60
        while (await promises.get(short)).status != "not_found":
            assert time.monotonic() < deadline, "the promise with its own retention was not purged in time"
            await asyncio.sleep(0.5)  # purged on the processor's clock, a second after it completed
        assert (await promises.get(plain)).status == "found"
        refused = await promises.create(unique("odd"), timeout=3600, tags={"dp:retention": "a while"})
        assert refused.status == "invalid" and "dp:retention" in (refused.error or "")


async def test_a_crash_between_the_purges_commit_and_the_rocksdb_write_loses_and_repeats_nothing(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The purges' transaction commits its tombstones and the process dies before RocksDB deletes anything: the
    restarted owner applies the tombstones on restore, so the ids are gone and nothing is purged twice."""
    group = f"g-{uuid.uuid4().hex[:8]}"
    ids = partition_0_ids("purged", 20)
    first = spawn("a", group=group)  # no retention: the promises complete and stay
    async with WireClient(kafka, topics) as client:
        await client.wait_for(await client.send_all([create(i) for i in ids]))
        await client.wait_for(await client.send_all([complete("resolve", i) for i in ids]))
    assert first.stop() == 0

    monkeypatch.setattr(Partition, "persist", lambda *_: (_ for _ in ()).throw(Crash))
    async with in_process(kafka, topics, tmp_path / "data-a", group) as dying:
        partition = dying.partition
        partition.route = dataclasses.replace(partition.route, retention_ms=1)
        partition.next_purge = partition._first_purge()
        assert partition.next_purge is not None and partition.purge_due(now_ms())
        with pytest.raises(Crash):
            await dying.committer.cycle()
        assert partition.store is not None and set(partition.store.records()) == set(ids)  # RocksDB untouched
    monkeypatch.undo()
    restarted = spawn("a", group=group, options=("--retention", "1ms"))
    async with Promises(kafka=kafka, topics=topics) as promises:
        assert {(await promises.get(i)).status for i in ids} == {"not_found"}
    assert restarted.stop() == 0
    assert not set(stored(tmp_path / "data-a", group)) & set(ids)
    tombstones = [r.key for r in await read_topic(kafka, topics.changelog) if r.key and r.value is None]
    assert sorted(tombstones) == sorted(i.encode() for i in ids)  # one purge each, across the crash
