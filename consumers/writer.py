"""The single writer of one partition: a transactional producer, a RocksDB store, and the batch cycle.

Per batch: compute the effects (pure), publish them with the consumer offset in one Kafka
transaction, and only after the commit succeeded write the changes to RocksDB in one WriteBatch.
RocksDB is therefore never ahead of Kafka; if the process dies in between, the next owner replays
the changelog from the store's offset and catches up.

A batch commits whole or not at all: every send is confirmed before the offsets and the commit, and
any failure aborts the transaction and discards its producer. When Kafka refuses a record for what
it carries (too large, a bad timestamp, a topic gone), the batch is replayed one command at a time
and the command behind the refusal is itself refused (`invalid`, with the reason, and a DLQ copy),
so a deterministic failure never becomes an endless retry. Nothing waits without bound: a publish
that has not committed after PUBLISH_TIMEOUT_S is abandoned, and the writer is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import aiokafka.producer.sender
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.structs import RecordMetadata

from consumers.effects import Effects, Incoming, Outgoing, Route, apply_batch, record_bytes
from consumers.failures import Failure, classify
from consumers.reply_topics import ReplyTopics
from consumers.restore import StoreAhead, restore
from consumers.store import PROGRESS_KEY, PartitionStore, progress_record
from dp.kafka import discard, transactional_producer
from dp.settings import Kafka
from dp.wire import Promise

log = logging.getLogger("dp.processor")

DUE_PER_BATCH: Final = 5_000
# Fetched records a writer may hold before its partition's fetching pauses, in batches (count and bytes).
QUEUE_BATCHES: Final = 4
# A transaction not committed by then is abandoned (its producer discarded, the writer replaced); well
# below the producer's transaction timeout, so the coordinator never aborts one the writer still awaits.
PUBLISH_TIMEOUT_S: Final = 45.0

# A transaction begun right after a commit is refused with CONCURRENT_TRANSACTIONS until the broker
# has written the previous commit's markers (KAFKA-5477); aiokafka then waits a fixed 20 ms before
# retrying, which would add 20 ms to every batch. The markers take a millisecond or two here.
aiokafka.producer.sender.BACKOFF_OVERRIDE = 0.002

Slot = tuple[str, int]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def transactional_id(group: str, topic: str, partition: int) -> str:
    """Stable per input partition, so that a new owner's producer fences the previous owner's."""
    return f"{group}-{topic}-{partition}"


class SendsRefused(Exception):
    """Kafka refused some of a transaction's record batches for what they carried (the transaction was
    aborted): `slots` maps each refused topic partition to the reason."""

    def __init__(self, slots: dict[Slot, BaseException]) -> None:
        super().__init__("; ".join(f"{topic}[{partition}]: {error!r}" for (topic, partition), error in slots.items()))
        self.slots = slots


class PartitionWriter:
    """Owns one command partition: only this object writes its store and uses its transactional id.

    It runs as its own task (`run`), so partitions never wait for each other: the processor's fetch
    loop only `offer`s records, and each writer commits its batches at its own pace, pausing its
    partition's fetching when it falls behind (by count or by bytes).
    """

    def __init__(
        self, kafka: Kafka, group: str, route: Route, data_dir: Path, max_batch: int, max_batch_bytes: int
    ) -> None:
        self.kafka = kafka
        self.group = group
        self.route = route
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.source = TopicPartition(route.topics.commands, route.partition)
        self.store_path = data_dir / group / f"partition-{route.partition}"
        self.producer: AIOKafkaProducer | None = None
        self.store: PartitionStore | None = None
        self.next_offset = 0
        self.next_deadline: int | None = None
        self.restored = 0
        self.accepting = False
        self._queue: list[Incoming] = []
        self._queued_bytes = 0
        self._work = asyncio.Event()
        self._stopping = False

    async def run(self, consumer: AIOKafkaConsumer, reply_topics: ReplyTopics) -> None:
        """Open, then apply batches until `stop`; an exception means the writer is done and must be replaced."""
        try:
            began = time.monotonic()
            await self.open(consumer)
            if self._stopping:
                return
            log.info("partition %d: open (restored %d records in %.2fs, commands from offset %d)",
                     self.route.partition, self.restored, time.monotonic() - began, self.next_offset)  # fmt: skip
            self.accepting = True
            consumer.resume(self.source)
            while not self._stopping:
                await self._wait_for_work()
                if self._stopping:
                    break
                await self.run_batch(self._take(), now_ms(), reply_topics)
                if self._queue:
                    self._work.set()
                elif self.source in consumer.paused():
                    consumer.resume(self.source)
        finally:
            self.accepting = False
            await self.close()

    def offer(self, records: list[Incoming], consumer: AIOKafkaConsumer) -> None:
        """Queue fetched records; past a few batches' worth, stop fetching this partition until drained."""
        self._queue.extend(records)
        self._queued_bytes += sum(len(record.value or b"") for record in records)
        self._work.set()
        if (
            len(self._queue) > QUEUE_BATCHES * self.max_batch
            or self._queued_bytes > QUEUE_BATCHES * self.max_batch_bytes
        ):
            consumer.pause(self.source)

    def _take(self) -> list[Incoming]:
        """The next batch: at most `max_batch` records and about `max_batch_bytes` (at least one record)."""
        size = count = 0
        for record in self._queue[: self.max_batch]:
            length = len(record.value or b"")
            if count and size + length > self.max_batch_bytes:
                break
            size, count = size + length, count + 1
        taken, self._queue = self._queue[:count], self._queue[count:]
        self._queued_bytes -= size
        return taken

    def stop(self) -> None:
        """Finish the batch in flight, then end `run`; queued records are left to the next owner."""
        self._stopping = True
        self._work.set()

    async def _wait_for_work(self) -> None:
        while not self._queue and not self._stopping:
            self._work.clear()
            if self.next_deadline is None:
                await self._work.wait()
                continue
            delay = (self.next_deadline - now_ms()) / 1000
            if delay <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._work.wait(), delay)

    async def open(self, consumer: AIOKafkaConsumer) -> None:
        """Fence any previous owner, catch the store up from the changelog, seek to the committed offset.

        A store ahead of the log (the topics were recreated, or the data dir is another deployment's)
        is wiped and restored from the changelog, loudly: trusting it would skip commands.
        """
        self.producer = await self._new_producer()
        self.store = await asyncio.to_thread(PartitionStore, self.store_path)
        changelog = TopicPartition(self.route.topics.changelog, self.route.partition)
        commands_end = (await consumer.end_offsets([self.source]))[self.source]
        try:
            if self.store.command_offset > commands_end:
                raise StoreAhead(
                    f"the store is at command offset {self.store.command_offset}, beyond the commands' end "
                    f"({commands_end})"
                )
            self.restored = await restore(self.kafka, changelog, self.store)
        except StoreAhead as ahead:
            log.error("partition %d: %s: the topics were recreated or the data dir belongs to another "
                      "deployment; wiping %s and restoring from the changelog", self.route.partition, ahead,
                      self.store_path)  # fmt: skip
            self.store = await asyncio.to_thread(self.store.wipe)
            self.restored = await restore(self.kafka, changelog, self.store)
        if self.store.skipped:
            log.warning("partition %d: skipped %d changelog records of kinds this version does not know",
                        self.route.partition, self.store.skipped)  # fmt: skip
        # The larger of the two: Kafka can lose a transaction's consumer-offset commit on a broker crash
        # (markers skipped for a __consumer_offsets partition with no known leader yet), while the
        # changelog's progress record of that same transaction survives.
        committed = await consumer.committed(self.source)
        self.next_offset = max(committed or 0, self.store.command_offset)
        consumer.seek(self.source, self.next_offset)
        self.next_deadline = self.store.next_deadline()

    async def _new_producer(self) -> AIOKafkaProducer:
        producer = transactional_producer(
            self.kafka, transactional_id(self.group, self.source.topic, self.source.partition)
        )
        await producer.start()
        return producer

    async def close(self) -> None:
        producer, store = self.producer, self.store
        self.producer = self.store = None
        if producer is not None:
            await discard(producer)
        if store is not None:
            store.close()

    def due(self, now: int) -> bool:
        return self.next_deadline is not None and self.next_deadline <= now

    async def run_batch(self, records: list[Incoming], now: int, reply_topics: ReplyTopics) -> None:
        """Apply one batch exactly once: Kafka transaction first, then RocksDB.

        If Kafka refuses records for what they carry, replay the batch a command at a time, so the
        refusal lands on the command that caused it and the others commit.
        """
        assert self.store is not None, "writer is not open"
        now = max(now, self.store.last_now)
        fresh = [record for record in records if record.offset >= self.next_offset]
        due = self.store.due(now, DUE_PER_BATCH, self.max_batch_bytes) if self.due(now) else []
        if not fresh and not due:
            self.next_deadline = self.store.next_deadline()
            return
        if reply_topics.stale:
            await reply_topics.refresh()
        try:
            await self._apply(fresh, due, now, reply_topics)
        except SendsRefused as refused:
            log.warning("partition %d: Kafka refused records of a batch (%s); applying its %d commands one "
                        "at a time", self.route.partition, refused, len(fresh))  # fmt: skip
            await reply_topics.refresh(force=True)
            await self._apply_singly(fresh, due, now, reply_topics)

    async def _apply_singly(
        self, records: list[Incoming], due: list[Promise], now: int, reply_topics: ReplyTopics
    ) -> None:
        """Each command its own transaction; one Kafka refuses is refused in turn (then, if even that is
        refused, passed over with its offset committed: never retried forever)."""
        if due or not records:
            await self._apply([], due, now, reply_topics)
        for record in records:
            try:
                await self._apply([record], [], now, reply_topics)
                continue
            except SendsRefused as refused:
                reason = f"Kafka refused this command's output ({refused}): not applied"
            try:
                await self._apply([record], [], now, reply_topics, {record.offset: reason})
            except SendsRefused as again:
                log.error("partition %d: offset %d passed over: even its refusal was refused (%s)",
                          self.route.partition, record.offset, again)  # fmt: skip
                await self._apply([record], [], now, reply_topics, {record.offset: None})

    async def _apply(
        self,
        records: list[Incoming],
        due: list[Promise],
        now: int,
        reply_topics: ReplyTopics,
        refusals: Mapping[int, str | None] | None = None,
    ) -> None:
        assert self.store is not None
        misses = reply_topics.misses
        effects = apply_batch(self.route, self.store.get, records, due, now, reply_topics, refusals)
        if reply_topics.misses != misses:  # a topic not known yet: learn it (or that it is missing), recompute
            await reply_topics.settle()
            effects = apply_batch(self.route, self.store.get, records, due, now, reply_topics, refusals)
        # Every transaction carries the partition's offset and a progress record, timer-only ones too (I1):
        # they re-commit the current offset, and record `now`, so a new owner's clock never runs back.
        next_offset = records[-1].offset + 1 if records else self.next_offset
        effects.messages.append(
            Outgoing(self.route.topics.changelog, self.route.partition, PROGRESS_KEY, progress_record(next_offset, now))
        )
        changelog_end = await self.publish(effects, next_offset, reply_topics.limits())
        self.store.write(effects.persist, changelog_end, next_offset, now)
        self.next_offset = next_offset
        self.next_deadline = self.store.next_deadline()

    async def publish(self, effects: Effects, next_offset: int, limits: Mapping[str, int]) -> int:
        """One transaction: every message plus the consumer offset, all or nothing. Returns the changelog's
        next offset, as far as this partition's own changelog records reach."""
        assert self.store is not None
        if self.producer is None:
            self.producer = await self._new_producer()
        producer = self.producer
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                await producer.begin_transaction()
                batches = batched(producer, effects.messages, limits)
                futures = [await producer.send_batch(batch, topic, partition=partition)
                           for (topic, partition), batch in batches]  # fmt: skip
                outcomes = await asyncio.gather(*futures, return_exceptions=True)
                refused_sends(batches, outcomes)
                await producer.send_offsets_to_transaction({self.source: next_offset}, self.group)
                await producer.commit_transaction()
        except BaseException:
            self.producer = None  # never reused after a failure: its next commit could carry aborted records
            await discard(producer)
            raise
        end = self.store.changelog_offset
        own = (self.route.topics.changelog, self.route.partition)
        for (slot, batch), metadata in zip(batches, outcomes, strict=True):
            if slot == own and isinstance(metadata, RecordMetadata):
                end = max(end, metadata.offset + batch.record_count())
        return end


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
