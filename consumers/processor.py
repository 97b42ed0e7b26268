"""`dp serve`: the partition processor. One consumer group member; one single writer per owned partition.

The fetch loop hands each owned partition's records to that partition's writer, which runs as its
own task (`consumers/writer.py`): partitions commit independently and fire their own timeouts. A
newly assigned partition stays paused until its writer has fenced the previous owner, restored its
store and sought to the committed offset; a revoked one first lets its writer finish the batch in
flight. A writer that fails is replaced by a fresh one that starts again from Kafka's truth.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Iterable, Mapping

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord

from consumers.effects import Route
from consumers.failures import Failure, classify
from consumers.reply_topics import ReplyTopics
from consumers.writer import PartitionWriter
from dp.errors import BrokerUnreachable
from dp.kafka import command_consumer
from dp.settings import ProcessorSettings
from dp.topics import check_configs, check_topics

log = logging.getLogger("dp.processor")

IDLE_POLL_MS = 100
RETRY_BACKOFF_S = (0.5, 1, 2, 5, 10)
# How long a failed writer's partition waits before a fresh writer opens it. After being fenced, only
# if no rebalance took the partition away within a session timeout: then the group still says it is
# ours and whoever fenced us was the stale one. A fatal failure retries rarely, and loudly.
REOPEN_S = {Failure.FENCED: 15.0, Failure.RETRIABLE: 0.5, Failure.POISON: 0.5, Failure.FATAL: 30.0}
# A revoked or stopping writer gets this long to finish its batch before it is abandoned.
STOP_WRITER_S = 20.0


class Processor(ConsumerRebalanceListener):  # type: ignore[misc]
    """The fetch loop and the supervisor of this process's partition writers."""

    def __init__(self, settings: ProcessorSettings) -> None:
        self.settings = settings
        self.consumer: AIOKafkaConsumer | None = None
        topics = settings.topics
        # The topics every batch writes, described from the start so that their batches respect their limits.
        self.reply_topics = ReplyTopics(
            settings.kafka, always=(topics.replies, topics.dlq, topics.events, topics.changelog)
        )
        self.partitions = 0
        self.writers: dict[TopicPartition, PartitionWriter] = {}
        self.tasks: dict[TopicPartition, asyncio.Task[None]] = {}
        self.waiting: dict[TopicPartition, float] = {}
        self.stopping = asyncio.Event()

    # --- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until `stop()` (SIGTERM/SIGINT): finish the batches in flight, close stores, return."""
        self.partitions = await self.wait_for_topics()
        await self.reply_topics.start()
        self.consumer = command_consumer(self.settings.kafka, self.settings.group)
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
                self.supervise()
                batches = await self.consumer.getmany(timeout_ms=IDLE_POLL_MS, max_records=self.settings.max_batch)
                self.dispatch(batches)
        finally:
            await self.consumer.stop()
            for tp in list(self.writers):
                await self.stop_writer(tp)
            await self.reply_topics.close()
            log.info("stopped")

    def stop(self) -> None:
        self.stopping.set()

    async def wait_for_topics(self) -> int:
        """The partition count; retries while no broker answers, gives up on missing or odd topics."""
        delays = iter(RETRY_BACKOFF_S)
        while True:
            try:
                partitions = await check_topics(self.settings.kafka, self.settings.topics)
                await check_configs(self.settings.kafka, self.settings.topics)
                return partitions
            except BrokerUnreachable as error:
                delay = next(delays, RETRY_BACKOFF_S[-1])
                log.warning("%s Retrying in %.1fs.", error, delay)
                try:
                    await asyncio.wait_for(self.stopping.wait(), delay)
                except TimeoutError:
                    continue
                raise  # stopped before a broker answered

    # --- rebalancing (called by aiokafka's coordinator) -------------------------------------

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        for tp in revoked:
            self.waiting.pop(tp, None)
            await self.stop_writer(tp)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        assert self.consumer is not None
        fresh = [tp for tp in assigned if tp not in self.writers]
        self.consumer.pause(*fresh)
        for tp in fresh:
            self.waiting[tp] = 0.0

    # --- supervision ------------------------------------------------------------------------

    def dispatch(self, batches: Mapping[TopicPartition, list[ConsumerRecord]]) -> None:
        """Hand fetched records to their writers; records of a partition without an open writer are
        dropped (it is paused, and its writer seeks to the committed offset when it opens)."""
        assert self.consumer is not None
        for tp, records in batches.items():
            writer = self.writers.get(tp)
            if writer is not None and writer.accepting:
                writer.offer(records, self.consumer)

    def supervise(self) -> None:
        """Replace writers that failed, and start writers for assigned partitions whose time has come."""
        assert self.consumer is not None
        for tp, task in list(self.tasks.items()):
            if task.done():
                self.reap(tp, task)
        now = time.monotonic()
        for tp, not_before in list(self.waiting.items()):
            if now >= not_before:
                del self.waiting[tp]
                self.start_writer(tp)

    def start_writer(self, tp: TopicPartition) -> None:
        assert self.consumer is not None
        settings = self.settings
        route = Route(tp.partition, self.partitions, settings.topics, settings.limits, settings.reply_prefixes)
        writer = PartitionWriter(
            settings.kafka, settings.group, route, settings.data_dir, settings.max_batch, settings.max_batch_bytes
        )
        self.writers[tp] = writer
        self.tasks[tp] = asyncio.create_task(writer.run(self.consumer, self.reply_topics))

    def reap(self, tp: TopicPartition, task: asyncio.Task[None]) -> None:
        """A writer ended on an error: its batch did not commit. Reopen it from Kafka's truth, unless
        it was fenced: then another process owns the partition now, and we wait for the rebalance
        that revokes it rather than fence the new owner back."""
        assert self.consumer is not None
        del self.tasks[tp], self.writers[tp]
        error = task.exception()
        self.consumer.pause(tp)
        log.info("partition %d: closed", tp.partition)
        assert error is not None, "a writer ends on its own only by failing"
        failure = classify(error)
        self.reply_topics.expire()
        if failure is Failure.FENCED:
            log.warning("partition %d: fenced by a newer owner; waiting for the rebalance", tp.partition)
        elif failure is Failure.FATAL:
            log.error("partition %d: writer failed (%s); reopening in %.0fs", tp.partition, failure.value,
                      REOPEN_S[failure], exc_info=error)  # fmt: skip
        else:
            log.warning("partition %d: writer failed (%s: %s); reopening", tp.partition, failure.value, error)
        self.waiting[tp] = time.monotonic() + REOPEN_S[failure]

    async def stop_writer(self, tp: TopicPartition) -> None:
        """Let the writer finish its batch in flight, then close it; a writer stuck past STOP_WRITER_S is
        abandoned (cancelled: its transaction never commits, and the next owner's fencing aborts it)."""
        writer, task = self.writers.pop(tp, None), self.tasks.pop(tp, None)
        if writer is None or task is None:
            return
        writer.stop()
        _, pending = await asyncio.wait([task], timeout=STOP_WRITER_S)
        if pending:
            log.warning("partition %d: writer did not finish within %.0fs; abandoning it", tp.partition, STOP_WRITER_S)
            task.cancel()
            await asyncio.wait([task], timeout=STOP_WRITER_S)
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: the writer is gone either way
        log.info("partition %d: closed", tp.partition)


async def serve(settings: ProcessorSettings) -> None:
    """Run a processor until SIGTERM or SIGINT."""
    processor = Processor(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, processor.stop)
    await processor.run()
