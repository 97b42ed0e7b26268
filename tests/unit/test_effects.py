"""The processor's functional core: what one batch publishes and persists, without Kafka or RocksDB."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from consumers.effects import Route, TopicInfo, apply_batch
from dp.partitioning import partition_for
from dp.settings import Topics
from dp.wire import DEFAULT_LIMITS, Promise, decode_event, decode_reply
from tests.memory import MemoryStore

TOPICS = Topics("t")
PARTITIONS = 4
COUNTS = {TOPICS.replies: TopicInfo(3), TOPICS.dlq: TopicInfo(2), "mine": TopicInfo(5)}
NOW = 1_000_000


@dataclass(frozen=True)
class Record:
    offset: int
    key: bytes | None
    value: bytes | None


def owned_id(partition: int, stem: str = "p") -> str:
    """A promise id that belongs on `partition`."""
    return next(f"{stem}{n}" for n in range(10_000) if partition_for(f"{stem}{n}".encode(), PARTITIONS) == partition)


def command(offset: int, **fields: object) -> Record:
    return Record(offset, str(fields["id"]).encode(), json.dumps(fields).encode())


def run(records: list[Record], store: dict[str, Promise] | None = None, partition: int = 0):  # type: ignore[no-untyped-def]
    route = Route(partition, PARTITIONS, TOPICS, DEFAULT_LIMITS)
    return apply_batch(route, MemoryStore(dict(store or {})), records, [], NOW, COUNTS)


def replies(effects) -> list:  # type: ignore[no-untyped-def]
    return [decode_reply(m.value) for m in effects.messages if m.topic in (TOPICS.replies, "mine")]


def test_a_batch_publishes_events_replies_and_one_changelog_record_per_changed_promise() -> None:
    pid = owned_id(0)
    effects = run([
        command(1, op="create", id=pid, timeout=NOW + 10, requestId="a"),
        command(2, op="resolve", id=pid, requestId="b"),
        command(3, op="get", id=pid, requestId="c"),
    ])  # fmt: skip
    assert [r.status for r in replies(effects)] == ["created", "resolved", "found"]
    events = [decode_event(m.value).type for m in effects.messages if m.topic == TOPICS.events]
    assert events == ["created", "resolved"]
    changelog = [m for m in effects.messages if m.topic == TOPICS.changelog]
    assert len(changelog) == 1 and changelog[0].partition == 0
    assert [p.state for p, _ in effects.persist] == ["RESOLVED"]


def test_replies_go_to_the_asked_partition_or_this_partitions_number_modulo_the_count() -> None:
    pid = owned_id(2)
    effects = run([
        command(1, op="get", id=pid, requestId="a"),
        command(2, op="get", id=pid, requestId="b", replyTo="mine", replyPartition=4),
    ], partition=2)  # fmt: skip
    assert [(m.topic, m.partition) for m in effects.messages] == [(TOPICS.replies, 2 % 3), ("mine", 4)]


@pytest.mark.parametrize(
    ("fields", "key", "error"),
    [
        ({"op": "get", "replyTo": "nowhere"}, None, "`replyTo`: topic 'nowhere' does not exist"),
        ({"op": "get", "replyTo": "mine", "replyPartition": 5}, None, "`replyPartition`: 'mine' has 5 partitions"),
        ({"op": "get"}, b"other", "record key must equal"),
    ],
)
def test_unusable_records_are_refused_and_dead_lettered(
    fields: dict[str, object], key: bytes | None, error: str
) -> None:
    pid = owned_id(0)
    record = command(7, id=pid, requestId="r", **fields)
    effects = run([Record(7, key or record.key, record.value)])
    (reply,) = replies(effects)
    assert reply.status == "invalid" and error in (reply.error or "")
    (dead,) = [m for m in effects.messages if m.topic == TOPICS.dlq]
    assert dead.value == record.value and dict(dead.headers or [])["dp.offset"] == b"7"


def test_a_record_on_the_wrong_partition_names_the_right_one() -> None:
    pid = owned_id(3)
    (reply,) = replies(run([command(1, op="get", id=pid, requestId="r")], partition=0))
    assert reply.status == "invalid" and "belongs on partition 3, not 0" in (reply.error or "")


def test_an_unexpected_error_refuses_that_record_and_the_batch_goes_on() -> None:
    bad, good = owned_id(0, "bad"), owned_id(0, "good")

    def corrupt(promise_id: str) -> None:
        if promise_id == bad:
            raise OSError("corrupt record")

    route = Route(0, PARTITIONS, TOPICS, DEFAULT_LIMITS)
    effects = apply_batch(route, MemoryStore(broken=corrupt), [
        command(1, op="get", id=bad, requestId="x"),
        command(2, op="create", id=good, timeout=NOW + 10, requestId="y"),
    ], [], NOW, COUNTS)  # fmt: skip
    first, second = replies(effects)
    assert first.status == "invalid" and "internal error (OSError)" in (first.error or "")
    assert second.status == "created"
    assert len([m for m in effects.messages if m.topic == TOPICS.dlq]) == 1
