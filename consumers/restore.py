"""Bring a partition's store up to date from `dp.changelog` (read_committed) before it takes work.

Transaction markers occupy offsets but are never returned to a consumer, so "read until the last
record" could wait forever: read until the consumer's position reaches the end offset taken at the
start instead.
"""

from __future__ import annotations

from aiokafka import TopicPartition

from consumers.store import PartitionStore
from dp.kafka import restore_consumer
from dp.settings import Kafka

RESTORE_BATCH = 20_000


async def restore(kafka: Kafka, changelog: TopicPartition, store: PartitionStore) -> int:
    """Replay the changelog from the store's offset to the end; returns the records replayed."""
    consumer = restore_consumer(kafka)
    await consumer.start()
    try:
        consumer.assign([changelog])
        end = (await consumer.end_offsets([changelog]))[changelog]
        start = store.changelog_offset
        if start >= end:
            return 0
        consumer.seek(changelog, start)
        replayed = 0
        while (position := await consumer.position(changelog)) < end:
            batch = await consumer.getmany(changelog, timeout_ms=500, max_records=RESTORE_BATCH)
            records = batch.get(changelog, [])
            store.write_raw(
                ((record.key, record.value) for record in records),
                await consumer.position(changelog) if records else position,
            )
            replayed += len(records)
        return replayed
    finally:
        await consumer.stop()
