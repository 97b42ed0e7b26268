"""The committer's path without a broker: one transaction for every partition's work, all or nothing.

The producer here is a stand-in that records what the committer asks of it; everything else is real
(the partitions, the batch core, RocksDB in a temporary directory, aiokafka's record batches).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError, NotLeaderForPartitionError
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.structs import RecordMetadata

from consumers import committer as committer_module
from consumers.committer import Committer, SendsRefused
from consumers.effects import Route, TopicInfo
from consumers.kip447 import GroupMetadata
from consumers.partition import Partition
from consumers.store import PROGRESS_KEY, DataDir, PartitionStore, Progress, decode_progress, progress_record
from dp.errors import DataDirInUse
from dp.partitioning import partition_for
from dp.settings import Kafka, Topics
from dp.wire import DEFAULT_LIMITS, decode_reply

TOPICS = Topics("t")
PARTITIONS = 2


@dataclass
class Record:
    offset: int
    key: bytes | None
    value: bytes | None


class Topics_(dict[str, TopicInfo]):
    """ReplyTopics without a broker: always fresh, never missing."""

    misses = 0
    stale = False

    async def refresh(self, *, force: bool = False) -> bool:
        return False

    async def settle(self) -> bool:
        return False

    def limits(self) -> dict[str, int]:
        return {name: info.max_message_bytes for name, info in self.items()}


@dataclass
class Producer:
    """Answers each send with the next outcome in `outcomes` (default: success) and logs every call."""

    outcomes: list[BaseException | None] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)

    async def begin_transaction(self) -> None:
        self.calls.append("begin")

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(256 * 1024, 0, is_transactional=1)

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> asyncio.Future[Any]:
        self.calls.append(f"send {topic}")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is None:
            future.set_result(RecordMetadata(topic, partition, None, 0, -1, None, 0))
        else:
            future.set_exception(outcome)
        return future

    async def send_offsets_to_transaction(self, offsets: dict[Any, int], group: str) -> None:
        assert isinstance(group, GroupMetadata) and group.generation >= 0
        self.calls.append("offsets " + ",".join(f"{tp.partition}:{offset}" for tp, offset in sorted(offsets.items())))

    async def commit_transaction(self) -> None:
        self.calls.append("commit")

    async def abort_transaction(self) -> None:
        self.calls.append("abort")

    async def stop(self) -> None:
        self.calls.append("stop")


def create(offset: int, promise_id: str, request_id: str, timeout: int = 10**13) -> Record:
    command = {"op": "create", "id": promise_id, "timeout": timeout, "requestId": request_id}
    return Record(offset, promise_id.encode(), json.dumps(command).encode())


def ids_of(partition: int, count: int) -> list[str]:
    """Promise ids that live in `partition`."""
    return [i for i in (f"p{n}" for n in range(1000)) if partition_for(i.encode(), PARTITIONS) == partition][:count]


class Consumer:
    """The fetch side as a partition sees it: pausing and resuming."""

    def pause(self, *tps: Any) -> None: ...

    def resume(self, *tps: Any) -> None: ...


class Opened(NamedTuple):
    committer: Committer
    partitions: list[Partition]
    made: list[Producer]
    """The producers the committer created, in order."""
    scripts: list[list[BaseException | None]]
    """What each next producer's sends answer: an exception, or None for success."""
    failed: list[tuple[list[int], BaseException]]
    """What the committer handed back to the processor."""


@pytest.fixture
def opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Opened:
    """A committer over two open partitions with real stores; each new producer takes the next script."""
    made: list[Producer] = []
    scripts: list[list[BaseException | None]] = []
    failed: list[tuple[list[int], BaseException]] = []

    async def new_producer(self: Committer) -> Producer:
        made.append(Producer(scripts.pop(0) if scripts else []))
        return made[-1]

    monkeypatch.setattr(Committer, "_new_producer", new_producer)
    data_dir = DataDir(tmp_path, "g")
    committer = Committer(
        Kafka(), data_dir, TOPIC_INFO, 100, 1 << 20,  # type: ignore[arg-type]
        on_failure=lambda parts, error: failed.append(([p.route.partition for p in parts], error)),
    )  # fmt: skip
    partitions = []
    for number in range(PARTITIONS):
        partition = Partition(Kafka(), data_dir, Route(number, PARTITIONS, TOPICS, DEFAULT_LIMITS), 100, 1 << 20)
        partition.store = PartitionStore(partition.store_path)
        committer.adopt(partition)
        partitions.append(partition)
    committer.group = GroupMetadata("g", 1, "member-1")
    return Opened(committer, partitions, made, scripts, failed)


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[list[Any]]:
    """The messages of every transaction the committer packs, in order."""
    seen: list[list[Any]] = []
    original = committer_module.batched

    def spy(producer: Any, messages: list[Any], limits: Any = None) -> Any:
        seen.append(messages)
        return original(producer, messages, limits)

    monkeypatch.setattr(committer_module, "batched", spy)
    return seen


def offer(partition: Partition, *records: Record) -> None:
    partition.offer(list(records), Consumer())  # type: ignore[arg-type]


TOPIC_INFO = Topics_({TOPICS.replies: TopicInfo(1), TOPICS.dlq: TopicInfo(1), "other": TopicInfo(1)})


async def test_every_partition_s_work_of_the_moment_commits_in_one_transaction(opened: Opened) -> None:
    committer, (zero, one), made, _, _ = opened
    (a,), (b,) = ids_of(0, 1), ids_of(1, 1)
    offer(zero, create(0, a, "r1"))
    offer(one, create(0, b, "r2"), create(1, b, "r3"))
    await committer.cycle(1_000)
    (producer,) = made
    assert producer.calls.count("begin") == 1 and producer.calls.count("commit") == 1
    assert "offsets 0:1,1:2" in producer.calls
    assert producer.calls.index("offsets 0:1,1:2") < producer.calls.index("commit")
    assert [p.next_offset for p in (zero, one)] == [1, 2]
    assert zero.store is not None and set(zero.store.records()) == {a}
    assert one.store is not None and set(one.store.records()) == {b}


async def test_a_failed_send_aborts_and_leaves_every_partition_s_store_untouched(opened: Opened) -> None:
    committer, (zero, one), made, scripts, failed = opened
    scripts.append([None, NotLeaderForPartitionError()])
    offer(zero, create(0, ids_of(0, 1)[0], "r1"))
    offer(one, create(0, ids_of(1, 1)[0], "r2"))
    await committer.cycle(1_000)
    producer = made[0]
    assert "commit" not in producer.calls and not any(call.startswith("offsets") for call in producer.calls)
    assert "stop" in producer.calls  # discarded, never reused
    assert committer.producer is not producer
    for partition in (zero, one):
        assert partition.store is not None
        assert partition.store.records() == {} and partition.store.changelog_offset == 0
        assert partition.next_offset == 0
    ((numbers, error),) = failed
    assert sorted(numbers) == [0, 1] and isinstance(error, NotLeaderForPartitionError)


async def test_a_failure_before_the_transaction_hands_the_busy_partitions_back(
    opened: Opened, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No broker to describe the reply topics: the partitions with work are reopened (their records fetched
    again), never left with records taken from their queues and never applied."""
    committer, (zero, _), made, _, failed = opened

    async def unreachable(*, force: bool = False) -> bool:
        raise KafkaConnectionError("no broker")

    monkeypatch.setattr(TOPIC_INFO, "stale", True)
    monkeypatch.setattr(TOPIC_INFO, "refresh", unreachable)
    offer(zero, create(0, ids_of(0, 1)[0], "r1"))
    await committer.cycle(1_000)
    ((numbers, error),) = failed
    assert numbers == [0] and isinstance(error, KafkaConnectionError)
    assert zero.next_offset == 0 and zero.store is not None and zero.store.records() == {}
    assert all("begin" not in producer.calls for producer in made)


async def test_a_command_that_arrives_while_the_cycle_waits_is_stamped_after_it_arrived(
    opened: Opened, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch time is read after the cycle's last wait: a time before the command reached the log would
    contradict the log (the chaos run's verifier checks every stamp against it)."""
    committer, (zero, _), _, _, _ = opened
    (promise_id,) = ids_of(0, 1)
    arrived: list[int] = []

    async def slow_refresh(*, force: bool = False) -> bool:
        await asyncio.sleep(0.005)  # describing the topics takes a few milliseconds of the broker's time
        arrived.append(committer_module.now_ms())
        offer(zero, create(0, promise_id, "r1"))
        return True

    monkeypatch.setattr(TOPIC_INFO, "stale", True)
    monkeypatch.setattr(TOPIC_INFO, "refresh", slow_refresh)
    await committer.cycle()
    assert zero.store is not None and zero.store.records()[promise_id].created_on >= arrived[0]


async def test_a_timer_only_transaction_carries_the_offset_and_a_progress_record(
    opened: Opened, published: list[list[Any]]
) -> None:
    committer, (zero, _), made, _, _ = opened
    offer(zero, create(0, ids_of(0, 1)[0], "r1", timeout=2_000))
    await committer.cycle(1_000)
    await committer.cycle(3_000)  # nothing queued: the timeout alone
    (producer,) = made
    assert producer.calls.count("commit") == 2
    assert [call for call in producer.calls if call.startswith("offsets")] == ["offsets 0:1", "offsets 0:1"]
    progress = [m for m in published[-1] if m.topic == TOPICS.changelog and m.key == PROGRESS_KEY]
    # Two changes so far (the creation, the timeout): the progress record carries the partition's version.
    assert [decode_progress(m.value) for m in progress] == [Progress(1, 3_000, 2)]
    assert zero.store is not None and zero.store.last_now == 3_000 and zero.store.version == zero.version == 2
    assert [p.state for p in zero.store.records().values()] == ["REJECTED_TIMEDOUT"]


async def test_a_timeout_completed_early_does_not_hide_the_next_one(opened: Opened) -> None:
    committer, (zero, _), made, _, _ = opened
    first, second = ids_of(0, 2)
    offer(zero, create(0, first, "r1", timeout=2_000), create(1, second, "r2", timeout=5_000))
    await committer.cycle(1_000)
    resolve = {"op": "resolve", "id": first, "requestId": "r3"}
    offer(zero, Record(2, first.encode(), json.dumps(resolve).encode()))
    await committer.cycle(1_500)
    assert zero.next_deadline == 2_000  # kept in memory: early now, its promise is resolved
    await committer.cycle(3_000)  # nothing due: the index is read once
    assert zero.next_deadline == 5_000 and made[0].calls.count("commit") == 2
    await committer.cycle(6_000)
    assert zero.store is not None
    assert {i: p.state for i, p in zero.store.records().items()} == {first: "RESOLVED", second: "REJECTED_TIMEDOUT"}


async def test_due_timeouts_share_the_transaction_s_budget(opened: Opened, published: list[list[Any]]) -> None:
    """After downtime a backlog of timeouts must not make one transaction too large to commit, ever again."""
    committer, (zero, one), _, _, _ = opened  # max_batch 100 per transaction
    for partition, ids in ((zero, ids_of(0, 80)), (one, ids_of(1, 80))):
        offer(partition, *(create(n, i, f"r{i}", timeout=2_000) for n, i in enumerate(ids)))
    await committer.cycle(1_000)
    await committer.cycle(1_000)  # 160 creates: two transactions
    before = len(published)
    while zero.due(3_000) or one.due(3_000):
        await committer.cycle(3_000)
    timed_out = [sum(1 for m in messages if m.topic == TOPICS.events) for messages in published[before:]]
    assert sum(timed_out) == 160 and max(timed_out) <= 100


async def test_a_record_kafka_refuses_is_refused_alone_and_the_rest_commits(
    opened: Opened, published: list[list[Any]]
) -> None:
    committer, (zero, _), made, scripts, _ = opened
    a, b = ids_of(0, 2)
    # The transaction's first send is refused; replayed singly, a commits (its event, reply and changelog
    # sends), b's first send is refused again, and b's refusal commits on a third producer.
    scripts.extend([[MessageSizeTooLargeError()], [None, None, None, MessageSizeTooLargeError()], []])
    offer(zero, create(0, a, "r1"), create(1, b, "r2"))
    await committer.cycle(1_000)
    assert zero.store is not None and set(zero.store.records()) == {a}
    assert zero.next_offset == 2
    replies = [decode_reply(m.value) for m in published[-1] if m.topic == TOPICS.replies]
    assert [(r.request_id, r.status) for r in replies] == [("r2", "invalid")]
    assert "Kafka refused this command's output" in (replies[0].error or "")
    assert [p.calls.count("commit") for p in made] == [0, 1, 1]


def test_a_data_dir_serves_one_processor_and_keeps_its_transactional_id(tmp_path: Path) -> None:
    first = DataDir(tmp_path, "g")
    with pytest.raises(DataDirInUse, match="give each processor its own --data-dir"):
        DataDir(tmp_path, "g")
    first.release()
    again = DataDir(tmp_path, "g")
    assert again.transactional_id == first.transactional_id and again.transactional_id.startswith("g-")
    assert DataDir(tmp_path / "other", "g").transactional_id != first.transactional_id


def test_sends_refused_names_each_topic_partition() -> None:
    refused = SendsRefused({("mine", 3): MessageSizeTooLargeError()})
    assert "mine[3]" in str(refused)


def test_the_progress_record_carries_the_batch_time_and_reads_old_records_as_zero() -> None:
    assert decode_progress(progress_record(7, 123, 5)) == Progress(7, 123, 5)
    assert decode_progress(b'{"nextCommandOffset": 7}') == Progress(7, 0, 0)
