"""The broker the project starts behaves as the design needs: plain and transactional delivery."""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from dp.settings import Kafka, Topics


async def drain(consumer: AIOKafkaConsumer, expected: int, seconds: float = 15.0) -> list[bytes]:
    """Read until `expected` values arrived or the deadline passed (never sleeps blindly)."""
    values: list[bytes] = []
    deadline = asyncio.get_running_loop().time() + seconds
    while len(values) < expected and asyncio.get_running_loop().time() < deadline:
        batch = await consumer.getmany(timeout_ms=200)
        values += [record.value for records in batch.values() for record in records]
    return values


async def read_all(kafka: Kafka, topic: str, isolation_level: str) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka.bootstrap_servers, auto_offset_reset="earliest", isolation_level=isolation_level
    )
    await consumer.start()
    return consumer


async def test_produced_records_are_consumed_in_order(kafka: Kafka, topics: Topics) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    await producer.start()
    try:
        for i in range(20):
            await producer.send(topics.commands, f"v{i}".encode(), key=b"same-key")
        await producer.flush()
    finally:
        await producer.stop()
    consumer = await read_all(kafka, topics.commands, "read_uncommitted")
    try:
        assert await drain(consumer, 20) == [f"v{i}".encode() for i in range(20)]
    finally:
        await consumer.stop()


async def test_committed_transaction_with_offsets_is_visible_and_aborted_one_is_not(
    kafka: Kafka, topics: Topics
) -> None:
    group = f"g-{uuid.uuid4().hex[:8]}"
    source = TopicPartition(topics.commands, 0)
    plain = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    await plain.start()
    await plain.send_and_wait(topics.commands, b"input", partition=0)
    await plain.stop()

    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, transactional_id=f"tx-{group}")
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send(topics.events, b"committed", partition=0)
            await producer.send_offsets_to_transaction({source: 1}, group)
        await producer.begin_transaction()
        await producer.send(topics.events, b"aborted", partition=0)
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send(topics.events, b"after", partition=0)
    finally:
        await producer.stop()

    committed_reader = await read_all(kafka, topics.events, "read_committed")
    uncommitted_reader = await read_all(kafka, topics.events, "read_uncommitted")
    offsets = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=group, enable_auto_commit=False)
    await offsets.start()
    try:
        assert await drain(committed_reader, 2) == [b"committed", b"after"]
        assert b"aborted" in await drain(uncommitted_reader, 3)
        assert await offsets.committed(source) == 1
    finally:
        await committed_reader.stop()
        await uncommitted_reader.stop()
        await offsets.stop()
