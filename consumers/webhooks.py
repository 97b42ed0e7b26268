"""`dp webhooks`: posts every notification of a webhook subscription to its URL, at least once.

The processor writes one record per webhook subscription to the notifications topic when a promise
completes (in its transaction, so a notification exists exactly when the completion does). This
service reads that topic as a consumer group and POSTs each record; only a record that is done
(delivered with a 2xx, or written to the DLQ after its last attempt) lets its partition's committed
offset pass it. Deliveries run concurrently, bounded in total and per destination, so one slow
receiver delays mostly its own notifications (a dead one with more than the total bound pending holds
every slot until they are dead-lettered); a crash or a stop at any moment posts again what was not
done, under the same `Idempotency-Key` (docs/webhooks.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import signal
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Final
from urllib.parse import urlsplit

import aiohttp
import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from multidict import CIMultiDict

from dp import kafka as clients
from dp.errors import BrokerUnreachable
from dp.settings import WebhookSettings
from dp.topics import check_topics
from dp.wire import Notification, decode_notification, encode

log = logging.getLogger("dp.webhooks")

IDLE_POLL_MS: Final = 100
STARTUP_BACKOFF_S: Final = (0.5, 1.0, 2.0, 5.0, 10.0)
DLQ_RETRY_S: Final = 1.0
COMMIT_S: Final = 10.0  # the last commit of a stop: aiokafka retries a commit forever while no broker answers
TRANSIENT_4XX: Final = frozenset((408, 429))
DEFAULT_PORTS: Final = {"http": 80, "https": 443}
USER_AGENT: Final = "dp-webhooks"
DLQ_HEADERS: Final = frozenset(("dp.error", "dp.topic", "dp.partition", "dp.offset"))


class AttemptFailed(Exception):
    """One POST that did not deliver; `permanent` when another attempt cannot change the answer."""

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.permanent = permanent


class Stopping(Exception):
    """The service began to stop while a delivery waited: the record stays undone, for the next run."""


# --- pure decisions ------------------------------------------------------------------------------


def idempotency_key(promise_id: str, subscription: str) -> str:
    """The same for every delivery of one notification, different for any other (a JSON pair is unambiguous
    whatever characters the ids hold), so a receiver can drop duplicates."""
    return hashlib.sha256(msgspec.json.encode((promise_id, subscription))).hexdigest()


def destination(url: str) -> tuple[str, int]:
    """The URL's host (lower case, IPv6 unbracketed) and port, explicit or the scheme's default."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or DEFAULT_PORTS.get(parts.scheme, 0)


def shown(url: str) -> str:
    """The URL for logs and errors, without user info, query or fragment (they may hold credentials)."""
    parts = urlsplit(url)
    host, port = destination(url)
    return f"{parts.scheme}://{f'[{host}]' if ':' in host else host}:{port}{parts.path}"


def allowed(host: str, port: int, hosts: Iterable[tuple[str, int | None]]) -> bool:
    """Whether the allow-list names `host` (literally: no DNS is asked) and `port`; `*.domain` matches its
    subdomains, not the domain itself."""
    for pattern, wanted in hosts:
        if wanted is not None and wanted != port:
            continue
        if host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


def not_allowed(url: str, settings: WebhookSettings) -> str | None:
    """Why `url` may not be posted to, or None: the guard against subscribers reaching internal services."""
    host, port = destination(url)
    if allowed(host, port, settings.allowed_hosts):
        return None
    if not settings.allowed_hosts:
        return (
            f"no webhook host is allowed, so {shown(url)} was not posted to: list the hosts webhooks may reach "
            "in --webhook-hosts / DP_WEBHOOK_HOSTS."
        )
    return f"the host {host}:{port} of {shown(url)} is not on the allow-list: add it to DP_WEBHOOK_HOSTS to post there."


def judge(status: int, reason: str | None, url: str) -> AttemptFailed | None:
    """None for a 2xx; a redirect (never followed) or a 4xx other than 408/429 is permanent, the rest retried."""
    if 200 <= status < 300:
        return None
    answered = f"{shown(url)} answered {status} {reason or ''}".rstrip()
    if 300 <= status < 400:
        return AttemptFailed(
            f"{answered}, a redirect, which is not followed: subscribe with the final URL", permanent=True
        )
    permanent = 400 <= status < 500 and status not in TRANSIENT_4XX
    return AttemptFailed(answered, permanent=permanent)


def backoff(attempt: int, first: float, most: float) -> float:
    """Seconds before attempt `attempt + 1`: exponential, with full jitter so that retries spread out."""
    return random.uniform(0, min(most, first * 2 ** (attempt - 1)))


def payload(notification: Notification) -> bytes:
    """What is posted: the notification without its `webhook` (where and how to post is not the receiver's)."""
    return encode(msgspec.structs.replace(notification, webhook=None))


class Ledger:
    """Which fetched records are done, per partition; a partition commits up to its first record not done,
    so that a record delivered out of order is never committed past one still being delivered."""

    def __init__(self) -> None:
        self._fetched: dict[TopicPartition, deque[int]] = {}
        self._done: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def fetched(self, tp: TopicPartition, offset: int) -> None:
        self._fetched.setdefault(tp, deque()).append(offset)
        self._done.setdefault(tp, set())
        self._next[tp] = offset + 1

    def done(self, tp: TopicPartition, offset: int) -> None:
        """Mark a record done; one of a partition forgotten since (revoked) is ignored."""
        if tp in self._done:
            self._done[tp].add(offset)

    def committable(self) -> dict[TopicPartition, int]:
        """The offset each partition may commit now, where it moved since the last commit."""
        offsets = {}
        for tp, fetched in self._fetched.items():
            done = self._done[tp]
            while fetched and fetched[0] in done:
                done.discard(fetched.popleft())
            position = fetched[0] if fetched else self._next[tp]
            if self._committed.get(tp) != position:
                offsets[tp] = position
        return offsets

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            for table in (self._fetched, self._done, self._next, self._committed):
                table.pop(tp, None)


class Destinations:
    """At most `per_host` POSTs to one host:port at once: a burst never floods one receiver, and a slow one
    holds only its own slots. The wait happens before an attempt's timeout starts, unlike aiohttp's own
    per-host connection limit, whose wait would count against it."""

    def __init__(self, per_host: int) -> None:
        self.per_host = per_host
        self._slots: dict[tuple[str, int], asyncio.Semaphore] = {}
        self._users: Counter[tuple[str, int]] = Counter()

    @asynccontextmanager
    async def slot(self, where: tuple[str, int]) -> AsyncIterator[None]:
        semaphore = self._slots.setdefault(where, asyncio.Semaphore(self.per_host))
        self._users[where] += 1
        try:
            async with semaphore:
                yield
        finally:
            self._users[where] -= 1
            if not self._users[where]:  # forget idle hosts: the set of URLs is the subscribers' to choose
                del self._users[where], self._slots[where]


# --- the service ---------------------------------------------------------------------------------


class Webhooks(ConsumerRebalanceListener):  # type: ignore[misc]
    """The fetch loop, the deliveries in flight and the group listener of one `dp webhooks` process."""

    def __init__(self, settings: WebhookSettings) -> None:
        self.settings = settings
        self.stopping = asyncio.Event()
        self.ledger = Ledger()
        self.destinations = Destinations(settings.per_host)
        self.deliveries: dict[asyncio.Task[None], TopicPartition] = {}
        self.counts: Counter[str] = Counter()
        self.consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._session: aiohttp.ClientSession | None = None
        self._failure: BaseException | None = None

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        """Post until `stop()`: then let deliveries in flight finish (up to the grace period), commit, return."""
        settings = self.settings
        if not await self._topics_ready():
            return
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),  # bounded by `in_flight` and `Destinations` instead
            timeout=aiohttp.ClientTimeout(total=settings.timeout),
            cookie_jar=aiohttp.DummyCookieJar(),  # one receiver's cookies are no business of the next POST
            headers={"User-Agent": USER_AGENT},
        )
        consumer = clients.reader(settings.kafka, settings.group_id, auto_offset_reset="earliest")
        consumer.subscribe([settings.topics.notifications], listener=self)
        async with session, clients.started(settings.kafka, clients.producer(settings.kafka)) as producer:
            self._session, self._producer = session, producer
            log.info("joining group %r to post the notifications of %s (%d hosts allowed)", settings.group_id,
                     settings.topics.notifications, len(settings.allowed_hosts))  # fmt: skip
            async with clients.started(settings.kafka, consumer):
                self.consumer = consumer
                try:
                    await self._fetch(consumer)
                finally:
                    await self._finish(consumer)
        log.info("stopped: %d delivered, %d dead-lettered, %d retries", self.counts["delivered"],
                 self.counts["dead-lettered"], self.counts["retries"])  # fmt: skip

    async def _topics_ready(self) -> bool:
        """Whether the topics exist (TopicsProblem says how to fix them); retries while no broker answers,
        saying so in one sentence each time, and gives up (False) when stopped meanwhile."""
        delays = iter(STARTUP_BACKOFF_S)
        while not self.stopping.is_set():
            try:
                await check_topics(self.settings.kafka, self.settings.topics)
                return True
            except BrokerUnreachable as error:
                delay = next(delays, STARTUP_BACKOFF_S[-1])
                log.warning("%s Retrying in %.1fs.", error, delay)
                try:
                    await asyncio.wait_for(self.stopping.wait(), delay)
                except TimeoutError:
                    continue
        return False

    async def _fetch(self, consumer: AIOKafkaConsumer) -> None:
        """Fetch while there is room in flight (pausing the partitions when there is none), start a delivery
        per record, and commit what became done."""
        while not self.stopping.is_set():
            if self._failure is not None:
                raise RuntimeError("a delivery failed unexpectedly") from self._failure
            room = self.settings.in_flight - len(self.deliveries)
            if room <= 0:
                consumer.pause(*consumer.assignment())
            else:
                consumer.resume(*consumer.paused())
            batches = await consumer.getmany(timeout_ms=IDLE_POLL_MS, max_records=max(room, 1))
            for tp, records in batches.items():
                for record in records:
                    self.ledger.fetched(tp, record.offset)
                    task = asyncio.create_task(self._deliver(tp, record))
                    self.deliveries[task] = tp
                    task.add_done_callback(self._ended)
            await self._commit(consumer)

    async def _finish(self, consumer: AIOKafkaConsumer) -> None:
        """The stop: deliveries waiting to retry give up at once; POSTs under way get the grace period."""
        self.stopping.set()
        if self.deliveries:
            log.info("stopping: %d deliveries in flight get up to %.1fs", len(self.deliveries), self.settings.grace)
            await asyncio.wait(list(self.deliveries), timeout=self.settings.grace)
        await _cancel(list(self.deliveries))
        try:
            await asyncio.wait_for(self._commit(consumer), COMMIT_S)
        except TimeoutError:
            log.warning("the last commit did not end within %.0fs: the next run posts those notifications again",
                        COMMIT_S)  # fmt: skip

    def _ended(self, task: asyncio.Task[None]) -> None:
        self.deliveries.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            self._failure = task.exception()

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        """Commit each partition up to its first record not done; a refused commit is tried again next time
        (or, after a rebalance, the new owner posts those records again: at least once)."""
        offsets = self.ledger.committable()
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except KafkaError as error:
            log.info("offsets not committed (%s): they will be", error)
            return
        self.ledger.committed(offsets)

    # --- one delivery ------------------------------------------------------------------------

    async def _deliver(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        """Post the record until delivered, or write it to the DLQ; either way it is done. A stop leaves it undone."""
        try:
            problem = await self._post(record)
            if problem is None:
                self.counts["delivered"] += 1
            else:
                await self._dead_letter(record, problem)
        except Stopping:
            return
        self.ledger.done(tp, record.offset)

    async def _post(self, record: ConsumerRecord) -> str | None:
        """None once delivered; else why it never will be (its last attempt's error, as one sentence)."""
        try:
            notification = decode_notification(record.value or b"")
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as error:
            return f"the record is not a notification ({error}): only the processor should write to this topic."
        webhook = notification.webhook
        if webhook is None:
            return "the notification names no webhook to post to: only webhook subscriptions belong on this topic."
        refusal = not_allowed(webhook.url, self.settings)
        if refusal is not None:
            return refusal
        body = payload(notification)
        headers = CIMultiDict(webhook.headers)
        headers["Content-Type"] = "application/json"
        headers["Idempotency-Key"] = idempotency_key(notification.promise.id, notification.subscription)
        attempts = self.settings.attempts
        for attempt in range(1, attempts + 1):
            try:
                async with self.destinations.slot(destination(webhook.url)):
                    if self.stopping.is_set():
                        raise Stopping
                    await self._attempt(webhook.url, body, headers)
                return None
            except AttemptFailed as failure:
                if failure.permanent or attempt == attempts:
                    kind = "permanent failure" if failure.permanent else "last attempt"
                    return f"{failure} ({kind}, attempt {attempt} of {attempts})."
                self.counts["retries"] += 1
                delay = backoff(attempt, self.settings.first_delay, self.settings.max_delay)
                log.debug("attempt %d of %d: %s; next in %.2fs", attempt, attempts, failure, delay)
                await self._pause(delay)
        raise AssertionError("unreachable: the last attempt returns")

    async def _attempt(self, url: str, body: bytes, headers: CIMultiDict[str]) -> None:
        """One POST, within the attempt timeout; AttemptFailed unless it answers 2xx."""
        assert self._session is not None
        try:
            async with self._session.post(url, data=body, headers=headers, allow_redirects=False) as response:
                failure = judge(response.status, response.reason, url)
        except TimeoutError:
            raise AttemptFailed(f"{shown(url)} did not answer within {self.settings.timeout:g}s") from None
        except aiohttp.ClientError as error:
            raise AttemptFailed(f"{shown(url)} could not be reached ({error or type(error).__name__})") from None
        except ValueError as error:  # aiohttp refused to build the request (a header it cannot send): every time
            raise AttemptFailed(f"the POST to {shown(url)} cannot be sent ({error})", permanent=True) from None
        if failure is not None:
            raise failure

    async def _dead_letter(self, record: ConsumerRecord, problem: str) -> None:
        """Write the record as it came to the DLQ, with why and whence; retried until Kafka takes it."""
        assert self._producer is not None
        headers = [
            ("dp.error", problem.encode()),
            ("dp.topic", record.topic.encode()),
            ("dp.partition", str(record.partition).encode()),
            ("dp.offset", str(record.offset).encode()),
            *((name, value) for name, value in record.headers if name not in DLQ_HEADERS),
        ]
        while True:
            try:
                await self._producer.send_and_wait(
                    self.settings.topics.dlq, value=record.value, key=record.key, headers=headers
                )
                break
            except KafkaError as error:
                log.warning("could not write to %s (%s); retrying in %.0fs", self.settings.topics.dlq, error,
                            DLQ_RETRY_S)  # fmt: skip
                await self._pause(DLQ_RETRY_S)
        self.counts["dead-lettered"] += 1
        log.warning("partition %d offset %d to the DLQ: %s", record.partition, record.offset, problem)

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds`, or raise Stopping as soon as the service stops: a retry is the next run's."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            return
        raise Stopping

    # --- rebalancing (called by aiokafka's coordinator) ----------------------------------------

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        """Commit what is done, then drop the revoked partitions' deliveries: their new owner posts them again."""
        revoked = set(revoked)
        if self.consumer is not None:
            await self._commit(self.consumer)
        await _cancel([task for task, tp in self.deliveries.items() if tp in revoked])
        self.ledger.forget(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        """Nothing to prepare: each partition resumes at its committed offset, its first record not done."""
        log.info("assigned partitions %s", sorted(tp.partition for tp in assigned))


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def serve(settings: WebhookSettings) -> None:
    """Run the webhook poster until SIGTERM or SIGINT."""
    webhooks = Webhooks(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, webhooks.stop)
    await webhooks.run()
