"""TxnOffsetCommit v3 against the real broker: offsets sent under the member's current generation commit;
a zombie's (a stale generation, a member id the group does not know) are refused and never commit (I2, I3)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalGenerationError, UnknownMemberIdError

from consumers.kip447 import GroupMetadata, assignment_of, send_offsets
from dp import kafka as clients
from dp.settings import Kafka, Topics

JOIN_SECONDS = 60.0


class Member(ConsumerRebalanceListener):  # type: ignore[misc]
    """A command-consumer group member that records the group metadata of each assignment it receives."""

    def __init__(self, kafka: Kafka, group: str) -> None:
        self.consumer = clients.command_consumer(kafka, group)
        self.group = group
        self.assignments: list[GroupMetadata] = []
        self._changed = asyncio.Condition()

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        pass

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        async with self._changed:
            self.assignments.append(assignment_of(self.consumer, self.group))
            self._changed.notify_all()

    async def assignment(self, newer_than: int = -1) -> GroupMetadata:
        """The latest assignment's metadata, once one with a generation above `newer_than` arrived."""

        async def arrived() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: any(a.generation > newer_than for a in self.assignments))

        await asyncio.wait_for(arrived(), JOIN_SECONDS)
        return self.assignments[-1]

    def partition(self) -> TopicPartition:
        return min(self.consumer.assignment())


async def nothing_committed(
    kafka: Kafka,
    transactional_id: str,
    one: Member,
    current: GroupMetadata,
    refused: TopicPartition,
    other: TopicPartition,
) -> None:
    """The refused transaction left no offset behind: a fresh producer with its id (whose start ends the
    refused transaction) commits `other` under the current generation, and once that shows, `refused` has none."""
    async with transaction(kafka, transactional_id) as producer:
        await send_offsets(producer, {other: 7}, current)
        await producer.commit_transaction()
    await committed(one, other, 7)
    assert await one.consumer.committed(refused) is None


@asynccontextmanager
async def member(kafka: Kafka, group: str, topic: str) -> AsyncIterator[Member]:
    joined = Member(kafka, group)
    await joined.consumer.start()
    try:
        joined.consumer.subscribe([topic], listener=joined)
        yield joined
    finally:
        await joined.consumer.stop()


@asynccontextmanager
async def transaction(kafka: Kafka, transactional_id: str) -> AsyncIterator[AIOKafkaProducer]:
    """A started transactional producer with a transaction open; discarded, never reused, on the way out."""
    producer = clients.transactional_producer(kafka, transactional_id)
    await producer.start()
    try:
        await producer.begin_transaction()
        yield producer
    finally:
        await clients.discard(producer)


async def committed(one: Member, tp: TopicPartition, offset: int) -> None:
    """Wait until the group shows `offset` for `tp`: EndTxn returns once the commit is decided, and the
    coordinator writes the markers that make a transaction's offsets visible a moment later."""
    deadline = asyncio.get_running_loop().time() + JOIN_SECONDS
    while (shown := await one.consumer.committed(tp)) != offset:
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{tp} shows offset {shown}, not {offset}, after {JOIN_SECONDS}s")
        await asyncio.sleep(0.05)


def names() -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return f"g-{suffix}", f"tx-{suffix}"


async def test_offsets_under_the_current_generation_commit(kafka: Kafka, topics: Topics) -> None:
    group, transactional_id = names()
    async with member(kafka, group, topics.commands) as one:
        current = await one.assignment()
        assert current.generation >= 1 and current.member_id
        tp = one.partition()
        async with transaction(kafka, transactional_id) as producer:
            await send_offsets(producer, {tp: 5}, current)
            await producer.commit_transaction()
        await committed(one, tp, 5)


async def test_a_stale_generation_is_refused_and_nothing_commits(kafka: Kafka, topics: Topics) -> None:
    group, transactional_id = names()
    async with member(kafka, group, topics.commands) as one:
        stale = await one.assignment()
        async with member(kafka, group, topics.commands) as two:  # a second member forces a rebalance
            await two.assignment()
            current = await one.assignment(newer_than=stale.generation)
            assert current.member_id == stale.member_id  # so only the generation differs
            tp, other = sorted(one.consumer.assignment())[:2]

            async with transaction(kafka, transactional_id) as zombie:
                with pytest.raises(IllegalGenerationError):
                    await send_offsets(zombie, {tp: 5}, stale)
                with pytest.raises(IllegalGenerationError):
                    await zombie.commit_transaction()  # abortable only: EndTxn(COMMIT) is never sent
            await nothing_committed(kafka, transactional_id, one, current, tp, other)


async def test_a_member_id_the_group_does_not_know_is_refused(kafka: Kafka, topics: Topics) -> None:
    group, transactional_id = names()
    async with member(kafka, group, topics.commands) as one:
        current = await one.assignment()
        tp, other = sorted(one.consumer.assignment())[:2]
        foreign = GroupMetadata(group, current.generation, f"someone-else-{uuid.uuid4()}")
        async with transaction(kafka, transactional_id) as zombie:
            with pytest.raises(UnknownMemberIdError):
                await send_offsets(zombie, {tp: 5}, foreign)
            with pytest.raises(UnknownMemberIdError):
                await zombie.commit_transaction()
        await nothing_committed(kafka, transactional_id, one, current, tp, other)
