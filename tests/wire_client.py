"""Speaking only the wire contract with plain aiokafka, as a producer in any language would.

The processor tests use this instead of dp's own client, so that they prove the contract itself.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from dp.settings import Kafka, Topics
from dp.wire import Reply, decode_reply


class WireClient:
    """Sends JSON commands keyed by id and collects every reply on the replies topic by requestId."""

    def __init__(self, kafka: Kafka, topics: Topics) -> None:
        self.kafka = kafka
        self.topics = topics
        self.replies: dict[str | None, list[Reply]] = defaultdict(list)
        self._arrived = asyncio.Condition()
        self._producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, linger_ms=2)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka.bootstrap_servers, isolation_level="read_committed", enable_auto_commit=False
        )
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> WireClient:
        await self._producer.start()
        await self._consumer.start()
        partitions = self._consumer.partitions_for_topic(self.topics.replies) or set()
        if not partitions:
            await self._consumer._client.force_metadata_update()
            partitions = self._consumer.partitions_for_topic(self.topics.replies) or set()
        tps = [TopicPartition(self.topics.replies, p) for p in partitions]
        self._consumer.assign(tps)
        for tp, end in (await self._consumer.end_offsets(tps)).items():
            self._consumer.seek(tp, end)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._reader is not None
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self._consumer.stop()
        await self._producer.stop()

    async def _read(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=200)
            if not batch:
                continue
            async with self._arrived:
                for records in batch.values():
                    for record in records:
                        reply = decode_reply(record.value)
                        self.replies[reply.request_id].append(reply)
                self._arrived.notify_all()

    async def send(
        self,
        command: dict[str, Any],
        *,
        key: bytes | None = None,
        partition: int | None = None,
        raw: bytes | None = None,
    ) -> str:
        """Publish a command (keyed by its id unless told otherwise); returns its requestId."""
        request_id = command.setdefault("requestId", uuid.uuid4().hex)
        value = raw if raw is not None else json.dumps(command).encode()
        record_key = key if key is not None else str(command.get("id", "")).encode()
        await self._producer.send_and_wait(self.topics.commands, value, key=record_key, partition=partition)
        return str(request_id)

    async def send_all(self, commands: list[dict[str, Any]]) -> list[str]:
        """Publish many commands without waiting on each (one flush at the end); returns their requestIds."""
        futures = []
        for command in commands:
            command.setdefault("requestId", uuid.uuid4().hex)
            value, key = json.dumps(command).encode(), command["id"].encode()
            futures.append(await self._producer.send(self.topics.commands, value, key=key))
        await asyncio.gather(*futures)
        return [command["requestId"] for command in commands]

    async def call(self, command: dict[str, Any], seconds: float = 60.0) -> Reply:
        request_id = await self.send(command)
        return (await self.wait_for([request_id], seconds))[request_id]

    async def wait_for(self, request_ids: list[str], seconds: float = 60.0) -> dict[str, Reply]:
        """The first reply of each request, once all arrived; TimeoutError names how many are missing."""

        async def all_arrived() -> None:
            async with self._arrived:
                await self._arrived.wait_for(lambda: all(self.replies.get(r) for r in request_ids))

        try:
            await asyncio.wait_for(all_arrived(), seconds)
        except TimeoutError:
            missing = [r for r in request_ids if not self.replies.get(r)]
            raise TimeoutError(f"{len(missing)} of {len(request_ids)} replies missing after {seconds}s") from None
        return {r: self.replies[r][0] for r in request_ids}


async def read_topic(kafka: Kafka, topic: str, seconds: float = 60.0) -> list[ConsumerRecord]:
    """Every committed record of `topic` now, in partition then offset order."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    try:
        deadline = asyncio.get_running_loop().time() + seconds
        while not consumer.partitions_for_topic(topic):  # a topic created a moment ago shows up soon
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"topic {topic} has no partitions in the metadata after {seconds}s")
            await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: dict[TopicPartition, list[ConsumerRecord]] = defaultdict(list)
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"could not read {topic} to its end within {seconds}s")
            for tp, batch in (await consumer.getmany(timeout_ms=200, max_records=10_000)).items():
                records[tp].extend(batch)
        return [record for tp in tps for record in records[tp]]
    finally:
        await consumer.stop()
