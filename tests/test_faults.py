"""Processes die at the worst moments; nothing is lost, nothing is duplicated (slow: `scripts/test -m slow`)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalGenerationError, UnknownMemberIdError

from consumers import committer as committer_module
from consumers import kip447
from consumers.committer import Committer
from consumers.effects import Route
from consumers.partition import Partition
from consumers.reply_topics import ReplyTopics
from consumers.store import DataDir, PartitionStore
from dp import kafka as clients
from dp.partitioning import partition_for
from dp.settings import Kafka, Topics
from dp.wire import DEFAULT_LIMITS, decode_reply
from tests.replay import essence, events_per_promise, latest_changelog, replay
from tests.support import TEST_PARTITIONS, ServeProcess, complete, create, unique
from tests.wire_client import WireClient, read_topic

pytestmark = pytest.mark.slow


async def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {seconds}s")
        await asyncio.sleep(0.05)


def sharing(*processes: ServeProcess) -> bool:
    """Every partition is served, each by exactly one of `processes`, and each process serves some."""
    owned = [process.owned() for process in processes]
    every = [number for numbers in owned for number in numbers]
    return all(owned) and sorted(every) == list(range(TEST_PARTITIONS))


async def verify_exactly_once(kafka: Kafka, topics: Topics, request_ids: list[str], ids: list[str]) -> None:
    """Every request answered once, as the replay says; events complete and unduplicated; states equal."""
    replies = [decode_reply(record.value) for record in await read_topic(kafka, topics.replies)]
    counts = Counter(reply.request_id for reply in replies)
    assert [r for r in request_ids if counts[r] != 1] == []
    expected_status, expected_state = replay(await read_topic(kafka, topics.commands))
    actual_status = {reply.request_id: reply.status for reply in replies}
    assert {r: actual_status[r] for r in request_ids} == {r: expected_status[r] for r in request_ids}
    events = events_per_promise(await read_topic(kafka, topics.events))
    stored = latest_changelog(await read_topic(kafka, topics.changelog))
    for promise_id in ids:
        assert events[promise_id] == ["created", "resolved"], promise_id
        assert essence(stored[promise_id]) == essence(expected_state[promise_id]), promise_id


async def test_kill_9_mid_stream_loses_and_duplicates_nothing(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    victim, survivor = spawn("a"), spawn("b")
    ids = [unique(f"k{i}") for i in range(1200)]
    async with WireClient(kafka, topics) as client:
        sent = await client.send_all([create(i) for i in ids])
        await wait_until(lambda: sum(1 for r in sent if client.replies.get(r)) > len(sent) // 3, 60, "first replies")
        victim.kill()
        sent += await client.send_all([complete("resolve", i) for i in ids])
        sent += await client.send_all([complete("resolve", i) for i in ids[::3]])  # retries: deduplicated
        await wait_until(lambda: sum(1 for r in sent if client.replies.get(r)) > len(sent) * 2 // 3, 90, "more")
        victim.start()
        await client.wait_for(sent, seconds=120)
    assert survivor.alive and victim.alive
    await verify_exactly_once(kafka, topics, sent, ids)


async def test_a_stopped_zombie_is_fenced_and_nothing_it_did_is_visible(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    zombie, survivor = spawn("a"), spawn("b")
    ids: list[str] = []
    sent: list[str] = []
    streaming = True

    async def stream(client: WireClient) -> None:
        """Keep both processors busy so that the stop lands mid-batch, with a transaction open."""
        while streaming:
            batch = [unique("z") for _ in range(40)]
            ids.extend(batch)
            sent.extend(await client.send_all([create(i) for i in batch]))
            sent.extend(await client.send_all([complete("resolve", i) for i in batch]))

    await wait_until(lambda: sharing(zombie, survivor), 60, "both processors serving")
    async with WireClient(kafka, topics) as client:
        producer = asyncio.create_task(stream(client))
        await wait_until(lambda: sum(1 for r in sent if client.replies.get(r)) > 400, 60, "steady stream")
        zombie.signal(signal.SIGSTOP)
        stopped_at = len(sent)
        after_stop = lambda: sent[stopped_at : stopped_at + 400]  # noqa: E731
        await wait_until(
            lambda: len(after_stop()) == 400 and all(client.replies.get(r) for r in after_stop()),
            90,
            "the survivor taking over the zombie's partitions",
        )
        zombie.signal(signal.SIGCONT)
        resumed_at = len(sent)
        await wait_until(lambda: len(sent) > resumed_at + 800, 60, "more traffic after the zombie woke")
        streaming = False
        await producer
        await client.wait_for(sent, seconds=90)
    assert zombie.alive and survivor.alive
    await verify_exactly_once(kafka, topics, sent, ids)


# --- zombies frozen at an exact point of the commit (invariants I2-I5) -----------------------------


FROZEN_CREATES = 20


class Frozen:
    """`send_offsets` wrapped so that the committer stops right before it, or right after the broker
    accepted the offsets (before EndTxn), until the test wakes it."""

    def __init__(self, after_offsets: bool) -> None:
        self.after_offsets = after_offsets
        self.reached = asyncio.Event()
        self.wake = asyncio.Event()

    async def __call__(self, producer: Any, offsets: Any, group: Any) -> None:
        if self.after_offsets:
            await kip447.send_offsets(producer, offsets, group)
        self.reached.set()
        await self.wake.wait()
        if not self.after_offsets:
            await kip447.send_offsets(producer, offsets, group)


@dataclass
class InProcess:
    """The real committer and one partition (0) of a group member, run in the test's process."""

    consumer: AIOKafkaConsumer
    committer: Committer
    partition: Partition
    failures: list[BaseException]

    @property
    def source(self) -> TopicPartition:
        return self.partition.source


@contextlib.asynccontextmanager
async def in_process(kafka: Kafka, topics: Topics, data_root: Path, group: str) -> AsyncIterator[InProcess]:
    """Join `group`, own partition 0 (the others paused), open it as `dp serve` would; stop it all after."""
    consumer = clients.command_consumer(kafka, group)
    consumer.subscribe([topics.commands])
    await consumer.start()
    data_dir = DataDir(data_root, group)
    reply_topics = ReplyTopics(kafka, always=(topics.replies, topics.dlq, topics.events, topics.changelog))
    await reply_topics.start()
    failures: list[BaseException] = []
    committer = Committer(kafka, data_dir, reply_topics, 2_000, 4 << 20, lambda _, error: failures.append(error))
    partition = Partition(kafka, data_dir, Route(0, TEST_PARTITIONS, topics, DEFAULT_LIMITS), 2_000, 4 << 20)
    try:
        await wait_until(lambda: partition.source in consumer.assignment(), 60, "the assignment of partition 0")
        consumer.pause(*(tp for tp in consumer.assignment() if tp != partition.source))
        committer.group = kip447.assignment_of(consumer, group)
        await partition.open(consumer)
        committer.adopt(partition)
        yield InProcess(consumer, committer, partition, failures)
    finally:
        await consumer.stop()
        await committer.close()
        partition.close()
        await reply_topics.close()
        data_dir.release()


def partition_0_ids(prefix: str, count: int) -> list[str]:
    ids = [i for i in (unique(prefix) for _ in range(400)) if partition_for(i.encode(), TEST_PARTITIONS) == 0]
    return ids[:count]


async def offer_creates(owner: InProcess, client: WireClient, prefix: str, count: int) -> tuple[list[str], list[str]]:
    """Send `count` creates of partition 0 and queue them, fetched, on the in-process partition."""
    ids = partition_0_ids(prefix, count)
    sent = await client.send_all([create(i) for i in ids])
    fetched: list[Any] = []
    while len(fetched) < count:
        fetched.extend((await owner.consumer.getmany(owner.source, timeout_ms=500)).get(owner.source, []))
    owner.partition.offer(fetched, owner.consumer)
    return ids, sent


def opened_at(log: str, partition: int) -> tuple[int, int]:
    """(records restored, command offset) of the partition's last open in a processor's log."""
    pattern = rf"partition {partition}: open \(restored (\d+) records in [\d.]+s, commands from offset (\d+)\)"
    opens = re.findall(pattern, log)
    assert opens, f"partition {partition} never opened"
    return int(opens[-1][0]), int(opens[-1][1])


async def run_zombie(
    kafka: Kafka,
    topics: Topics,
    spawn: Callable[..., ServeProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    frozen: Frozen,
) -> tuple[list[str], list[str], Committer, list[BaseException], ServeProcess]:
    """A committer (in this process, the real code) applies creates on partition 0 and freezes mid-commit;
    its group member leaves, so a `dp serve` takes the partitions over; once that new owner says it waits
    for the open transaction (I5), the zombie wakes, and later tries one more transaction. Returns the ids,
    request ids, the zombie's committer, its failures and the new owner."""
    # The freeze may outlast the production bounds; here only the group decides the zombie's fate.
    monkeypatch.setattr(clients, "TRANSACTION_TIMEOUT_MS", 120_000)
    monkeypatch.setattr(committer_module, "PUBLISH_TIMEOUT_S", 100.0)
    monkeypatch.setattr(committer_module, "send_offsets", frozen)
    group = f"g-{uuid.uuid4().hex[:8]}"
    async with in_process(kafka, topics, tmp_path / "zombie", group) as zombie, WireClient(kafka, topics) as client:
        ids, sent = await offer_creates(zombie, client, "z", FROZEN_CREATES)
        cycle = asyncio.create_task(zombie.committer.cycle())
        await asyncio.wait_for(frozen.reached.wait(), 60)
        await zombie.consumer.stop()  # the zombie's membership ends; its transaction stays open
        owner = spawn("owner", group=group)
        waiting = "partition 0: waiting for a previous owner's transaction to end"
        await wait_until(lambda: waiting in owner.log.read_text(), 60, "the new owner waiting (I5)")
        frozen.wake.set()
        await asyncio.wait_for(cycle, 60)
        await client.wait_for(sent, seconds=60)
        await wait_until(lambda: 0 in owner.owned(), 60, "the new owner serving partition 0")
        # One more command through the new owner: everything before it is settled once it is answered.
        sent.append(await client.send(complete("resolve", ids[0])))
        await client.wait_for(sent, seconds=60)
        # Still holding the partition, the zombie takes the newest commands (the owner answered them too)
        # into a later transaction: the group refuses its offsets (I2), so nothing of it becomes visible.
        late = partition_0_ids("late", 5)
        late_sent = await client.send_all([create(i) for i in late])
        await client.wait_for(late_sent, seconds=60)
        zombie.partition.offer(await read_from(kafka, zombie.source, zombie.partition.next_offset), zombie.consumer)
        monkeypatch.setattr(committer_module, "send_offsets", kip447.send_offsets)
        await zombie.committer.cycle()
        return ids + late, sent + late_sent, zombie.committer, zombie.failures, owner


async def read_from(kafka: Kafka, source: TopicPartition, offset: int) -> list[Any]:
    """The committed records of `source` from `offset` to its end."""
    reader = clients.reader(kafka)
    await reader.start()
    try:
        reader.assign([source])
        reader.seek(source, offset)
        end = (await reader.end_offsets([source]))[source]
        records: list[Any] = []
        while await reader.position(source) < end:
            records.extend((await reader.getmany(source, timeout_ms=500)).get(source, []))
        return records
    finally:
        await reader.stop()


async def verify_creates_once(kafka: Kafka, topics: Topics, request_ids: list[str], ids: list[str]) -> None:
    """Every request answered exactly once; one `created` event and one changelog state per id, then the
    resolve of the first (nothing of an aborted transaction visible, nothing applied twice)."""
    replies = [decode_reply(record.value) for record in await read_topic(kafka, topics.replies)]
    counts = Counter(reply.request_id for reply in replies)
    assert [r for r in request_ids if counts[r] != 1] == []
    assert {reply.status for reply in replies if reply.request_id in request_ids} == {"created", "resolved"}
    events = events_per_promise(await read_topic(kafka, topics.events))
    assert {i: events[i] for i in ids} == {i: ["created", "resolved"] if i == ids[0] else ["created"] for i in ids}
    changelog = Counter(record.key for record in await read_topic(kafka, topics.changelog) if record.key)
    assert {i: changelog[i.encode()] for i in ids} == {i: 2 if i == ids[0] else 1 for i in ids}


async def test_a_zombie_whose_offsets_were_accepted_commits_and_the_new_owner_restores_it(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, sent, committer, failures, owner = await run_zombie(
        kafka, topics, spawn, tmp_path, monkeypatch, Frozen(after_offsets=True)
    )
    assert committer.transactions == 1  # the zombie's commit landed; its later transaction was refused
    assert [type(error) for error in failures] in ([UnknownMemberIdError], [IllegalGenerationError])
    restored, resumed = opened_at(owner.log.read_text(), 0)
    assert restored >= FROZEN_CREATES + 1 and resumed == FROZEN_CREATES  # restored it, resumed after it
    await verify_creates_once(kafka, topics, sent, ids)


async def test_a_zombie_frozen_before_its_offsets_is_fenced_and_nothing_it_did_is_visible(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, sent, committer, failures, owner = await run_zombie(
        kafka, topics, spawn, tmp_path, monkeypatch, Frozen(after_offsets=False)
    )
    assert committer.transactions == 0  # refused when it woke, and again later
    assert len(failures) == 2 and {type(e) for e in failures} <= {UnknownMemberIdError, IllegalGenerationError}
    assert opened_at(owner.log.read_text(), 0) == (0, 0)
    await verify_creates_once(kafka, topics, sent, ids)


class Crash(BaseException):
    """The process dies here (not an error the committer could handle)."""


async def test_a_crash_between_the_kafka_commit_and_the_rocksdb_write_loses_and_repeats_nothing(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worst moment of the commit path: the transaction committed, RocksDB never written. The next processor
    on the same data dir restores that transaction from the changelog and resumes after it."""

    def crash(self: Partition, step: Any, changelog_end: int) -> None:
        raise Crash

    monkeypatch.setattr(Partition, "persist", crash)
    group = f"g-{uuid.uuid4().hex[:8]}"
    async with WireClient(kafka, topics) as client:
        async with in_process(kafka, topics, tmp_path / "data-a", group) as dying:
            ids, sent = await offer_creates(dying, client, "c", FROZEN_CREATES)
            with pytest.raises(Crash):
                await dying.committer.cycle()
            assert dying.partition.store is not None and dying.partition.store.changelog_offset == 0
            await client.wait_for(sent, seconds=60)  # committed: its replies are out
        restarted = spawn("a", group=group)
        await wait_until(lambda: 0 in restarted.owned(), 60, "the restarted processor serving partition 0")
        sent.append(await client.send(complete("resolve", ids[0])))
        await client.wait_for(sent, seconds=60)
    restored, resumed = opened_at(restarted.log.read_text(), 0)
    assert restored >= FROZEN_CREATES + 1 and resumed == FROZEN_CREATES
    assert restarted.stop() == 0
    # The store the restore rebuilt counts every change once (the search snapshot's version) and indexes
    # every promise for search: the creates restored from the changelog, the resolve applied after.
    store = PartitionStore(tmp_path / "data-a" / group / "partition-0")
    try:
        assert store.version == FROZEN_CREATES + 1
        assert sorted(promise_id for _, promise_id in store.newest(None)) == sorted(ids)
    finally:
        store.close()
    await verify_creates_once(kafka, topics, sent, ids)
