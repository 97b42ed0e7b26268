"""Consumer offsets committed in a transaction, fenced by the consumer-group generation (KIP-447, EOS-v2).

A transaction's `TxnOffsetCommit` must carry the generation and member id under which its partitions
were assigned, so that the group coordinator refuses the offsets of a zombie (a member that lost its
partitions in a rebalance it did not see) and its transaction never commits: invariants I2 and I3 of
DESIGN.md. aiokafka 0.14 sends only `TxnOffsetCommit` v0, which carries neither, and the broker accepts
a v3 request with generation -1 and no member id unchecked, so those are never sent. This module adds v3
through aiokafka's protocol layer and keeps the rest of its transaction machinery (AddOffsetsToTxn
first, coordinator lookups, retries): at import it replaces aiokafka's `TxnOffsetCommitHandler` by one
that sends v3 when the group id is a `GroupMetadata` and behaves exactly like aiokafka's otherwise. A
fenced commit makes the transaction abortable only, through aiokafka's own `error_transaction` (raising
in the sender task would kill the sender); the caller then discards the producer (I3).

The handler reaches into aiokafka's internals, so the module refuses any aiokafka but the locked one.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any, Final

import aiokafka
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import (
    BrokerResponseError,
    IllegalGenerationError,
    IncompatibleBrokerVersion,
    UnknownMemberIdError,
)
from aiokafka.producer import sender as aiokafka_sender
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.transaction import TxnOffsetCommitResponse_v0
from aiokafka.protocol.types import CompactArray, CompactString, Int16, Int32, Int64, Schema, TaggedFields
from aiokafka.structs import OffsetAndMetadata, TopicPartition

AIOKAFKA_VERSION: Final = "0.14.0"

if aiokafka.__version__ != AIOKAFKA_VERSION:
    raise RuntimeError(
        f"consumers.kip447 extends the internals of aiokafka {AIOKAFKA_VERSION}, but aiokafka "
        f"{aiokafka.__version__} is installed: run scripts/setup to install the version uv.lock pins."
    )

TXN_OFFSET_COMMIT: Final = 28  # the API key
NO_LEADER_EPOCH: Final = -1


class FencedInstanceIdError(BrokerResponseError):  # type: ignore[misc]  # aiokafka is untyped
    """FENCED_INSTANCE_ID (82): another member holds this static group instance id. aiokafka 0.14 lacks it."""

    errno = 82
    message = "FENCED_INSTANCE_ID"
    description = (
        "The broker rejected this static consumer since another consumer with the same "
        "group.instance.id has registered with a different member.id."
    )


# The refusals by which the group coordinator fences a zombie's offsets (TxnOffsetCommit v3+).
FENCING_ERRORS: Final[Mapping[int, type[BrokerResponseError]]] = {
    IllegalGenerationError.errno: IllegalGenerationError,
    UnknownMemberIdError.errno: UnknownMemberIdError,
    FencedInstanceIdError.errno: FencedInstanceIdError,
}


class GroupMetadata(str):
    """The consumer group id, carrying the generation and member id under which partitions were assigned.

    It equals (and hashes as) the plain group id, as aiokafka's transaction manager expects.
    """

    __slots__ = ("generation", "instance_id", "member_id")

    generation: int
    member_id: str
    instance_id: str | None

    def __new__(cls, group_id: str, generation: int, member_id: str, instance_id: str | None = None) -> GroupMetadata:
        if not group_id:
            raise ValueError("A consumer group id must not be empty.")
        if generation < 0:
            raise ValueError(
                f"Group {group_id!r} has generation {generation}: offsets need the generation under which "
                "the partitions were assigned (the member is not joined now, and the broker does not fence -1)."
            )
        if not member_id:
            raise ValueError(
                f"Group {group_id!r} has no member id: offsets need the member id under which the "
                'partitions were assigned (the member is not joined now, and the broker does not fence "").'
            )
        self = super().__new__(cls, group_id)
        object.__setattr__(self, "generation", generation)
        object.__setattr__(self, "member_id", member_id)
        object.__setattr__(self, "instance_id", instance_id)
        return self

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"GroupMetadata is immutable: it cannot set {name!r}")

    def __repr__(self) -> str:
        return (
            f"GroupMetadata({str(self)!r}, generation={self.generation}, "
            f"member_id={self.member_id!r}, instance_id={self.instance_id!r})"
        )


def assignment_of(consumer: AIOKafkaConsumer, group_id: str) -> GroupMetadata:
    """The group metadata under which `consumer` holds its partitions now: call it inside
    `on_partitions_assigned`, and keep the result for as long as the partitions stay assigned (I2).

    The coordinator's live fields become -1/"" after a failed heartbeat; then this raises ValueError.
    """
    coordinator = consumer._coordinator
    if coordinator is None:
        raise ValueError(f"The consumer is not a member of group {group_id!r}: start it with group_id={group_id!r}.")
    if coordinator.group_id != group_id:
        raise ValueError(f"The consumer is a member of group {coordinator.group_id!r}, not of {group_id!r}.")
    generation: int = coordinator.generation
    member_id: str = coordinator.member_id
    instance_id: str | None = coordinator._group_instance_id
    return GroupMetadata(group_id, generation, member_id, instance_id)


def request_rejoin(consumer: AIOKafkaConsumer) -> None:
    """Make `consumer` rejoin its group (a new generation) at its next chance: for an assignment whose
    generation could not be captured, which no transaction may be sent under."""
    coordinator = consumer._coordinator
    if coordinator is not None:
        coordinator.request_rejoin()


async def send_offsets(producer: AIOKafkaProducer, offsets: Mapping[TopicPartition, int], group: GroupMetadata) -> None:
    """Add `offsets` (the next offset to consume, per partition) to the producer's open transaction
    with TxnOffsetCommit v3, fenced by `group`'s generation and member id.

    Raises IllegalGenerationError, UnknownMemberIdError or FencedInstanceIdError when the group
    coordinator fences them: the transaction is then abortable only, and the caller discards the producer.
    """
    if not isinstance(group, GroupMetadata):
        raise TypeError(f"send_offsets needs a GroupMetadata (see assignment_of), not {type(group).__name__}.")
    await producer.send_offsets_to_transaction(dict(offsets), group)


# --- the v3 protocol structs (TxnOffsetCommitRequest.json / TxnOffsetCommitResponse.json, flexible from v3) ---


class TxnOffsetCommitResponse_v3(Response):  # type: ignore[misc]  # aiokafka is untyped
    API_KEY = TXN_OFFSET_COMMIT
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "topics",
            CompactArray(
                ("name", CompactString("utf-8")),
                ("partitions", CompactArray(("partition_index", Int32), ("error_code", Int16), ("tags", TaggedFields))),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class TxnOffsetCommitRequest_v3(RequestStruct):  # type: ignore[misc]  # aiokafka is untyped
    FLEXIBLE_VERSION = True  # request header v2, response header v1
    API_KEY = TXN_OFFSET_COMMIT
    API_VERSION = 3
    RESPONSE_TYPE = TxnOffsetCommitResponse_v3
    SCHEMA = Schema(
        ("transactional_id", CompactString("utf-8")),
        ("group_id", CompactString("utf-8")),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("generation_id", Int32),
        ("member_id", CompactString("utf-8")),
        ("group_instance_id", CompactString("utf-8")),  # nullable: None encodes as length 0
        (
            "topics",
            CompactArray(
                ("name", CompactString("utf-8")),
                (
                    "partitions",
                    CompactArray(
                        ("partition_index", Int32),
                        ("committed_offset", Int64),
                        ("committed_leader_epoch", Int32),
                        ("committed_metadata", CompactString("utf-8")),  # nullable
                        ("tags", TaggedFields),
                    ),
                ),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


# (partition, offset, metadata) per topic, as aiokafka's v0 request takes them.
OffsetsByTopic = list[tuple[str, list[tuple[int, int, str]]]]


class TxnOffsetCommitRequestV3(Request[TxnOffsetCommitRequest_v3]):  # type: ignore[misc]  # aiokafka is untyped
    """Builds TxnOffsetCommit v3 and nothing older: a broker without v3 could not fence the offsets."""

    API_KEY = TXN_OFFSET_COMMIT

    def __init__(
        self, transactional_id: str, producer_id: int, producer_epoch: int, group: GroupMetadata, topics: OffsetsByTopic
    ) -> None:
        self._transactional_id = transactional_id
        self._producer_id = producer_id
        self._producer_epoch = producer_epoch
        self._group = group
        self._topics = topics

    def prepare(self, versions: dict[int, tuple[int, int]]) -> TxnOffsetCommitRequest_v3:
        low, high = versions.get(TXN_OFFSET_COMMIT, (-1, -1))
        if not low <= TxnOffsetCommitRequest_v3.API_VERSION <= high:
            raise IncompatibleBrokerVersion(
                f"The broker supports TxnOffsetCommit v{low} to v{high}, not v3 (Kafka 2.5 and newer do), "
                "so it cannot fence a zombie's offsets by consumer-group generation: upgrade the broker."
            )
        return self.build(TxnOffsetCommitRequest_v3)

    def build(self, request_struct_class: type[TxnOffsetCommitRequest_v3]) -> TxnOffsetCommitRequest_v3:
        group = self._group
        return request_struct_class(
            self._transactional_id,
            str(group),
            self._producer_id,
            self._producer_epoch,
            group.generation,
            group.member_id,
            group.instance_id,
            [
                (
                    topic,
                    [(partition, offset, NO_LEADER_EPOCH, metadata, {}) for partition, offset, metadata in parts],
                    {},
                )
                for topic, parts in self._topics
            ],
            {},
        )


# --- the handler aiokafka's sender builds for every TxnOffsetCommit ---


class TxnOffsetCommitHandler(aiokafka_sender.TxnOffsetCommitHandler):  # type: ignore[misc]  # aiokafka is untyped
    """aiokafka's handler, sending v3 when the group id is a GroupMetadata and treating its fencing errors
    as aiokafka treats a refused group authorization: the transaction becomes abortable only."""

    _sender: Any
    _offsets: dict[TopicPartition, OffsetAndMetadata]
    _group_id: str

    def create_request(self) -> Request:
        group = self._group_id
        if not isinstance(group, GroupMetadata):
            return super().create_request()
        txn_manager = self._sender._txn_manager
        topics: collections.defaultdict[str, list[tuple[int, int, str]]] = collections.defaultdict(list)
        for tp, offset in sorted(self._offsets.items()):
            topics[tp.topic].append((tp.partition, offset.offset, offset.metadata))
        return TxnOffsetCommitRequestV3(
            txn_manager.transactional_id,
            txn_manager.producer_id,
            txn_manager.producer_epoch,
            group,
            list(topics.items()),
        )

    async def do(self, node_id: int) -> bool:
        try:
            done: bool = await super().do(node_id)
        except IncompatibleBrokerVersion as error:
            if not isinstance(self._group_id, GroupMetadata):
                raise
            _abortable_only(self._sender._txn_manager, error)
            return True
        return done

    def handle_response(self, resp: Any) -> float | None:
        if not isinstance(resp, TxnOffsetCommitResponse_v3):
            backoff: float | None = super().handle_response(resp)
            return backoff
        for topic, partitions, _ in resp.topics:
            for partition, error_code, _ in partitions:
                fenced = FENCING_ERRORS.get(error_code)
                if fenced is not None:
                    self._fence(fenced, TopicPartition(topic, partition))
                    return None
        as_v0 = TxnOffsetCommitResponse_v0(
            resp.throttle_time_ms,
            [
                (topic, [(partition, error_code) for partition, error_code, _ in partitions])
                for topic, partitions, _ in resp.topics
            ],
        )
        backoff = super().handle_response(as_v0)
        return backoff

    def _fence(self, error_type: type[BrokerResponseError], tp: TopicPartition) -> None:
        group = self._group_id
        assert isinstance(group, GroupMetadata)
        error = error_type(
            f"group {str(group)!r} refused the offsets of {tp.topic}[{tp.partition}] sent under generation "
            f"{group.generation}, member id {group.member_id!r}, instance id {group.instance_id!r}: "
            "these partitions are no longer this member's; discard the producer"
        )
        _abortable_only(self._sender._txn_manager, error)


def _abortable_only(txn_manager: Any, error: Exception) -> None:
    """Fail the pending offsets with `error` and make the transaction abortable only, as aiokafka does
    with a refused group authorization (raising inside the sender task would kill the sender)."""
    txn_manager.error_transaction(error)
    # The error reaches the caller through send_offsets and again at commit_transaction; marking the
    # transaction's own future retrieved keeps a producer discarded at once (I3) from logging
    # "Future exception was never retrieved".
    txn_manager.wait_for_transaction_end().exception()


aiokafka_sender.TxnOffsetCommitHandler = TxnOffsetCommitHandler
