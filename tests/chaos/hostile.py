"""Hostile input: malformed, oversized, wrongly typed and misrouted command records, seeded.

Every record drawn here is checked with the verifier's own `classify` and drawn again if it is
accidentally valid, so each one the processor applies is a bug. Templates use the workload's
real promise ids: a misrouted or mis-keyed record that the processor wrongly applied would change
a real promise, and the replay would see it. Each record that is a JSON object carries a fresh
requestId (`h-…`), so its `invalid` reply can be told apart from any other.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from dp.kafka import options as kafka_options
from dp.settings import Kafka, Topics
from dp.wire import Limits
from tests.chaos.accept import classify, home_partition, own_topics, recoverable_request_id, salvaged_request_id
from tests.chaos.workload import HOUR_MS, now_ms


class Bad(NamedTuple):
    kind: str
    key: bytes | None
    value: bytes | None
    partition: int


WRONG_TYPES: dict[str, list[Any]] = {
    "timeout": ["soon", -5, 2**64, 1.5, None, [1]],
    "strict": ["yes", 1, {}],
    "idempotencyKey": [5, [], {"k": "v"}],
    "param": ["x", [], {"data": "not base64!"}, {"headers": {"a": 1}}],
    "value": [7, {"data": 12}],
    "tags": [{"a": 1}, ["t"], "tag"],
    "id": [123, None, ["a"]],
    "op": [7, None, ["create"]],
    "replyPartition": [-1, "3", 1.5],
    "replyTo": [5, ["t"]],
}


@dataclass
class Hostile:
    """Draws bad records for a deployment of `partitions` partitions."""

    rng: random.Random
    ids: tuple[str, ...]
    partitions: int
    limits: Limits
    topics: Mapping[str, int]
    replies_topic: str
    inbox: str
    drawn: Counter[str] = field(default_factory=Counter)
    serial: int = 0

    def request_id(self) -> str:
        self.serial += 1
        return f"h-{self.serial}"

    def template(self, op: str | None = None) -> dict[str, Any]:
        """A valid command on a real promise; the kinds below break it one way each."""
        op = op or self.rng.choice(("create", "resolve", "reject", "cancel", "get", "subscribe"))
        body: dict[str, Any] = {"op": op, "id": self.rng.choice(self.ids), "requestId": self.request_id()}
        if op == "subscribe":
            body.update(subscription="s0", target={"type": "kafka", "topic": self.inbox})
        elif op == "create":
            body.update(idempotencyKey="c0", strict=False, timeout=now_ms() + HOUR_MS, param={"data": "eA=="})
        elif op != "get":
            body.update(idempotencyKey="u0", strict=self.rng.random() < 0.5, value={"data": "eQ=="})
        return body

    def keyed(self, body: dict[str, Any], kind: str) -> Bad:
        """Encode with the key and partition a correct producer would use."""
        key = str(body.get("id", "")).encode()
        return Bad(kind, key, json.dumps(body).encode(), home_partition(key, self.partitions))

    def draw(self) -> Bad:
        """One bad record, guaranteed bad by the verifier's own rules, carrying no requestId but its own.

        (A flipped bit can turn "h-533" into "h-53"3": drawn again, so requestIds stay unique.)
        """
        kinds = list(KINDS)
        while True:
            first = self.serial + 1
            kind = self.rng.choices(kinds, [KINDS[k][1] for k in kinds])[0]
            bad = KINDS[kind][0](self)
            own = {None, *(f"h-{n}" for n in range(first, self.serial + 1))}
            if (
                isinstance(classify(bad.key, bad.value, bad.partition, self.partitions, self.limits, self.topics,
                                    self.replies_topic), str)
                and recoverable_request_id(bad.value) in own
                and salvaged_request_id(bad.value) in own
            ):  # fmt: skip
                self.drawn[kind] += 1
                return bad

    # --- kinds ------------------------------------------------------------------------------

    def random_bytes(self) -> Bad:
        key = self.rng.choice((None, self.rng.choice(self.ids).encode()))
        return Bad("random_bytes", key, self.rng.randbytes(self.rng.randrange(1, 300)), self.any_partition())

    def not_an_object(self) -> Bad:
        value = self.rng.choice((b"[1, 2, 3]", b"42", b'"create"', b"null", b"true", b"{}", b"", b" "))
        return Bad("not_an_object", None, value, self.any_partition())

    def truncated(self) -> Bad:
        value = json.dumps(self.template()).encode()
        return Bad("truncated", None, value[: self.rng.randrange(1, len(value) - 1)], self.any_partition())

    def wrong_type(self) -> Bad:
        body = self.template("create")
        body.update(self.template(self.rng.choice(("resolve", "create", "get"))))
        field_name = self.rng.choice(list(WRONG_TYPES))
        body[field_name] = self.rng.choice(WRONG_TYPES[field_name])
        return self.keyed(body, "wrong_type")

    def missing_field(self) -> Bad:
        body = self.template("create")
        del body[self.rng.choice(("op", "id", "timeout"))]
        return self.keyed(body, "missing_field")

    def unknown_op(self) -> Bad:
        body = self.template()
        body["op"] = self.rng.choice(("explode", "CREATE", "search", "", "delete"))
        return self.keyed(body, "unknown_op")

    def empty_id(self) -> Bad:
        body = self.template()
        body["id"] = ""
        return self.keyed(body, "empty_id")

    def long_id(self) -> Bad:
        body = self.template()
        body["id"] = "x" * (self.limits.max_id_bytes + 1 + self.rng.randrange(200))
        return self.keyed(body, "long_id")

    def big_data(self) -> Bad:
        body = self.template(self.rng.choice(("create", "resolve")))
        blob = base64.b64encode(self.rng.randbytes(self.limits.max_data_bytes + 1 + self.rng.randrange(1000)))
        body["param" if body["op"] == "create" else "value"] = {"data": blob.decode()}
        return self.keyed(body, "big_data")

    def big_record(self) -> Bad:
        body = self.template()
        body["padding"] = "p" * (self.limits.max_record_bytes + self.rng.randrange(1, 5000))
        return self.keyed(body, "big_record")

    def misrouted(self) -> Bad:
        bad = self.keyed(self.template(), "misrouted")
        return bad._replace(partition=(bad.partition + self.rng.randrange(1, self.partitions)) % self.partitions)

    def wrong_key(self) -> Bad:
        bad = self.keyed(self.template(), "wrong_key")
        key = self.rng.choice((None, self.rng.choice(self.ids).encode(), b"", b"\xff\xfe"))
        return bad._replace(key=key, partition=home_partition(key, self.partitions) if key else self.any_partition())

    def tombstone(self) -> Bad:
        key = self.rng.choice(self.ids).encode()
        return Bad("tombstone", key, None, home_partition(key, self.partitions))

    def bad_reply_address(self) -> Bad:
        body = self.template()
        if self.rng.random() < 0.5:
            body["replyTo"] = f"chaos.no.such.topic.{self.rng.randrange(1000)}"
        else:
            body["replyPartition"] = self.partitions + self.rng.randrange(1000)
        return self.keyed(body, "bad_reply_address")

    def own_reply_address(self) -> Bad:
        """A reply address naming the deployment's own or an internal topic: a reply written there would
        corrupt the changelog, echo into the commands or pose as an event."""
        body = self.template()
        body["replyTo"] = self.rng.choice(
            (*own_topics(self.replies_topic), "__consumer_offsets", "__transaction_state")
        )
        if self.rng.random() < 0.5:
            body["replyPartition"] = self.rng.randrange(self.partitions)
        if self.rng.random() < 0.3:
            del body["requestId"]
            body["requestId"] = self.request_id()
        bad = self.keyed(body, "own_reply_address")
        return bad._replace(key=None) if self.rng.random() < 0.2 else bad

    def bad_target(self) -> Bad:
        """A subscription whose notification could not go where it says, or must never go there."""
        body = self.template("subscribe")
        own = (*own_topics(self.replies_topic), "__consumer_offsets", f"chaos.no.such.topic.{self.rng.randrange(1000)}")
        body["target"] = self.rng.choice((
            {"type": "kafka", "topic": self.rng.choice(own)},
            {"type": "kafka", "topic": self.inbox, "partition": self.topics.get(self.inbox, 0) + self.rng.randrange(9)},
            {"type": "kafka", "topic": self.inbox, "key": "k" * (self.limits.max_id_bytes + 1)},
            {"type": "webhook", "url": self.rng.choice(("ftp://example.com/x", "http:///no-host", "not a url"))},
            {"type": "webhook", "url": "http://127.0.0.1:9/x", "headers": {"x": "line\r\nbreak"}},
            {"type": "carrier-pigeon", "topic": self.inbox},
        ))  # fmt: skip
        if self.rng.random() < 0.2:
            body["subscription"] = self.rng.choice(("", "s" * (self.limits.max_id_bytes + 1), 7))
        return self.keyed(body, "bad_target")

    def bitflip(self) -> Bad:
        bad = self.keyed(self.template(), "bitflip")
        assert bad.value is not None
        value = bytearray(bad.value)
        for _ in range(self.rng.randrange(1, 4)):
            value[self.rng.randrange(len(value))] ^= 1 << self.rng.randrange(8)
        return bad._replace(value=bytes(value))

    def deep(self) -> Bad:
        depth = self.rng.randrange(100, 5000)
        return Bad("deep", None, b"[" * depth + b"]" * depth, self.any_partition())

    def bad_utf8(self) -> Bad:
        value = b'{"op": "get", "id": "\xff\xfe\xfd", "requestId": "' + self.request_id().encode() + b'"}'
        return Bad("bad_utf8", b"\xff\xfe\xfd", value, self.any_partition())

    def any_partition(self) -> int:
        return self.rng.randrange(self.partitions)


KINDS: dict[str, tuple[Callable[[Hostile], Bad], float]] = {
    "random_bytes": (Hostile.random_bytes, 12),
    "not_an_object": (Hostile.not_an_object, 5),
    "truncated": (Hostile.truncated, 10),
    "wrong_type": (Hostile.wrong_type, 18),
    "missing_field": (Hostile.missing_field, 6),
    "unknown_op": (Hostile.unknown_op, 5),
    "empty_id": (Hostile.empty_id, 2),
    "long_id": (Hostile.long_id, 2),
    "big_data": (Hostile.big_data, 1),
    "big_record": (Hostile.big_record, 0.2),
    "misrouted": (Hostile.misrouted, 12),
    "wrong_key": (Hostile.wrong_key, 8),
    "tombstone": (Hostile.tombstone, 3),
    "bad_reply_address": (Hostile.bad_reply_address, 5),
    "own_reply_address": (Hostile.own_reply_address, 5),
    "bad_target": (Hostile.bad_target, 4),
    "bitflip": (Hostile.bitflip, 10),
    "deep": (Hostile.deep, 1),
    "bad_utf8": (Hostile.bad_utf8, 1),
}


@dataclass
class HostileSender:
    """Sends `total` bad records spread over `seconds`, interleaved with the workload's commands."""

    kafka: Kafka
    topics: Topics
    hostile: Hostile
    total: int
    sent: int = 0
    acked: int = 0
    failed: int = 0

    async def run(self, progress: Callable[[], float], stop: asyncio.Event) -> None:
        """Send in step with the phase's `progress` (0 to 1), all of them by 80 % of it."""
        producer = AIOKafkaProducer(
            **kafka_options(self.kafka), acks="all", linger_ms=5, request_timeout_ms=10_000,
            max_request_size=4 * 1024 * 1024,
        )  # fmt: skip
        await producer.start()
        pending = set()
        try:
            while self.sent < self.total and not stop.is_set():
                due = min(self.total, int(self.total * progress() / 0.8) + 1)
                for _ in range(due - self.sent):
                    pending.add(await self._send(producer, self.hostile.draw()))
                await asyncio.sleep(0.05)
            if pending:
                await asyncio.wait(pending)
        finally:
            with contextlib.suppress(KafkaError):
                await producer.stop()

    async def _send(self, producer: AIOKafkaProducer, bad: Bad) -> asyncio.Future[Any]:
        self.sent += 1
        try:
            future: asyncio.Future[Any] = await producer.send(
                self.topics.commands, bad.value, key=bad.key, partition=bad.partition
            )
        except KafkaError:
            self.failed += 1
            done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        future.add_done_callback(self._count)
        return future

    def _count(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            self.failed += 1
        else:
            self.acked += 1
