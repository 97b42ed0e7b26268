"""`dp serve`: the partition processor. One consumer group member, one committer, a store per partition.

The fetch loop hands each open partition's records to it (`consumers/partition.py`) and wakes the
committer (`consumers/committer.py`), which commits the work of every partition in one transaction
per cycle. A newly assigned partition stays paused while it opens (I5's wait, restore, seek); a
revocation first lets the transaction in flight end. A failed transaction's partitions are reopened
from Kafka's truth after a backoff that depends on what failed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Iterable, Mapping

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import InvalidProducerEpoch, ProducerFenced
from aiokafka.structs import ConsumerRecord

from consumers.committer import PUBLISH_TIMEOUT_S, Committer
from consumers.effects import Route
from consumers.failures import Failure, classify
from consumers.kip447 import assignment_of, request_rejoin
from consumers.partition import Partition
from consumers.reply_topics import ReplyTopics
from consumers.store import DataDir
from dp.errors import BrokerUnreachable
from dp.kafka import DISCARD_S, command_consumer
from dp.settings import ProcessorSettings
from dp.topics import check_configs, check_topics

log = logging.getLogger("dp.processor")

IDLE_POLL_MS = 100
RETRY_BACKOFF_S = (0.5, 1, 2, 5, 10)
# How long a partition waits after a failure before it opens again. When the group refused our offsets,
# a rebalance is on its way and will revoke the partition, or give it back: wait for it rather than
# spin. A fatal failure retries rarely, and loudly.
REOPEN_S = {Failure.FENCED: 15.0, Failure.RETRIABLE: 0.5, Failure.POISON: 0.5, Failure.FATAL: 30.0}
# The transaction in flight gets this long to end when its partitions are revoked or the process stops:
# a publish abandoned at its bound, then its producer discarded at its bound.
HOLD_S = PUBLISH_TIMEOUT_S + DISCARD_S + 2


class Processor(ConsumerRebalanceListener):  # type: ignore[misc]
    """The fetch loop, the supervisor of this process's partitions, and the listener of the group."""

    def __init__(self, settings: ProcessorSettings) -> None:
        self.settings = settings
        self.consumer: AIOKafkaConsumer | None = None
        self.committer: Committer | None = None
        topics = settings.topics
        # The topics every transaction writes, described from the start so that their batches respect their limits.
        self.reply_topics = ReplyTopics(
            settings.kafka, always=(topics.replies, topics.dlq, topics.events, topics.changelog, topics.notifications)
        )
        self.partition_count = 0
        self.data_dir: DataDir | None = None
        self.partitions: dict[TopicPartition, Partition] = {}
        """Every assigned partition: open, opening, or waiting to open again."""
        self.opening: dict[TopicPartition, asyncio.Task[None]] = {}
        self.waiting: dict[TopicPartition, float] = {}
        self.stopping = asyncio.Event()

    # --- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until `stop()` (SIGTERM/SIGINT): end the transaction in flight, close stores, return."""
        self.partition_count = await self.wait_for_topics()
        self.data_dir = DataDir(self.settings.data_dir, self.settings.group, self.settings.block_cache_mb << 20)
        settings = self.settings
        committer_task: asyncio.Task[None] | None = None
        try:
            await self.reply_topics.start()
            self.committer = Committer(
                settings.kafka, self.data_dir, self.reply_topics, settings.max_batch, settings.max_batch_bytes,
                on_failure=self.failed,
            )  # fmt: skip
            committer_task = asyncio.create_task(self.committer.run())
            self.consumer = command_consumer(settings.kafka, settings.group)
            self.consumer.subscribe([settings.topics.commands], listener=self)
            await self.consumer.start()
            log.info("serving group %r on %s (%d partitions, transactional id %r)", settings.group,
                     settings.kafka.bootstrap_servers, self.partition_count,
                     self.data_dir.transactional_id)  # fmt: skip
            while not self.stopping.is_set():
                self.supervise(committer_task)
                batches = await self.consumer.getmany(timeout_ms=IDLE_POLL_MS, max_records=settings.max_batch)
                self.dispatch(batches)
        finally:
            if self.committer is not None:
                await self.committer.hold(HOLD_S)
            await self.close(list(self.partitions))
            if committer_task is not None:
                committer_task.cancel()
                await asyncio.gather(committer_task, return_exceptions=True)
            if self.committer is not None:
                await self.committer.close()
            if self.consumer is not None:
                await self.consumer.stop()
            await self.reply_topics.close()
            self.data_dir.release()
            transactions = self.committer.transactions if self.committer is not None else 0
            log.info("stopped after %d transactions", transactions)

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
        """The transaction in flight ends before the process rejoins (I2); then the partitions close."""
        if self.committer is not None:
            await self.committer.hold(HOLD_S)
            self.committer.group = None
        await self.close(list(revoked))
        if self.committer is not None:
            self.committer.resume()

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        """Capture the generation the transactions will carry (I2), and open the new partitions."""
        assert self.consumer is not None and self.committer is not None
        assigned = set(assigned)
        await self.close([tp for tp in self.partitions if tp not in assigned])  # left by a revocation that failed
        try:
            self.committer.group = assignment_of(self.consumer, self.settings.group)
        except ValueError as error:  # the membership was lost between the join and this call
            log.error("%s Rejoining the group.", error)
            request_rejoin(self.consumer)
            return
        self.committer.resume()
        fresh = [tp for tp in assigned if tp not in self.partitions]
        self.consumer.pause(*fresh)
        for tp in fresh:
            self.partitions[tp] = self.new_partition(tp)
            self.waiting[tp] = 0.0

    async def close(self, tps: list[TopicPartition]) -> None:
        """Close partitions (the committer is held, or has no transaction of theirs in flight)."""
        for tp in tps:
            self.waiting.pop(tp, None)
            task = self.opening.pop(tp, None)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            if self.committer is not None:
                self.committer.release(tp)
            partition = self.partitions.pop(tp, None)
            if partition is None:
                continue
            try:
                partition.close()
            except Exception:  # the others must close all the same: a partition left open could be written twice
                log.exception("partition %d: its store did not close cleanly", tp.partition)
            log.info("partition %d: closed", tp.partition)

    # --- supervision ------------------------------------------------------------------------

    def new_partition(self, tp: TopicPartition) -> Partition:
        settings = self.settings
        assert self.data_dir is not None
        route = Route(
            tp.partition,
            self.partition_count,
            settings.topics,
            settings.limits,
            settings.reply_prefixes,
            settings.retention_ms,
        )
        return Partition(settings.kafka, self.data_dir, route, settings.max_batch, settings.max_batch_bytes)

    def dispatch(self, batches: Mapping[TopicPartition, list[ConsumerRecord]]) -> None:
        """Hand fetched records to their open partitions and wake the committer; records of a partition that
        is not open are dropped (it is paused, and it seeks to the committed offset when it opens)."""
        assert self.consumer is not None and self.committer is not None
        open_partitions = self.committer.partitions
        for tp, records in batches.items():
            partition = open_partitions.get(tp)
            if partition is not None:
                partition.offer(records, self.consumer)
        if batches:
            self.committer.wake()

    def supervise(self, committer_task: asyncio.Task[None]) -> None:
        """Adopt partitions that opened, retry those that failed to, and open those whose time has come."""
        assert self.consumer is not None and self.committer is not None
        if committer_task.done():
            raise RuntimeError("the committer stopped") from committer_task.exception()
        for tp, task in list(self.opening.items()):
            if not task.done():
                continue
            del self.opening[tp]
            partition = self.partitions[tp]
            if (error := task.exception()) is not None:
                self.failed([partition], error)
                continue
            log.info("partition %d: open (restored %d records in %.2fs, commands from offset %d)",
                     tp.partition, partition.restored, partition.open_seconds, partition.next_offset)  # fmt: skip
            self.committer.adopt(partition)
            self.consumer.resume(tp)
        now = time.monotonic()
        for tp, not_before in list(self.waiting.items()):
            if now >= not_before:
                del self.waiting[tp]
                self.opening[tp] = asyncio.create_task(self.partitions[tp].open(self.consumer))

    def failed(self, partitions: list[Partition], error: BaseException) -> None:
        """A transaction (or an opening) failed: nothing of it reached the stores. Reopen its partitions from
        Kafka's truth after the failure's backoff; if the group refused the offsets, a rebalance is coming."""
        assert self.consumer is not None and self.committer is not None
        failure = classify(error)
        self.reply_topics.expire()
        numbers = sorted(partition.route.partition for partition in partitions)
        delay = REOPEN_S[failure]
        if failure is Failure.FATAL:
            log.error("partitions %s: %s; reopening in %.0fs", numbers, failure.value, delay, exc_info=error)
        elif isinstance(error, ProducerFenced | InvalidProducerEpoch):
            log.warning("partitions %s: the producer was fenced: its transaction outlived the transaction timeout, "
                        "or another processor uses this data dir's transactional id (a copied data dir?); "
                        "reopening in %.1fs", numbers, delay)  # fmt: skip
        else:
            log.warning(
                "partitions %s: %s (%s); reopening in %.1fs", numbers, failure.value, str(error) or repr(error), delay
            )
        for partition in partitions:
            tp = partition.source
            self.committer.release(tp)
            if tp in self.partitions:
                self.consumer.pause(tp)
                self.waiting[tp] = time.monotonic() + delay


async def serve(settings: ProcessorSettings) -> None:
    """Run a processor until SIGTERM or SIGINT."""
    processor = Processor(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, processor.stop)
    await processor.run()
