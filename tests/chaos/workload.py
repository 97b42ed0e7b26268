"""The load: concurrent clients sending a random mix of commands, retrying after a reply timeout.

Each client has its own idempotent producer and several sessions; a session sends one command,
waits for its reply (or for its send to fail), and on a timeout sends the same command again under
a new requestId, as an application retrying with its idempotency key would. The `Ledger` remembers
every attempt, whether Kafka acknowledged it and where it landed: the verifier needs it to explain
a request that is not in the log (its send failed) and to catch one that Kafka acknowledged but
lost.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata

from dp.kafka import options as kafka_options
from dp.machine import TIMER_TAG
from dp.settings import Kafka, Topics
from dp.wire import Reply, decode_reply

HOUR_MS = 3_600_000
OPS = ("create", "resolve", "reject", "cancel", "get", "subscribe")
OP_WEIGHTS = (27, 18, 11, 9, 23, 12)
RECENTLY_CREATED = 64
# Subscription ids per promise: few, so that repeats (deduplicated) happen besides the retries.
SUBSCRIPTION_IDS = 3
CATCH_UP_S = 60.0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Attempt:
    """One send of one command: a requestId, and what Kafka said about it."""

    request_id: str
    op: str
    promise_id: str
    sent_ms: int
    acked: bool | None = None
    position: tuple[int, int] | None = None
    failed_ms: int | None = None
    error: str | None = None


@dataclass
class Ledger:
    """Everything the clients attempted, and the latest short deadline they asked for."""

    attempts: dict[str, Attempt] = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    gave_up: int = 0
    latest_short_deadline: int = 0

    @property
    def sent(self) -> int:
        return len(self.attempts)

    def failed(self) -> list[Attempt]:
        return [a for a in self.attempts.values() if a.acked is False]


class Replies:
    """One read_committed consumer of the replies topic that wakes whoever waits for a requestId."""

    def __init__(self, kafka: Kafka, topics: Topics) -> None:
        self.topic = topics.replies
        self.consumer = AIOKafkaConsumer(
            **kafka_options(kafka), isolation_level="read_committed", enable_auto_commit=False
        )
        self.waiting: dict[str, asyncio.Future[Reply]] = {}
        self.received = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        await self.consumer._client.force_metadata_update()
        partitions = sorted(self.consumer.partitions_for_topic(self.topic) or ())
        tps = [TopicPartition(self.topic, p) for p in partitions]
        self.consumer.assign(tps)
        await self.consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.consumer.stop()

    def expect(self, request_id: str) -> asyncio.Future[Reply]:
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.waiting[request_id] = future
        return future

    async def _read(self) -> None:
        while True:
            try:
                batches = await self.consumer.getmany(timeout_ms=200, max_records=5_000)
            except KafkaError:
                await asyncio.sleep(0.5)  # the broker is down; the consumer reconnects by itself
                continue
            for records in batches.values():
                for record in records:
                    self.received += 1
                    reply = decode_reply(record.value)
                    future = self.waiting.pop(reply.request_id or "", None)
                    if future is not None and not future.done():
                        future.set_result(reply)


class Pacer:
    """At most `rate` sends a second overall, so a run spreads its commands over its duration; time
    lost to an outage may be made up later (up to a minute's worth), at whatever speed the service has."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next = time.monotonic()

    async def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        self.next = max(self.next + self.interval, now - CATCH_UP_S)
        if self.next > now:
            await asyncio.sleep(self.next - now)


@dataclass(frozen=True)
class Mix:
    """The shape of the load: which promises, how timeouts are drawn, how long a reply may take.

    Commands go to a window of `window` consecutive ids of `ids` that slides from the first id to
    the last as the run progresses (`start` says where it is now), so promises are created,
    completed and timed out all along the run, under every fault, not only in its first minutes.
    """

    ids: tuple[str, ...]
    window: int
    start: Callable[[], int]
    short_max_s: float
    reply_timeout_s: float
    inbox: str
    inbox_partitions: int
    max_attempts: int = 5
    created: deque[str] = field(default_factory=lambda: deque(maxlen=RECENTLY_CREATED))
    """Promises the clients created lately: most subscribes go to one, as an application's would."""

    def pick(self, rng: random.Random) -> str:
        first = min(max(self.start(), 0), len(self.ids) - self.window)
        return self.ids[first + rng.randrange(self.window)]


def payload(rng: random.Random) -> dict[str, Any]:
    data = rng.randbytes(rng.randrange(0, 24))
    return {"headers": {"h": str(rng.randrange(100))} if rng.random() < 0.5 else {},
            "data": base64.b64encode(data).decode() if rng.random() < 0.9 else None}  # fmt: skip


def draw_timeout(rng: random.Random, mix: Mix, now: int) -> int:
    """Mostly far away; a third within seconds (so they expire during the run); some already past."""
    roll = rng.random()
    if roll < 0.55:
        return now + HOUR_MS + rng.randrange(HOUR_MS)
    if roll < 0.93:
        return now + rng.randrange(500, int(mix.short_max_s * 1000))
    return now - rng.randrange(0, 3_000)


def draw_command(rng: random.Random, mix: Mix) -> dict[str, Any]:
    """A random command body (without requestId) on a random promise of the pool."""
    op = rng.choices(OPS, OP_WEIGHTS)[0]
    body: dict[str, Any] = {"op": op, "id": mix.pick(rng)}
    if op == "get":
        return body
    if op == "subscribe":
        if mix.created and rng.random() < 0.75:
            body["id"] = rng.choice(mix.created)
        return {**body, "subscription": f"s{rng.randrange(SUBSCRIPTION_IDS)}", "target": draw_target(rng, mix)}
    if rng.random() < 0.9:
        body["idempotencyKey"] = None if rng.random() < 0.2 else f"{op[0] if op == 'create' else 'u'}{rng.randrange(3)}"
    if rng.random() < 0.9:
        body["strict"] = rng.random() < 0.5
    if op == "create":
        body["timeout"] = draw_timeout(rng, mix, now_ms())
        body["param"] = payload(rng)
        body["tags"] = {TIMER_TAG: "true"} if rng.random() < 0.2 else {"chaos": "yes"} if rng.random() < 0.3 else {}
    else:
        body["value"] = payload(rng)
    return body


def draw_target(rng: random.Random, mix: Mix) -> dict[str, Any]:
    """Mostly the run's inbox (by the promise id, by a key of ours, or to a partition we name); now and
    then a webhook, whose notification waits in the notifications topic (no `dp webhooks` runs here)."""
    roll = rng.random()
    if roll < 0.15:
        headers = {"x-chaos": str(rng.randrange(10))} if rng.random() < 0.5 else {}
        return {"type": "webhook", "url": f"http://127.0.0.1:9/chaos/{rng.randrange(4)}", "headers": headers}
    target: dict[str, Any] = {"type": "kafka", "topic": mix.inbox}
    if roll < 0.4:
        target["partition"] = rng.randrange(mix.inbox_partitions)
    elif roll < 0.6:
        target["key"] = f"k{rng.randrange(10)}"
    return target


class Client:
    """One application instance: an idempotent producer shared by `sessions` request loops."""

    def __init__(
        self, name: str, kafka: Kafka, topics: Topics, replies: Replies, ledger: Ledger, mix: Mix, seed: int
    ) -> None:
        self.name = name
        self.kafka = kafka
        self.topics = topics
        self.replies = replies
        self.ledger = ledger
        self.mix = mix
        self.rng = random.Random(seed)
        self.producer: AIOKafkaProducer | None = None
        self.generation = 0
        self._renewing = asyncio.Lock()
        self.ready = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            **kafka_options(self.kafka), acks="all", enable_idempotence=True, linger_ms=2, request_timeout_ms=5_000
        )

    async def start(self) -> None:
        self.producer = self._new_producer()
        await self.producer.start()
        self.ready.set()

    async def stop(self) -> None:
        """Flush and close: every pending send ends acknowledged or failed before the verdict."""
        if self.producer is not None:
            with contextlib.suppress(KafkaError):
                await self.producer.stop()

    async def _renew(self, generation: int) -> None:
        """A failed send can leave an idempotent producer's sequence broken: start a fresh one."""
        async with self._renewing:
            if generation != self.generation:
                return
            self.generation += 1
            self.ready.clear()
            old, self.producer = self.producer, None
            if old is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(old.stop(), 10)
            while self.producer is None:
                fresh = self._new_producer()
                try:
                    await fresh.start()
                    self.producer = fresh
                    self.ready.set()
                except KafkaError:
                    with contextlib.suppress(Exception):
                        await fresh.stop()
                    await asyncio.sleep(1.0)

    async def send(self, body: dict[str, Any]) -> tuple[Attempt, asyncio.Future[Reply], asyncio.Future[Any]]:
        """Publish `body` under a new requestId; returns the attempt, its reply future and its ack future."""
        await self.ready.wait()
        assert self.producer is not None
        producer, generation = self.producer, self.generation
        request_id = f"{self.name}-{uuid.uuid4().hex[:16]}"
        record = {**body, "requestId": request_id}
        attempt = Attempt(request_id, body["op"], body["id"], now_ms())
        self.ledger.attempts[request_id] = attempt
        reply = self.replies.expect(request_id)
        ack: asyncio.Future[Any]
        try:
            ack = await producer.send(self.topics.commands, json.dumps(record).encode(), key=body["id"].encode())
        except KafkaError as error:
            ack = asyncio.get_running_loop().create_future()
            ack.set_exception(error)
        ack.add_done_callback(lambda done: self._acked(attempt, done, generation))
        return attempt, reply, ack

    def _acked(self, attempt: Attempt, done: asyncio.Future[RecordMetadata], generation: int) -> None:
        if done.cancelled() or done.exception() is not None:
            attempt.acked, attempt.failed_ms = False, now_ms()
            attempt.error = "cancelled" if done.cancelled() else repr(done.exception())
            self.replies.waiting.pop(attempt.request_id, None)
            task = asyncio.get_running_loop().create_task(self._renew(generation))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        metadata = done.result()
        attempt.acked, attempt.position = True, (metadata.partition, metadata.offset)

    async def request(self, body: dict[str, Any], budget: Budget | None = None) -> Reply | None:
        """Send until answered: a retry is a new requestId with the same body (and idempotency key)."""
        for attempt_number in range(self.mix.max_attempts):
            if attempt_number:
                if budget is not None and not budget.take():
                    break
                self.ledger.retries += 1
            _, reply, ack = await self.send(body)
            deadline = time.monotonic() + self.mix.reply_timeout_s
            done, _ = await asyncio.wait({reply, ack}, timeout=self.mix.reply_timeout_s, return_when="FIRST_COMPLETED")
            if ack in done and not ack.cancelled() and ack.exception() is not None:
                await asyncio.sleep(0.5)  # the send failed: nothing to wait for
                continue
            if reply not in done:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(reply), max(0.0, deadline - time.monotonic()))
            if reply.done() and not reply.cancelled():
                answer = reply.result()
                self.ledger.statuses[answer.status] += 1
                return answer
        self.ledger.gave_up += 1
        return None

    async def session(self, budget: Budget, stop: asyncio.Event, pacer: Pacer) -> None:
        """Draw, send, await the reply; until the run's time or command budget is spent."""
        while not stop.is_set() and budget.take():
            await pacer.wait()
            body = draw_command(self.rng, self.mix)
            if body["op"] == "create" and body["timeout"] < now_ms() + HOUR_MS:
                self.ledger.latest_short_deadline = max(self.ledger.latest_short_deadline, body["timeout"])
            answer = await self.request(body, budget)
            if body["op"] == "create" and answer is not None and answer.ok:
                self.mix.created.append(body["id"])


class Budget:
    """The run's command limit, shared by every session (a retry spends it too)."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True
