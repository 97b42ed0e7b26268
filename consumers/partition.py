"""One owned command partition: its store, the commands fetched for it, and its deadlines.

A partition never publishes by itself. The committer (`consumers/committer.py`) takes its work into
the process's transaction as a `Step`, and only after that transaction committed does the step reach
RocksDB (`persist`), so the store is never ahead of Kafka. Only the process that owns the partition
touches its store: ownership is the concurrency control.

Opening a partition follows invariant I5 of the design: wait until the changelog partition's last
stable offset reaches the high watermark seen after the assignment (a previous owner's open
transaction is then committed or aborted), catch the store up from the changelog, and seek the
commands to the larger of the group's committed offset and the store's own progress.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from aiokafka import AIOKafkaConsumer, TopicPartition

from consumers.effects import Effects, Incoming, Outgoing, Route, TopicInfo, apply_batch
from consumers.restore import StoreAhead, restore
from consumers.store import PROGRESS_KEY, DataDir, PartitionStore, progress_record
from dp.machine import purge_at
from dp.settings import Kafka
from dp.subscriptions import Subscribers
from dp.wire import Position, Promise

log = logging.getLogger("dp.processor")

DUE_PER_STEP: Final = 5_000
# Fetched records a partition may hold before its fetching pauses, in transactions' worth (count and bytes).
QUEUE_BATCHES: Final = 4
# The ids of this many recent changes are kept in memory, so that a search's second round can tell whether
# anything it could see changed since its first (beyond it, the search is answered afresh).
RECENT_CHANGES: Final = 100_000


@dataclass
class Step:
    """One partition's share of a transaction: what it applied and what that publishes and persists."""

    partition: Partition
    records: list[Incoming]
    due: list[Promise]
    now: int
    next_offset: int
    effects: Effects

    @property
    def empty(self) -> bool:
        """Nothing to apply (every record was a redelivery, no timeout or purge was due): no transaction."""
        return not self.records and not self.due and not self.effects.purged


class Partition:
    """The state of one command partition this process owns; the committer is its only writer."""

    def __init__(self, kafka: Kafka, data_dir: DataDir, route: Route, max_batch: int, max_batch_bytes: int) -> None:
        self.kafka = kafka
        self.route = route
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.source = TopicPartition(route.topics.commands, route.partition)
        self.changelog = TopicPartition(route.topics.changelog, route.partition)
        self.store_path = data_dir.partition_path(route.partition)
        self.block_cache = data_dir.block_cache
        self.store: PartitionStore | None = None
        self.next_offset = 0
        self.next_deadline: int | None = None
        self.next_purge: int | None = None
        """When the oldest completed promise is due to be purged (with a retention set)."""
        self.restored = 0
        self.open_seconds = 0.0
        self._queue: list[Incoming] = []
        self._queued_bytes = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._paused = False
        self.version = 0
        self._recent: deque[tuple[int, str]] = deque(maxlen=RECENT_CHANGES)
        self._known_since = 0

    # --- opening and closing --------------------------------------------------------------

    async def open(self, consumer: AIOKafkaConsumer) -> None:
        """Catch the store up from the changelog (after I5's wait) and seek to where commands resume.

        A store ahead of the log (the topics were recreated, or the data dir is another deployment's)
        is wiped and restored from the changelog, loudly: trusting it would skip commands.
        """
        began = time.monotonic()
        if self.store is None:
            self.store = await asyncio.to_thread(PartitionStore, self.store_path, self.block_cache)
        commands_end = (await consumer.end_offsets([self.source]))[self.source]
        try:
            if self.store.outdated:
                log.info("partition %d: the store predates this version's layout; rebuilding it from the changelog",
                         self.route.partition)  # fmt: skip
                self.store = await asyncio.to_thread(self.store.wipe)
            if self.store.command_offset > commands_end:
                raise StoreAhead(
                    f"the store is at command offset {self.store.command_offset}, beyond the commands' end "
                    f"({commands_end})"
                )
            self.restored = await restore(self.kafka, self.changelog, self.store)
        except StoreAhead as ahead:
            log.error("partition %d: %s: the topics were recreated or the data dir belongs to another "
                      "deployment; wiping %s and restoring from the changelog", self.route.partition, ahead,
                      self.store_path)  # fmt: skip
            self.store = await asyncio.to_thread(self.store.wipe)
            self.restored = await restore(self.kafka, self.changelog, self.store)
        if self.store.skipped:
            log.warning("partition %d: skipped %d changelog records of kinds this version does not know",
                        self.route.partition, self.store.skipped)  # fmt: skip
        # The larger of the two: Kafka can lose a transaction's consumer-offset commit on a broker crash
        # (markers skipped for a __consumer_offsets partition with no known leader yet), while the
        # changelog's progress record of that same transaction survives.
        committed = await consumer.committed(self.source)
        self.next_offset = max(committed or 0, self.store.command_offset)
        consumer.seek(self.source, self.next_offset)
        self.next_deadline = self.store.next_deadline()
        self.next_purge = self._first_purge()
        self.version = self._known_since = self.store.version
        self._recent.clear()
        self._queue, self._queued_bytes = [], 0
        self._consumer, self._paused = consumer, False
        self.open_seconds = time.monotonic() - began

    def close(self) -> None:
        store, self.store = self.store, None
        self._queue, self._queued_bytes = [], 0
        if store is not None:
            store.close()

    # --- work -----------------------------------------------------------------------------

    def offer(self, records: list[Incoming], consumer: AIOKafkaConsumer) -> None:
        """Queue fetched records; past a few transactions' worth, stop fetching this partition until drained."""
        self._queue.extend(records)
        self._queued_bytes += sum(len(record.value or b"") for record in records)
        if self._full():
            self._paused = True
            consumer.pause(self.source)

    def _full(self) -> bool:
        return (
            len(self._queue) > QUEUE_BATCHES * self.max_batch
            or self._queued_bytes > QUEUE_BATCHES * self.max_batch_bytes
        )

    @property
    def queued(self) -> int:
        return len(self._queue)

    def due(self, now: int) -> bool:
        return self.next_deadline is not None and self.next_deadline <= now

    def purge_due(self, now: int) -> bool:
        return self.next_purge is not None and self.next_purge <= now

    @property
    def wakeup(self) -> int | None:
        """The next time this partition has work without a command: a timeout, or a purge."""
        times = [time for time in (self.next_deadline, self.next_purge) if time is not None]
        return min(times) if times else None

    def _first_purge(self) -> int | None:
        assert self.store is not None, "partition is not open"
        return self.store.next_purge(self.route.retention_ms)

    def has_work(self, now: int) -> bool:
        return bool(self._queue) or self.due(now) or self.purge_due(now)

    def take(self, count: int, size: int) -> list[Incoming]:
        """At most `count` queued records and about `size` bytes of them (at least one, if any)."""
        taken_bytes = taken = 0
        for record in self._queue[:count]:
            length = len(record.value or b"")
            if taken and taken_bytes + length > size:
                break
            taken_bytes, taken = taken_bytes + length, taken + 1
        records, self._queue = self._queue[:taken], self._queue[taken:]
        self._queued_bytes -= taken_bytes
        if self._paused and not self._full() and self._consumer is not None:
            self._paused = False
            self._consumer.resume(self.source)
        return records

    def step(
        self,
        records: list[Incoming],
        now: int,
        reply_topics: Mapping[str, TopicInfo],
        refusals: Mapping[int, str | None] | None = None,
        *,
        timers: int = DUE_PER_STEP,
        timer_bytes: int | None = None,
        transaction: str | None = None,
    ) -> Step:
        """Apply `records`, and at most `timers` of the timeouts due at `now` (about `timer_bytes` of records,
        by default `max_batch_bytes`), to a copy of the state: the store is read, never written. The effects
        end with this partition's progress record, which every transaction touching the partition carries
        (I1), timer-only ones too: it records `now`, so that a new owner's clock never runs back. `transaction`
        names the transaction the step will be committed in, for search answers (None: not shared)."""
        assert self.store is not None, "partition is not open"
        now = max(now, self.store.last_now)
        fresh = [record for record in records if record.offset >= self.next_offset]
        sweep = timers > 0 and self.due(now)
        due = self.store.due(now, timers, timer_bytes or self.max_batch_bytes) if sweep else []
        if sweep and not due:  # the earliest timeout was completed meanwhile: look again
            self.next_deadline = self.store.next_deadline()
        expired = self._expired(now, timers - len(due))  # purges share the timeouts' budget
        effects = apply_batch(
            self.route, self, fresh, due, now, reply_topics, refusals, transaction=transaction, expired=expired
        )
        next_offset = fresh[-1].offset + 1 if fresh else self.next_offset
        progress = progress_record(next_offset, now, self.version + len(effects.changed))
        effects.messages.append(Outgoing(self.route.topics.changelog, self.route.partition, PROGRESS_KEY, progress))
        return Step(self, fresh, due, now, next_offset, effects)

    def _expired(self, now: int, limit: int) -> list[Promise]:
        """At most `limit` completed promises past their retention, oldest first."""
        if limit <= 0 or not self.purge_due(now):
            return []
        assert self.store is not None, "partition is not open"
        retention = self.route.retention_ms
        return self.store.expired(None if retention is None else now - retention, now, limit)

    def persist(self, step: Step, changelog_end: int) -> None:
        """The step's transaction committed: write its changes and offsets to RocksDB in one batch."""
        assert self.store is not None, "partition is not open"
        version = self.version + len(step.effects.changed)
        purged = step.effects.purged.values()
        self.store.write(step.effects.persist, changelog_end, step.next_offset, step.now, version, purged)
        self.next_offset = step.next_offset
        self._recent.extend(enumerate(step.effects.changed, start=self.version + 1))
        self.version = version
        if len(self._recent) == RECENT_CHANGES:  # older changes were forgotten: searches since then start afresh
            self._known_since = self._recent[0][0] - 1
        # Kept in memory rather than read back: seeking the deadline index after every transaction would skip
        # over the tombstones of every completed promise. It may be early (its promise completed since): then
        # the sweep finds nothing due and `step` reads the index once.
        for promise in step.effects.changes.values():
            if promise.state == "PENDING" and (self.next_deadline is None or promise.timeout < self.next_deadline):
                self.next_deadline = promise.timeout
        if purged:  # the next one to purge is read back (a purge step takes the oldest, maybe not all due)
            self.next_purge = self._first_purge()
        else:
            for promise in step.effects.changes.values():
                if (due := purge_at(promise, self.route.retention_ms)) is not None:
                    self.next_purge = due if self.next_purge is None else min(self.next_purge, due)

    # --- the committed state as the core reads it (effects.StoreView) ------------------------

    def get(self, promise_id: str) -> Promise | None:
        assert self.store is not None, "partition is not open"
        return self.store.get(promise_id)

    def subscribers(self, promise_id: str) -> Subscribers:
        assert self.store is not None, "partition is not open"
        return self.store.subscribers(promise_id)

    def newest(self, after: Position | None) -> Iterator[tuple[Position, str]]:
        assert self.store is not None, "partition is not open"
        return self.store.newest(after)

    def falling_due(self, start: int, end: int) -> Iterator[str]:
        assert self.store is not None, "partition is not open"
        return self.store.falling_due(start, end)

    def changed_since(self, version: int) -> Sequence[str] | None:
        """The ids changed after `version`, from memory: None if that is before what this owner recalls."""
        if version < self._known_since or version > self.version:
            return None
        changed: list[str] = []
        for number, promise_id in reversed(self._recent):
            if number <= version:
                break
            changed.append(promise_id)
        return changed
