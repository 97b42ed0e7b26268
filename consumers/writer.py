"""The single writer of one partition: a transactional producer, a RocksDB store, and the batch cycle.

Per batch: compute the effects (pure), publish them with the consumer offset in one Kafka
transaction, and only after the commit succeeded write the changes to RocksDB in one WriteBatch.
RocksDB is therefore never ahead of Kafka; if the process dies in between, the next owner replays
the changelog from the store's offset and catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import aiokafka.producer.sender
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.structs import RecordMetadata

from consumers.effects import Effects, Incoming, Outgoing, Route, apply_batch
from consumers.reply_topics import ReplyTopics
from consumers.restore import restore
from consumers.store import PROGRESS_KEY, PartitionStore, progress_record
from dp.kafka import transactional_producer
from dp.settings import Kafka

log = logging.getLogger("dp.processor")

DUE_PER_BATCH = 5_000
# Fetched records a writer may hold before its partition's fetching pauses, in batches.
QUEUE_BATCHES = 4

# A transaction begun right after a commit is refused with CONCURRENT_TRANSACTIONS until the broker
# has written the previous commit's markers (KAFKA-5477); aiokafka then waits a fixed 20 ms before
# retrying, which would add 20 ms to every batch. The markers take a millisecond or two here.
aiokafka.producer.sender.BACKOFF_OVERRIDE = 0.002


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def transactional_id(group: str, topic: str, partition: int) -> str:
    """Stable per input partition, so that a new owner's producer fences the previous owner's."""
    return f"{group}-{topic}-{partition}"


class PartitionWriter:
    """Owns one command partition: only this object writes its store and uses its transactional id.

    It runs as its own task (`run`), so partitions never wait for each other: the processor's fetch
    loop only `offer`s records, and each writer commits its batches at its own pace, pausing its
    partition's fetching when it falls behind.
    """

    def __init__(self, kafka: Kafka, group: str, route: Route, data_dir: Path, max_batch: int) -> None:
        self.kafka = kafka
        self.group = group
        self.route = route
        self.max_batch = max_batch
        self.source = TopicPartition(route.topics.commands, route.partition)
        self.store_path = data_dir / group / f"partition-{route.partition}"
        self.producer: AIOKafkaProducer | None = None
        self.store: PartitionStore | None = None
        self.next_offset = 0
        self.next_deadline: int | None = None
        self.restored = 0
        self.accepting = False
        self._queue: list[Incoming] = []
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
                records, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                await self.run_batch(records, now_ms(), reply_topics)
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
        self._work.set()
        if len(self._queue) > QUEUE_BATCHES * self.max_batch:
            consumer.pause(self.source)

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
        """Fence any previous owner, catch the store up from the changelog, seek to the committed offset."""
        self.producer = transactional_producer(
            self.kafka, transactional_id(self.group, self.source.topic, self.source.partition)
        )
        await self.producer.start()
        self.store = await asyncio.to_thread(PartitionStore, self.store_path)
        changelog = TopicPartition(self.route.topics.changelog, self.route.partition)
        self.restored = await restore(self.kafka, changelog, self.store)
        # The larger of the two: Kafka can lose a transaction's consumer-offset commit on a broker crash
        # (markers skipped for a __consumer_offsets partition with no known leader yet), while the
        # changelog's progress record of that same transaction survives.
        committed = await consumer.committed(self.source)
        self.next_offset = max(committed or 0, self.store.command_offset)
        consumer.seek(self.source, self.next_offset)
        self.next_deadline = self.store.next_deadline()

    async def close(self) -> None:
        producer, store = self.producer, self.store
        self.producer = self.store = None
        if producer is not None:
            await producer.stop()
        if store is not None:
            store.close()

    def due(self, now: int) -> bool:
        return self.next_deadline is not None and self.next_deadline <= now

    async def run_batch(self, records: list[Incoming], now: int, reply_topics: ReplyTopics) -> None:
        """Apply one batch exactly once: Kafka transaction first, then RocksDB."""
        assert self.store is not None and self.producer is not None, "writer is not open"
        fresh = [record for record in records if record.offset >= self.next_offset]
        due = self.store.due(now, DUE_PER_BATCH) if self.due(now) else []
        if not fresh and not due:
            self.next_deadline = self.store.next_deadline()
            return
        effects = apply_batch(self.route, self.store.get, fresh, due, now, reply_topics)
        if reply_topics.missed and await reply_topics.refresh():
            effects = apply_batch(self.route, self.store.get, fresh, due, now, reply_topics)
        next_offset = fresh[-1].offset + 1 if fresh else None
        if next_offset is not None:
            progress = Outgoing(
                self.route.topics.changelog, self.route.partition, PROGRESS_KEY, progress_record(next_offset)
            )
            effects.messages.append(progress)
        changelog_end = await self.publish(effects, next_offset)
        self.store.write(effects.persist, changelog_end, next_offset)
        if next_offset is not None:
            self.next_offset = next_offset
        self.next_deadline = self.store.next_deadline()

    async def publish(self, effects: Effects, next_offset: int | None) -> int:
        """One transaction: every message plus the consumer offset. Returns the changelog's next offset."""
        assert self.producer is not None and self.store is not None
        producer = self.producer
        await producer.begin_transaction()
        futures: list[asyncio.Future[RecordMetadata]] = []
        batches = batched(producer, effects.messages)
        try:
            for (topic, partition), batch in batches:
                futures.append(await producer.send_batch(batch, topic, partition=partition))
            if next_offset is not None:
                await producer.send_offsets_to_transaction({self.source: next_offset}, self.group)
            await producer.commit_transaction()
        except BaseException:
            for future in futures:
                future.add_done_callback(retrieve)
            await abort_quietly(producer)
            raise
        end = self.store.changelog_offset
        for ((topic, _), batch), future in zip(batches, futures, strict=True):
            if topic == self.route.topics.changelog:
                end = max(end, (await future).offset + batch.record_count())
        return end


def batched(producer: AIOKafkaProducer, messages: list[Outgoing]) -> list[tuple[tuple[str, int], BatchBuilder]]:
    """Messages packed into record batches per topic partition, in order: one future per batch, not per record."""
    open_batches: dict[tuple[str, int], BatchBuilder] = {}
    out: list[tuple[tuple[str, int], BatchBuilder]] = []
    for message in messages:
        slot = (message.topic, message.partition)
        batch = open_batches.get(slot)
        if batch is None or batch.append(key=message.key, value=message.value, timestamp=None,
                                         headers=message.headers) is None:  # fmt: skip
            batch = open_batches[slot] = producer.create_batch()
            batch.append(key=message.key, value=message.value, timestamp=None, headers=message.headers)
            out.append((slot, batch))
    return out


def retrieve(future: asyncio.Future[RecordMetadata]) -> None:
    """The transaction's error is what we report; its sends' own failures are the same story."""
    if not future.cancelled():
        future.exception()


async def abort_quietly(producer: AIOKafkaProducer) -> None:
    """Abort after a failure; if even that fails, the next owner's fencing aborts the transaction."""
    with contextlib.suppress(Exception):
        await producer.abort_transaction()
