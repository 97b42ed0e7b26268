"""Bring a partition's store up to date from `dp.changelog` (read_committed) before it takes work.

Transaction markers occupy offsets but are never returned to a consumer, so "read until the last
record" could wait forever: read until the consumer's position reaches the end offset taken at the
start instead.
"""

from __future__ import annotations

import time

from aiokafka import TopicPartition

from consumers.store import PartitionStore
from dp.kafka import restore_consumer
from dp.settings import Kafka

RESTORE_BATCH = 20_000
# A restore that reads nothing for this long is given up (and retried by a fresh writer), never waited on.
STALL_S = 60.0


class StoreAhead(Exception):
    """The store reflects more of the log than the log holds: the topics were recreated, or the data
    dir belongs to another deployment. Trusting it would skip commands."""


async def restore(kafka: Kafka, changelog: TopicPartition, store: PartitionStore) -> int:
    """Replay the changelog from the store's offset to the end; returns the records replayed."""
    consumer = restore_consumer(kafka)
    await consumer.start()
    try:
        consumer.assign([changelog])
        end = (await consumer.end_offsets([changelog]))[changelog]
        start = store.changelog_offset
        if start > end:
            raise StoreAhead(f"the store is at changelog offset {start}, beyond the changelog's end ({end})")
        if start >= end:
            return 0
        consumer.seek(changelog, start)
        replayed = 0
        moved = time.monotonic()
        while (position := await consumer.position(changelog)) < end:
            batch = await consumer.getmany(changelog, timeout_ms=500, max_records=RESTORE_BATCH)
            records = batch.get(changelog, [])
            if records:
                moved = time.monotonic()
            elif time.monotonic() - moved > STALL_S:
                raise TimeoutError(
                    f"restoring {changelog.topic} partition {changelog.partition} made no progress for "
                    f"{STALL_S:.0f}s at offset {position} of {end}"
                )
            store.write_raw(
                ((record.offset, record.key, record.value, record.headers) for record in records),
                await consumer.position(changelog) if records else position,
            )
            replayed += len(records)
        return replayed
    finally:
        await consumer.stop()
