"""Bring a partition's store up to date from `dp.changelog` (read_committed) before it takes work.

First invariant I5: the restore waits until the changelog's last stable offset reaches the high
watermark read after the assignment. A previous owner's transaction whose offsets were accepted has
its records below that watermark (I4: records are acknowledged before offsets are sent), so once it
is stable that transaction is committed (and restored here) or aborted, never pending.

Transaction markers occupy offsets but are never returned to a consumer, so "read until the last
record" could wait forever: read until the consumer's position reaches the end offset taken at the
start instead.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import AIOKafkaConsumer, TopicPartition

from consumers.store import PartitionStore
from dp.kafka import TRANSACTION_TIMEOUT_MS, restore_consumer, watermark_reader
from dp.settings import Kafka

log = logging.getLogger("dp.processor")

RESTORE_BATCH = 20_000
# A restore that reads nothing for this long is given up (and retried by a fresh writer), never waited on.
STALL_S = 60.0
# An open transaction ends within the transaction timeout plus the coordinator's check for expired ones
# (10 s by default); one that takes longer is a hanging transaction: give up, say so, and try again.
STABLE_WAIT_S = 60.0
STABLE_WARN_S = TRANSACTION_TIMEOUT_MS / 1000


class StoreAhead(Exception):
    """The store reflects more of the log than the log holds: the topics were recreated, or the data
    dir belongs to another deployment. Trusting it would skip commands."""


async def restore(kafka: Kafka, changelog: TopicPartition, store: PartitionStore) -> int:
    """Replay the changelog from the store's offset to the end; returns the records replayed."""
    consumer = restore_consumer(kafka)
    try:
        await consumer.start()
        consumer.assign([changelog])
        end = await stable_end(kafka, consumer, changelog)
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


async def stable_end(kafka: Kafka, consumer: AIOKafkaConsumer, changelog: TopicPartition) -> int:
    """The changelog's last stable offset, once it has reached the high watermark read now (I5)."""
    watermarks = watermark_reader(kafka)
    try:
        await watermarks.start()
        high = int((await watermarks.end_offsets([changelog]))[changelog])
    finally:
        await watermarks.stop()
    began = time.monotonic()
    announced = warned = False
    delay = 0.005
    while (stable := int((await consumer.end_offsets([changelog]))[changelog])) < high:
        waited = time.monotonic() - began
        if waited > STABLE_WAIT_S:
            raise TimeoutError(
                f"{changelog.topic} partition {changelog.partition} has had a transaction open for over "
                f"{STABLE_WAIT_S:.0f}s (last stable offset {stable}, high watermark {high})"
            )
        if not announced:
            announced = True
            log.info("partition %d: waiting for a previous owner's transaction to end (changelog last stable "
                     "offset %d, high watermark %d)", changelog.partition, stable, high)  # fmt: skip
        elif waited > STABLE_WARN_S and not warned:
            warned = True
            log.warning("partition %d: a previous owner's transaction is still open after %.0fs",
                        changelog.partition, waited)  # fmt: skip
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)
    return stable
