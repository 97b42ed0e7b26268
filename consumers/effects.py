"""What one batch of one partition does, computed without I/O: the processor's functional core.

`apply_batch` runs `transition` over the batch's commands (and `expire` over the promises that fell
due) against the store plus an in-batch overlay, and returns every record to publish and every
change to persist. Nothing here touches Kafka; the writer publishes `Effects` in one transaction
and only then persists `Effects.changes`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from dp.machine import Outcome, expire, reply_for, transition
from dp.partitioning import partition_for
from dp.settings import Topics
from dp.wire import Command, InvalidCommand, Limits, Promise, Reply, decode_command, encode, reply_address

Headers = list[tuple[str, bytes]]
log = logging.getLogger("dp.processor")


class Incoming(Protocol):
    """The parts of a consumed command record the processor reads (aiokafka's ConsumerRecord has them)."""

    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


class Outgoing(msgspec.Struct, frozen=True, gc=False):
    """One record to publish in the batch's transaction, to an explicit partition."""

    topic: str
    partition: int
    key: bytes | None
    value: bytes
    headers: Headers | None = None


@dataclass
class Effects:
    """Everything a batch publishes (in order) and the records it changed (latest version per id)."""

    messages: list[Outgoing] = field(default_factory=list)
    changes: dict[str, Promise] = field(default_factory=dict)
    persist: list[tuple[Promise, bytes]] = field(default_factory=list)


@dataclass(frozen=True)
class Route:
    """Where this partition's writer publishes, and what it accepts."""

    partition: int
    partitions: int
    topics: Topics
    limits: Limits


def apply_batch(
    route: Route,
    read: Callable[[str], Promise | None],
    records: list[Incoming],
    due: list[Promise],
    now: int,
    reply_topics: Mapping[str, int],
) -> Effects:
    """Apply due timeouts, then each command in log order; `reply_topics` maps topic -> partition count."""
    effects = Effects()

    def current(promise_id: str) -> Promise | None:
        changed = effects.changes.get(promise_id)
        return changed if changed is not None else read(promise_id)

    for promise in due:
        outcome = expire(promise, now)
        if outcome is not None:
            record_changes(route, effects, outcome)
    for record in records:
        try:
            command = accept(route, record, reply_topics)
            outcome = transition(current(command.id), command, now)
            reply = reply_message(route, command, reply_for(command, outcome), reply_topics)
        except InvalidCommand as problem:
            refuse(route, effects, record, str(problem), reply_topics)
            continue
        except Exception as error:  # a bug must not wedge the partition on one record: refuse it, go on
            log.exception("partition %d: offset %d could not be applied", route.partition, record.offset)
            refuse(route, effects, record, f"internal error ({type(error).__name__}): not applied", reply_topics)
            continue
        record_changes(route, effects, outcome)
        effects.messages.append(reply)
    for promise_id, promise in effects.changes.items():
        value = encode(promise)
        effects.persist.append((promise, value))
        effects.messages.append(Outgoing(route.topics.changelog, route.partition, promise_id.encode(), value))
    return effects


def accept(route: Route, record: Incoming, reply_topics: Mapping[str, int]) -> Command:
    """Decode a command and check what decoding cannot: its key, partition and reply address."""
    if record.value is None:
        raise InvalidCommand("record has no value (a tombstone is not a command)")
    command = decode_command(record.value, route.limits)
    if record.key is None or record.key != command.id.encode():
        raise InvalidCommand("record key must equal the command's `id` (the promise id, UTF-8)")
    expected = partition_for(record.key, route.partitions)
    if expected != route.partition:
        raise InvalidCommand(
            f"misrouted: promise {command.id!r} belongs on partition {expected}, not {route.partition}; "
            "produce with the key set to the id and Kafka's default (murmur2) partitioner"
        )
    check_reply_address(route, command.reply_to, command.reply_partition, reply_topics)
    return command


def check_reply_address(
    route: Route, reply_to: str | None, reply_partition: int | None, reply_topics: Mapping[str, int]
) -> None:
    topic = reply_to or route.topics.replies
    count = reply_topics.get(topic, 0)
    if count == 0:
        raise InvalidCommand(f"`replyTo`: topic {topic!r} does not exist")
    if reply_partition is not None and reply_partition >= count:
        raise InvalidCommand(f"`replyPartition`: {topic!r} has {count} partitions, got {reply_partition}")


def record_changes(route: Route, effects: Effects, outcome: Outcome) -> None:
    if not outcome.events or outcome.promise is None:
        return
    effects.changes[outcome.promise.id] = outcome.promise
    effects.messages.extend(
        Outgoing(route.topics.events, route.partition, event.promise.id.encode(), encode(event))
        for event in outcome.events
    )


def reply_partition_of(route: Route, topic: str, partition: int | None, counts: Mapping[str, int]) -> int:
    """The asked-for partition, else this partition's number modulo the topic's count: replies are matched
    by requestId, not by partition, and hashing every requestId would cost more than the rest of a reply."""
    return partition if partition is not None else route.partition % counts[topic]


def reply_message(route: Route, command: Command, reply: Reply, reply_topics: Mapping[str, int]) -> Outgoing:
    topic = command.reply_to or route.topics.replies
    key = (command.request_id or command.id).encode()
    return Outgoing(topic, reply_partition_of(route, topic, command.reply_partition, reply_topics), key, encode(reply))


def refuse(route: Route, effects: Effects, record: Incoming, problem: str, reply_topics: Mapping[str, int]) -> None:
    """An unusable record: answer `invalid` where an address is recoverable, copy it to the DLQ."""
    raw = record.value or b""
    request_id, reply_to, requested = reply_address(raw)
    try:
        check_reply_address(route, reply_to, requested, reply_topics)
    except InvalidCommand:
        reply_to, requested = None, None
    reply = Reply(request_id, None, None, False, "invalid", None, problem)
    topic = reply_to or route.topics.replies
    key = (request_id or "").encode() or record.key
    partition = reply_partition_of(route, topic, requested, reply_topics)
    effects.messages.append(Outgoing(topic, partition, key, encode(reply)))
    headers: Headers = [
        ("dp.error", problem.encode()),
        ("dp.topic", route.topics.commands.encode()),
        ("dp.partition", str(route.partition).encode()),
        ("dp.offset", str(record.offset).encode()),
    ]
    dlq = route.topics.dlq
    partition = partition_for(record.key, reply_topics[dlq]) if record.key else 0
    effects.messages.append(Outgoing(dlq, partition, record.key, raw, headers))
