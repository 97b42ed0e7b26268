"""The benchmark's baseline: the processor's Kafka shape (group commit, KIP-447) with nothing of ours in it.

One consumer-group member and ONE transactional producer per process, as in the processor
(consumers/committer.py). A fetch task keeps fetching while a commit task commits; each transaction
takes what the owned partitions have queued, at most `--max-batch` commands of all partitions together
(starting with a different partition each time), and for them: per command one reply, one event and
one changelog record (copies of the command), one progress record per partition touched, then the
offsets of every touched partition (TxnOffsetCommit v3 with the group generation captured at
assignment) and the commit. The next transaction starts at once with whatever arrived meanwhile:
adaptive batching, no timer. A partition with more than a few batches queued pauses its fetching.
No decoding, no state machine, no RocksDB, no byte bounds, no error recovery (a failed transaction
ends the process): the limit of this design on Kafka + aiokafka on the machine, which `dp bench`
measures the processor against.

    python -m consumers.baseline --bootstrap-servers HOST:PORT --topic-prefix PREFIX --group G --max-batch N
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Final

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord

# The committer's record packing; importing it also sets its aiokafka tuning (CONCURRENT_TRANSACTIONS back-off).
from consumers.committer import batched, now_ms
from consumers.effects import Outgoing
from consumers.kip447 import GroupMetadata, assignment_of, send_offsets
from consumers.partition import QUEUE_BATCHES
from consumers.store import PROGRESS_KEY, progress_record
from dp.kafka import command_consumer, transactional_producer
from dp.settings import Kafka, ProcessorSettings, Topics, add_flags, from_flags

# How long an idle fetch waits for records; a fetch returns as soon as any arrive.
FETCH_WAIT_MS: Final = 50


class Pipe(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, kafka: Kafka, topics: Topics, group: str, max_batch: int) -> None:
        self.topics, self.group, self.max_batch = topics, group, max_batch
        self.consumer = command_consumer(kafka, group)
        # Stable, like the processor's: a restarted pipe fences its predecessor at once. One id per group,
        # so run one pipe per group (the benchmark does): a second one would fence the first.
        self.producer = transactional_producer(kafka, f"{group}-baseline")
        self.reply_partitions = 1
        # Generation and member id of the current assignment; None from revocation to the next assignment.
        self.assignment: GroupMetadata | None = None
        self.queued: dict[TopicPartition, list[ConsumerRecord]] = {}
        self.rotation = 0
        self.arrived = asyncio.Event()
        self.committing = asyncio.Lock()  # held for each transaction, so that a revocation waits for it
        self.stopping = asyncio.Event()

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # The transaction in flight finishes under the generation it began with (I2); what is still
        # queued was never committed, and its partitions' next owners fetch it again.
        async with self.committing:
            self.assignment = None
            self.queued.clear()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.assignment = assignment_of(self.consumer, self.group)

    async def run(self) -> None:
        await self.producer.start()
        try:
            self.reply_partitions = len(await self.producer.partitions_for(self.topics.replies))
            self.consumer.subscribe([self.topics.commands], listener=self)
            await self.consumer.start()
            try:
                await self._pump()
            finally:
                await self.consumer.stop()
        finally:
            await self.producer.stop()

    async def _pump(self) -> None:
        """Fetch and commit side by side until stopped (the transaction in flight finishes) or one fails."""
        fetching, committing = asyncio.create_task(self._fetch()), asyncio.create_task(self._commit())
        stopped = asyncio.create_task(self.stopping.wait())
        done, _ = await asyncio.wait((fetching, committing, stopped), return_when=asyncio.FIRST_COMPLETED)
        fetching.cancel()
        async with self.committing:  # never cancel a transaction half done
            committing.cancel()
        stopped.cancel()
        await asyncio.gather(fetching, committing, stopped, return_exceptions=True)
        for task in done:
            task.result()  # a failure ends the process with its traceback

    async def _fetch(self) -> None:
        """Queue what the consumer has; a partition with more than a few batches queued pauses until taken."""
        while True:
            fetched = await self.consumer.getmany(timeout_ms=FETCH_WAIT_MS, max_records=self.max_batch)
            if self.assignment is None:  # rebalancing: the next assignment fetches from the committed offsets
                continue
            for tp, records in fetched.items():
                queue = self.queued.setdefault(tp, [])
                queue.extend(records)
                if len(queue) > QUEUE_BATCHES * self.max_batch:
                    self.consumer.pause(tp)
            if fetched:
                self.arrived.set()

    async def _commit(self) -> None:
        while True:
            await self.arrived.wait()
            async with self.committing:
                self.arrived.clear()
                group = self.assignment
                taken = self._take() if group is not None else {}
                if group is not None and taken:
                    await self._transaction(taken, group)

    def _take(self) -> dict[TopicPartition, list[ConsumerRecord]]:
        """At most `max_batch` queued records of all partitions together, from a rotating first partition."""
        order = [tp for tp, queue in self.queued.items() if queue]
        start = self.rotation % len(order) if order else 0
        self.rotation += 1
        room = self.max_batch
        taken: dict[TopicPartition, list[ConsumerRecord]] = {}
        for tp in order[start:] + order[:start]:
            queue = self.queued[tp]
            taken[tp] = queue[:room]
            del queue[:room]
            room -= len(taken[tp])
            if len(queue) <= QUEUE_BATCHES * self.max_batch:
                self.consumer.resume(tp)
            if room == 0:
                break
        if any(self.queued.values()):
            self.arrived.set()  # more than a transaction's worth was queued: straight into the next one
        return taken

    async def _transaction(self, taken: dict[TopicPartition, list[ConsumerRecord]], group: GroupMetadata) -> None:
        now = now_ms()
        messages: list[Outgoing] = []
        offsets: dict[TopicPartition, int] = {}
        for tp, records in taken.items():
            reply = (self.topics.replies, tp.partition % self.reply_partitions)
            event, changelog = (self.topics.events, tp.partition), (self.topics.changelog, tp.partition)
            messages.extend(
                Outgoing(topic, partition, record.key, record.value)
                for record in records
                for topic, partition in (reply, event, changelog)
            )
            offsets[tp] = records[-1].offset + 1
            messages.append(Outgoing(*changelog, PROGRESS_KEY, progress_record(offsets[tp], now, 0)))
        producer = self.producer
        await producer.begin_transaction()
        futures = [await producer.send_batch(batch, topic, partition=partition)
                   for (topic, partition), batch in batched(producer, messages)]  # fmt: skip
        await asyncio.gather(*futures)  # every record acknowledged before the offsets (I4)
        await send_offsets(producer, offsets, group)
        await producer.commit_transaction()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_flags(parser, Kafka, "Kafka connection")
    add_flags(parser, Topics, "topics")
    parser.add_argument("--group", default="dp-baseline")
    parser.add_argument("--max-batch", type=int, default=ProcessorSettings.max_batch)
    args = parser.parse_args()
    pipe = Pipe(from_flags(Kafka, args), from_flags(Topics, args), args.group, args.max_batch)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, pipe.stopping.set)
    await pipe.run()


if __name__ == "__main__":
    asyncio.run(main())
