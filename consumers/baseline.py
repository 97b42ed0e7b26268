"""The benchmark's baseline: the processor's Kafka shape with nothing of ours in it.

Consume a batch per partition, produce per command one reply, one event and one changelog record
(copies of the command), and commit them with the consumer offset in one transaction per partition,
through one transactional producer per partition with the writer's settings and its batched sends. No decoding, no state
machine, no RocksDB: the practical ceiling of Kafka + aiokafka on the machine.

    python -m consumers.baseline --bootstrap-servers HOST:PORT --topic-prefix PREFIX
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord

from consumers.effects import Outgoing
from consumers.writer import batched
from dp.kafka import command_consumer, transactional_producer
from dp.settings import Kafka, ProcessorSettings, Topics, add_flags, from_flags


class Pipe(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, kafka: Kafka, topics: Topics, group: str, max_batch: int) -> None:
        self.kafka, self.topics, self.group, self.max_batch = kafka, topics, group, max_batch
        self.producers: dict[TopicPartition, AIOKafkaProducer] = {}
        self.reply_partitions = 1
        self.stopping = asyncio.Event()
        self.consumer = command_consumer(kafka, group)

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        for tp in revoked:
            producer = self.producers.pop(tp, None)
            if producer is not None:
                await producer.stop()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        for tp in assigned:
            producer = transactional_producer(self.kafka, f"{self.group}-baseline-{tp.partition}")
            await producer.start()
            self.producers[tp] = producer

    async def run(self) -> None:
        self.consumer.subscribe([self.topics.commands], listener=self)
        await self.consumer.start()
        self.reply_partitions = len(self.consumer.partitions_for_topic(self.topics.replies) or ()) or 1
        try:
            while not self.stopping.is_set():
                batches = await self.consumer.getmany(timeout_ms=100, max_records=self.max_batch)
                await asyncio.gather(*(self.copy(tp, records) for tp, records in batches.items()))
        finally:
            await self.consumer.stop()
            for producer in self.producers.values():
                await producer.stop()

    async def copy(self, tp: TopicPartition, records: list[ConsumerRecord]) -> None:
        producer = self.producers.get(tp)
        if producer is None:  # fetched while its producer was still starting: take it again later
            self.consumer.seek(tp, records[0].offset)
            return
        messages = [
            Outgoing(topic, partition, record.key, record.value)
            for record in records
            for topic, partition in (
                (self.topics.replies, tp.partition % self.reply_partitions),
                (self.topics.events, tp.partition),
                (self.topics.changelog, tp.partition),
            )
        ]
        async with producer.transaction():
            for (topic, partition), batch in batched(producer, messages):
                await producer.send_batch(batch, topic, partition=partition)
            await producer.send_offsets_to_transaction({tp: records[-1].offset + 1}, self.group)


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
