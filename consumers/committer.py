"""The committer: one transactional producer per process, one transaction per cycle for every partition.

Group commit (EOS-v2, KIP-447). Each cycle takes what every open partition has queued, and the
timeouts now due, into one transaction: replies, events, changelog records, a progress record per
partition touched, and the consumer offset of every partition touched, sent with the consumer-group
generation under which the partitions were assigned (`consumers/kip447.py`). Only once the commit
succeeded does each partition write its changes to RocksDB. The next cycle starts at once with
whatever arrived meanwhile: the batch grows with the load and no timer delays a lone command.

The invariants of the design, and where they hold:

* I1: every partition in a transaction contributes its offset and a progress record (`Partition.step`).
* I2: the offsets carry the generation captured at assignment (`group`, set by the processor); a
  revocation `hold`s the committer, so the transaction in flight ends before the process rejoins.
* I3: `EndTxn(COMMIT)` only after the offsets were accepted; after any failure the producer is
  discarded and replaced, never reused.
* I4: every record batch is acknowledged before the offsets are sent; any refusal aborts the whole
  transaction. When Kafka refuses records for what they carry, each partition's work is replayed a
  command at a time, so the refusal lands on the command that caused it and the rest commits.

A failed transaction leaves every store untouched; its partitions are handed back to the processor,
which reopens them from Kafka's truth (the transaction may have committed after all).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Final

import aiokafka.producer.sender
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.structs import RecordMetadata

from consumers.effects import Incoming, Outgoing, TopicInfo, is_notification, record_bytes
from consumers.failures import Failure, classify
from consumers.kip447 import GroupMetadata, send_offsets
from consumers.partition import DUE_PER_STEP, Partition, Step
from consumers.reply_topics import ReplyTopics
from consumers.store import DataDir
from dp.kafka import TRANSACTION_TIMEOUT_MS, discard, transactional_producer
from dp.settings import Kafka

log = logging.getLogger("dp.processor")

# A transaction not committed by then is abandoned (its producer discarded, its partitions reopened); below
# the transaction timeout, so the coordinator never aborts one the committer still awaits.
PUBLISH_TIMEOUT_S: Final = TRANSACTION_TIMEOUT_MS / 1000 - 2

# A transaction begun right after a commit is refused with CONCURRENT_TRANSACTIONS until the broker
# has written the previous commit's markers (KAFKA-5477); aiokafka then waits a fixed 20 ms before
# retrying, which would add 20 ms to every cycle. The markers take a millisecond or two here.
aiokafka.producer.sender.BACKOFF_OVERRIDE = 0.002

Slot = tuple[str, int]
OnFailure = Callable[[list[Partition], BaseException], None]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class SendsRefused(Exception):
    """Kafka refused some of a transaction's record batches for what they carried (the transaction was
    aborted): `slots` maps each refused topic partition to the reason."""

    def __init__(self, slots: dict[Slot, BaseException]) -> None:
        super().__init__("; ".join(f"{topic}[{partition}]: {error!r}" for (topic, partition), error in slots.items()))
        self.slots = slots


class Without(Mapping[str, TopicInfo]):
    """The topics as the core sees them, less those Kafka has just refused records for."""

    def __init__(self, topics: Mapping[str, TopicInfo], refused: set[str]) -> None:
        self.topics = topics
        self.refused = refused

    def __getitem__(self, topic: str) -> TopicInfo:
        if topic in self.refused:
            raise KeyError(topic)
        return self.topics[topic]

    def __iter__(self) -> Iterator[str]:
        return (topic for topic in self.topics if topic not in self.refused)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class Committer:
    """Owns the process's transactional producer; the only writer of every open partition's store."""

    def __init__(
        self,
        kafka: Kafka,
        data_dir: DataDir,
        reply_topics: ReplyTopics,
        max_batch: int,
        max_batch_bytes: int,
        on_failure: OnFailure,
    ) -> None:
        self.kafka = kafka
        self.transactional_id = data_dir.transactional_id
        self.reply_topics = reply_topics
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.on_failure = on_failure
        self.partitions: dict[TopicPartition, Partition] = {}
        """The open partitions: their work goes into the next transaction."""
        self.group: GroupMetadata | None = None
        """The generation the partitions were assigned under; None between a revocation and the next assignment."""
        self.producer: AIOKafkaProducer | None = None
        self.transactions = 0
        self._work = asyncio.Event()
        self._held = False
        self._cycle: asyncio.Task[None] | None = None
        self._rotation = 0
        # Names each cycle's transaction in its search answers (unique: this process's incarnation and a
        # count), so that a client can tell the answers one transaction committed together.
        self._incarnation = uuid.uuid4().hex[:12]
        self._cycles = itertools.count()

    # --- control (called by the processor) ------------------------------------------------

    def adopt(self, partition: Partition) -> None:
        self.partitions[partition.source] = partition
        self._work.set()

    def release(self, tp: TopicPartition) -> Partition | None:
        return self.partitions.pop(tp, None)

    def wake(self) -> None:
        """Records were queued: the next cycle may start."""
        self._work.set()

    async def hold(self, seconds: float) -> None:
        """End the transaction in flight (or abandon it after `seconds`) and start none until `resume`.

        A revocation holds the committer before the process rejoins the group (I2), so no transaction of
        this generation is still open once another process owns the partitions. An abandoned one never
        commits: its offsets are refused or its producer's successor aborts it, and the next owner waits
        for that (I5).
        """
        self._held = True
        cycle = self._cycle
        if cycle is None:
            return
        done, _ = await asyncio.wait([cycle], timeout=seconds)
        if not done:
            log.warning("the transaction in flight did not end within %.0fs; abandoning it", seconds)
            cycle.cancel()
            await asyncio.wait([cycle])

    def resume(self) -> None:
        self._held = False
        self._work.set()

    async def close(self) -> None:
        producer, self.producer = self.producer, None
        if producer is not None:
            await discard(producer)

    # --- the cycle ------------------------------------------------------------------------

    async def run(self) -> None:
        """Cycle until cancelled: wait for work, commit it, repeat."""
        while True:
            await self._wait_for_work()
            self._cycle = asyncio.create_task(self.cycle())
            await asyncio.wait([self._cycle])
            if not self._cycle.cancelled() and (error := self._cycle.exception()) is not None:
                log.error("a commit cycle failed unexpectedly", exc_info=error)
            self._cycle = None

    async def _wait_for_work(self) -> None:
        while True:
            now = now_ms()
            ready = not self._held and self.group is not None
            if ready and any(partition.has_work(now) for partition in self.partitions.values()):
                return
            self._work.clear()
            deadlines = [p.wakeup for p in self.partitions.values() if p.wakeup is not None]
            if not ready or not deadlines:
                await self._work.wait()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._work.wait(), max(0.0, (min(deadlines) - now) / 1000))

    async def cycle(self, now: int | None = None) -> None:
        """One transaction for the work of the moment of every open partition. On any failure the partitions
        that had work are handed back to the processor (`on_failure`), which reopens them from Kafka's truth
        after a backoff (so records taken from their queues are fetched again, and a broker that is gone
        is not retried in a spin), and the producer is replaced.

        The batch time is read after the last wait before records are taken (a fixed `now` is for tests), so
        no command is stamped with a time before it was appended to the log.
        """
        if self._held or self.group is None:
            return
        busy = [partition for partition in self.partitions.values() if partition.has_work(now or now_ms())]
        try:
            if self.reply_topics.stale:
                await self.reply_topics.refresh()
            now = now or now_ms()
            busy = [partition for partition in self.partitions.values() if partition.has_work(now)]
            steps = await self._collect(busy, now)
            if not steps:
                return
            try:
                await self._commit(steps)
            except SendsRefused as refused:
                log.warning("Kafka refused records of a transaction (%s); applying its commands one at a time, "
                            "partition by partition", refused)  # fmt: skip
                await self.reply_topics.refresh(force=True)
                for step in steps:
                    await self._isolate(step)
        except Exception as error:
            self.on_failure(busy, error)
            await self._renew_producer()

    async def _collect(self, busy: list[Partition], now: int) -> list[Step]:
        """Each busy partition's step: its queued records (all partitions together within `max_batch` and
        `max_batch_bytes`, taken in a rotating order so that none starves) and its due timeouts. Every record
        is taken before the first wait."""
        if not busy:
            return []
        start = self._rotation % len(busy)
        self._rotation += 1
        count, size = self.max_batch, self.max_batch_bytes
        steps: list[Step] = []
        misses = self.reply_topics.misses
        label = f"{self._incarnation}.{next(self._cycles)}"
        budgets: list[tuple[int, int]] = []
        for partition in busy[start:] + busy[:start]:
            records = partition.take(count, size) if count > 0 and size > 0 else []
            count -= len(records)
            size -= sum(len(record.value or b"") for record in records)
            # Due timeouts share the budget: a backlog of them after downtime must not make one transaction
            # too large to commit in time, again and again.
            timers, timer_bytes = min(DUE_PER_STEP, max(count, 0)), max(size, 1)
            budgets.append((timers, timer_bytes))
            steps.append(
                partition.step(
                    records, now, self.reply_topics, timers=timers, timer_bytes=timer_bytes, transaction=label
                )
            )
            count -= len(steps[-1].due)
        if self.reply_topics.misses != misses:  # a topic not known yet: learn it (or that it is missing), recompute
            await self.reply_topics.settle()
            steps = [
                step.partition.step(
                    step.records, now, self.reply_topics, timers=timers, timer_bytes=timer_bytes, transaction=label
                )
                for step, (timers, timer_bytes) in zip(steps, budgets, strict=True)
            ]
        return [step for step in steps if not step.empty]

    async def _isolate(self, step: Step) -> None:
        """Replay one partition's share a command at a time; a command whose output Kafka refuses is refused
        in turn (then, if even that is refused, passed over with its offset committed: never retried).
        Notifications come first: one Kafka refuses goes to the DLQ, so a completion never waits on a
        subscriber's topic (an active timeout has no command to refuse)."""
        partition, now = step.partition, step.now
        if step.due or not step.records:
            await self._commit_sparing_completions(partition, [], now, DUE_PER_STEP)
        for record in step.records:
            try:
                await self._commit_sparing_completions(partition, [record], now, 0)
                continue
            except SendsRefused as refused:
                reason = f"Kafka refused this command's output ({refused}): not applied"
            topics = self.reply_topics
            try:
                await self._commit([partition.step([record], now, topics, {record.offset: reason}, timers=0)])
            except SendsRefused as again:
                log.error("partition %d: offset %d passed over: even its refusal was refused (%s)",
                          partition.route.partition, record.offset, again)  # fmt: skip
                await self._commit([partition.step([record], now, topics, {record.offset: None}, timers=0)])

    async def _commit_sparing_completions(
        self, partition: Partition, records: list[Incoming], now: int, timers: int
    ) -> None:
        """Commit a step; if Kafka refuses a topic the step's notifications go to, once more with those topics
        seen as gone, so that the notifications go to the DLQ and the completions that sent them commit."""
        step = partition.step(records, now, self.reply_topics, timers=timers)
        try:
            await self._commit([step])
        except SendsRefused as refused:
            topics = {topic for topic, _ in refused.slots}
            if not any(message.topic in topics and is_notification(message) for message in step.effects.messages):
                raise
            await self._commit([partition.step(records, now, Without(self.reply_topics, topics), timers=timers)])

    async def _commit(self, steps: list[Step]) -> None:
        """Publish the steps in one transaction, then persist each partition's share."""
        steps = [step for step in steps if not step.empty]
        if not steps:
            return
        messages = [message for step in steps for message in step.effects.messages]
        offsets = {step.partition.source: step.next_offset for step in steps}
        published = await self.publish(messages, offsets)
        for step in steps:
            partition = step.partition
            assert partition.store is not None
            own = (partition.changelog.topic, partition.changelog.partition)
            ends = [metadata.offset + batch.record_count() for slot, batch, metadata in published if slot == own]
            partition.persist(step, max([partition.store.changelog_offset, *ends]))

    async def publish(
        self, messages: list[Outgoing], offsets: Mapping[TopicPartition, int]
    ) -> list[tuple[Slot, BatchBuilder, RecordMetadata]]:
        """One transaction: every message, then the offsets, then the commit; all or nothing (I3, I4)."""
        group = self.group
        assert group is not None, "no assignment to commit under"
        if self.producer is None:
            self.producer = await self._new_producer()
        producer = self.producer
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                await producer.begin_transaction()
                batches = batched(producer, messages, self.reply_topics.limits())
                futures = [await producer.send_batch(batch, topic, partition=partition)
                           for (topic, partition), batch in batches]  # fmt: skip
                outcomes = await asyncio.gather(*futures, return_exceptions=True)
                refused_sends(batches, outcomes)
                await send_offsets(producer, offsets, group)
                await producer.commit_transaction()
        except BaseException:
            self.producer = None  # never reused after a failure: its next commit could carry aborted records
            await discard(producer)
            raise
        self.transactions += 1
        return [(slot, batch, metadata) for (slot, batch), metadata in zip(batches, outcomes, strict=True)
                if isinstance(metadata, RecordMetadata)]  # fmt: skip

    async def _new_producer(self) -> AIOKafkaProducer:
        producer = transactional_producer(self.kafka, self.transactional_id)
        try:
            await producer.start()
        except BaseException:
            await discard(producer)
            raise
        return producer

    async def _renew_producer(self) -> None:
        """A fresh producer at once after a failure: its start aborts the failed transaction if it is still
        open, so that the reopening partitions' wait (I5) is short. If no broker answers, the next cycle
        tries again."""
        if self.producer is not None:
            return
        try:
            self.producer = await self._new_producer()
        except Exception as error:
            log.debug("no new producer yet (%s); the next transaction will try again", error)


def refused_sends(batches: list[tuple[Slot, BatchBuilder]], outcomes: list[RecordMetadata | BaseException]) -> None:
    """Raise the first failure that is not the record's own fault, else `SendsRefused` for those that are."""
    failures = [(slot, outcome) for (slot, _), outcome in zip(batches, outcomes, strict=True)
                if isinstance(outcome, BaseException)]  # fmt: skip
    for _, error in failures:
        if classify(error, from_send=True) is not Failure.POISON:
            raise error
    if failures:
        raise SendsRefused(dict(failures))


def batched(
    producer: AIOKafkaProducer, messages: list[Outgoing], limits: Mapping[str, int] | None = None
) -> list[tuple[Slot, BatchBuilder]]:
    """Messages packed into record batches per topic partition, in order: one future per batch, not per
    record. A batch never outgrows its topic's `limits` (max.message.bytes), so a topic with a small
    limit gets more, smaller batches rather than a refusal."""
    open_batches: dict[Slot, tuple[BatchBuilder, int]] = {}
    out: list[tuple[Slot, BatchBuilder]] = []
    for message in messages:
        slot = (message.topic, message.partition)
        size = record_bytes(message)
        batch, used = open_batches.get(slot, (None, 0))
        limit = limits.get(message.topic) if limits else None
        fits = batch is not None and (limit is None or used + size <= limit)
        if not fits or batch is None or batch.append(key=message.key, value=message.value, timestamp=None,
                                                     headers=message.headers) is None:  # fmt: skip
            batch, used = producer.create_batch(), 0
            batch.append(key=message.key, value=message.value, timestamp=None, headers=message.headers)
            out.append((slot, batch))
        open_batches[slot] = (batch, used + size)
    return out
