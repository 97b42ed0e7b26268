"""The writer's commit path without a broker: a failed send aborts, never commits, never reaches RocksDB.

The producer here is a stand-in that records what the writer asks of it; everything else is real
(the batch core, RocksDB in a temporary directory, aiokafka's record batches).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from aiokafka.errors import MessageSizeTooLargeError, NotLeaderForPartitionError
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.structs import RecordMetadata

from consumers import writer as writer_module
from consumers.effects import Route, TopicInfo
from consumers.store import PartitionStore, Progress, decode_progress, progress_record
from consumers.writer import PartitionWriter, SendsRefused
from dp.partitioning import partition_for
from dp.settings import Kafka, Topics
from dp.wire import DEFAULT_LIMITS, decode_reply

TOPICS = Topics("t")
PARTITIONS = 1


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
        self.calls.append("offsets")

    async def commit_transaction(self) -> None:
        self.calls.append("commit")

    async def abort_transaction(self) -> None:
        self.calls.append("abort")

    async def stop(self) -> None:
        self.calls.append("stop")


def create(offset: int, promise_id: str, request_id: str) -> Record:
    assert partition_for(promise_id.encode(), PARTITIONS) == 0
    command = {"op": "create", "id": promise_id, "timeout": 10**13, "requestId": request_id}
    return Record(offset, promise_id.encode(), json.dumps(command).encode())


class Opened(NamedTuple):
    writer: PartitionWriter
    made: list[Producer]
    """The producers the writer created, in order."""
    scripts: list[list[BaseException | None]]
    """What each next producer's sends answer: an exception, or None for success."""


@pytest.fixture
def opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Opened:
    """A writer over a real store whose producers are stand-ins; each new producer takes the next script."""
    made: list[Producer] = []
    scripts: list[list[BaseException | None]] = []

    async def new_producer(self: PartitionWriter) -> Producer:
        made.append(Producer(scripts.pop(0) if scripts else []))
        return made[-1]

    monkeypatch.setattr(PartitionWriter, "_new_producer", new_producer)
    route = Route(0, PARTITIONS, TOPICS, DEFAULT_LIMITS)
    writer = PartitionWriter(Kafka(), "g", route, tmp_path, max_batch=100, max_batch_bytes=1 << 20)
    writer.store = PartitionStore(tmp_path / "store")
    return Opened(writer, made, scripts)


TOPIC_INFO = Topics_({TOPICS.replies: TopicInfo(1), TOPICS.dlq: TopicInfo(1), "other": TopicInfo(1)})


async def test_a_failed_send_aborts_commits_nothing_and_leaves_rocksdb_untouched(
    opened: Opened,
) -> None:
    writer, made, scripts = opened
    scripts.append([NotLeaderForPartitionError()])
    with pytest.raises(NotLeaderForPartitionError):
        await writer.run_batch([create(0, "a", "r1")], 1_000, TOPIC_INFO)  # type: ignore[arg-type]
    (producer,) = made
    assert "commit" not in producer.calls and "offsets" not in producer.calls
    assert producer.calls[-1] == "stop"  # discarded, never reused
    assert writer.producer is None
    assert writer.store is not None and writer.store.records() == {} and writer.store.changelog_offset == 0


async def test_a_record_kafka_refuses_is_refused_alone_and_the_rest_commits(
    opened: Opened, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, made, scripts = opened
    published: list[list[Any]] = []
    original = writer_module.batched

    def spy(producer: Any, messages: list[Any], limits: Any = None) -> Any:
        published.append(messages)
        return original(producer, messages, limits)

    monkeypatch.setattr(writer_module, "batched", spy)
    # The batch's first send is refused; replayed singly, "a" commits (its event, reply and changelog
    # sends), "b"'s first send is refused again, and b's refusal commits on a third producer.
    scripts.extend([[MessageSizeTooLargeError()], [None, None, None, MessageSizeTooLargeError()], []])
    await writer.run_batch([create(0, "a", "r1"), create(1, "b", "r2")], 1_000, TOPIC_INFO)  # type: ignore[arg-type]
    assert writer.store is not None and set(writer.store.records()) == {"a"}
    assert writer.next_offset == 2
    replies = [decode_reply(m.value) for m in published[-1] if m.topic == TOPICS.replies]
    assert [(r.request_id, r.status) for r in replies] == [("r2", "invalid")]
    assert "Kafka refused this command's output" in (replies[0].error or "")
    assert [p.calls.count("commit") for p in made] == [0, 1, 1]


def test_sends_refused_names_each_topic_partition() -> None:
    refused = SendsRefused({("mine", 3): MessageSizeTooLargeError()})
    assert "mine[3]" in str(refused)


def test_the_progress_record_carries_the_batch_time_and_reads_old_records_as_zero() -> None:
    assert decode_progress(progress_record(7, 123)) == Progress(7, 123)
    assert decode_progress(b'{"nextCommandOffset": 7}') == Progress(7, 0)
