"""`dp serve`: the partition processor. One consumer group member; one single writer per owned partition.

The main loop fetches commands for every owned partition, runs each partition's batch through its
writer (all partitions concurrently, each in its own transaction), and fires active timeouts when
they fall due. Rebalancing only marks partitions: a newly assigned partition stays paused until
its writer has fenced the previous owner, restored its store and sought to the committed offset;
a revoked one waits for the batch in flight (the `work` lock) before its writer closes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError, ProducerFenced

from consumers.effects import Incoming, Route
from consumers.reply_topics import ReplyTopics
from consumers.writer import PartitionWriter, now_ms
from dp.config import Kafka, Topics
from dp.errors import BrokerUnreachable
from dp.topics import check_topics
from dp.wire import DEFAULT_LIMITS, Limits

log = logging.getLogger("dp.processor")

IDLE_POLL_MS = 100
RETRY_BACKOFF_S = (0.5, 1, 2, 5, 10)
# After being fenced, reopen only if no rebalance took the partition away within a session timeout:
# then the group still says it is ours and whoever fenced us was the stale one.
FENCED_WAIT_S = 15.0


@dataclass(frozen=True)
class ProcessorSettings:
    kafka: Kafka = field(default_factory=Kafka)
    topics: Topics = field(default_factory=Topics.from_env)
    group: str = "dp"
    data_dir: Path = Path("data")
    max_batch: int = 2_000
    limits: Limits = DEFAULT_LIMITS


class Processor(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, settings: ProcessorSettings) -> None:
        self.settings = settings
        self.consumer: AIOKafkaConsumer | None = None
        self.reply_topics = ReplyTopics(settings.kafka)
        self.partitions = 0
        self.writers: dict[TopicPartition, PartitionWriter] = {}
        self.waiting: dict[TopicPartition, float] = {}
        self.work = asyncio.Lock()
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()

    # --- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until `stop()` (SIGTERM/SIGINT): finish the batch in flight, close stores, return."""
        self.partitions = await self.wait_for_topics()
        await self.reply_topics.start()
        self.consumer = AIOKafkaConsumer(
            **self.settings.kafka.client_options(),
            group_id=self.settings.group,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            max_poll_interval_ms=300_000,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
            fetch_max_wait_ms=50,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        self.consumer.subscribe([self.settings.topics.commands], listener=self)
        await self.consumer.start()
        log.info(
            "serving group %r on %s (%d partitions)",
            self.settings.group,
            self.settings.kafka.bootstrap_servers,
            self.partitions,
        )
        try:
            while not self.stopping.is_set():
                await self.open_waiting()
                batches = await self.consumer.getmany(
                    timeout_ms=self.poll_timeout(), max_records=self.settings.max_batch
                )
                await self.run_batches(batches)
        finally:
            await self.consumer.stop()
            await self.close_writers(list(self.writers))
            await self.reply_topics.close()
            log.info("stopped")

    def stop(self) -> None:
        self.stopping.set()

    async def wait_for_topics(self) -> int:
        """The partition count; retries while no broker answers, gives up on missing or odd topics."""
        for attempt in range(1_000_000):
            try:
                return await check_topics(self.settings.kafka, self.settings.topics)
            except BrokerUnreachable as error:
                delay = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
                log.warning("%s Retrying in %.1fs.", error, delay)
                try:
                    await asyncio.wait_for(self.stopping.wait(), delay)
                except TimeoutError:
                    continue
                raise
        raise AssertionError("unreachable")

    # --- rebalancing (called by aiokafka's coordinator) -------------------------------------

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        async with self.work:
            for tp in revoked:
                self.waiting.pop(tp, None)
            await self.close_writers([tp for tp in revoked if tp in self.writers])

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        assert self.consumer is not None
        fresh = [tp for tp in assigned if tp not in self.writers]
        self.consumer.pause(*fresh)
        for tp in fresh:
            self.waiting[tp] = 0.0
        self.ready.clear()

    # --- the loop ---------------------------------------------------------------------------

    async def open_waiting(self) -> None:
        """Open writers for assigned partitions (fencing, restore, seek), then let them fetch."""
        if not self.waiting:
            return
        assert self.consumer is not None
        async with self.work:
            for tp, not_before in list(self.waiting.items()):
                if time.monotonic() < not_before:
                    continue
                writer = PartitionWriter(
                    self.settings.kafka, self.settings.group, self.route(tp.partition), self.settings.data_dir
                )
                try:
                    began = time.monotonic()
                    await writer.open(self.consumer)
                except (KafkaError, OSError) as error:
                    await writer.close()
                    self.waiting[tp] = time.monotonic() + RETRY_BACKOFF_S[1]
                    log.warning("partition %d: could not open (%s); retrying", tp.partition, error)
                    continue
                del self.waiting[tp]
                self.writers[tp] = writer
                self.consumer.resume(tp)
                log.info(
                    "partition %d: open (restored %d records in %.2fs, commands from offset %d)",
                    tp.partition,
                    writer.restored,
                    time.monotonic() - began,
                    writer.next_offset,
                )
            if not self.waiting:
                self.ready.set()

    def route(self, partition: int) -> Route:
        return Route(partition, self.partitions, self.settings.topics, self.settings.limits)

    def poll_timeout(self) -> int:
        deadlines = [w.next_deadline for w in self.writers.values() if w.next_deadline is not None]
        if not deadlines:
            return IDLE_POLL_MS
        return max(0, min(IDLE_POLL_MS, min(deadlines) - now_ms()))

    async def run_batches(self, batches: Mapping[TopicPartition, list]) -> None:  # type: ignore[type-arg]
        async with self.work:
            now = now_ms()
            jobs = {tp: writer for tp, writer in self.writers.items() if tp in batches or writer.due(now)}
            if not jobs:
                return
            results = await asyncio.gather(
                *(self.run_one(writer, incoming(batches.get(tp, ())), now) for tp, writer in jobs.items()),
                return_exceptions=True,
            )
            for (tp, writer), result in zip(jobs.items(), results, strict=True):
                if isinstance(result, BaseException):
                    await self.fail(tp, writer, result)

    async def run_one(self, writer: PartitionWriter, records: list[Incoming], now: int) -> None:
        await writer.run_batch(records, now, self.reply_topics)

    async def fail(self, tp: TopicPartition, writer: PartitionWriter, error: BaseException) -> None:
        """A batch did not commit: drop the writer's state and reopen it from Kafka's truth.

        Fenced means another process owns the partition now; we wait for the rebalance that
        revokes it rather than fence the new owner back.
        """
        assert self.consumer is not None
        await self.close_writers([tp])
        self.consumer.pause(tp)
        if isinstance(error, ProducerFenced):
            log.warning("partition %d: fenced by a newer owner; waiting for the rebalance", tp.partition)
            self.waiting[tp] = time.monotonic() + FENCED_WAIT_S
            return
        if not isinstance(error, KafkaError | KafkaConnectionError | OSError):
            log.error("partition %d: batch failed", tp.partition, exc_info=error)
        else:
            log.warning("partition %d: batch failed (%s); reopening", tp.partition, error)
        self.waiting[tp] = time.monotonic() + RETRY_BACKOFF_S[0]

    async def close_writers(self, tps: list[TopicPartition]) -> None:
        for tp in tps:
            writer = self.writers.pop(tp, None)
            if writer is not None:
                await writer.close()
                log.info("partition %d: closed", tp.partition)


def incoming(records: Iterable) -> list[Incoming]:  # type: ignore[type-arg]
    return [Incoming(record.offset, record.key, record.value) for record in records]


async def serve(settings: ProcessorSettings) -> None:
    """Run a processor until SIGTERM or SIGINT."""
    processor = Processor(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, processor.stop)
    await processor.run()
