"""TxnOffsetCommit v3 without a broker: its bytes against Kafka's spec, its response, its refusals.

The expected bytes are written out field by field from Kafka's TxnOffsetCommitRequest.json and
TxnOffsetCommitResponse.json (flexibleVersions 3+: compact strings and arrays, a tagged-field section
after every struct) and RequestHeader.json v2 / ResponseHeader.json v1, not from the code under test.
"""

from __future__ import annotations

import asyncio
import gc
import io
import tomllib
from types import SimpleNamespace
from typing import Any

import aiokafka
import pytest
from aiokafka.errors import (
    CoordinatorLoadInProgressError,
    IllegalGenerationError,
    IncompatibleBrokerVersion,
    UnknownMemberIdError,
)
from aiokafka.producer import sender as aiokafka_sender
from aiokafka.producer.transaction_manager import TransactionManager, TransactionState
from aiokafka.protocol.transaction import TxnOffsetCommitRequest_v0
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from consumers import kip447
from consumers.kip447 import FencedInstanceIdError, GroupMetadata, TxnOffsetCommitResponse_v3, assignment_of
from tests.support import REPO


def uvarint(value: int) -> bytes:
    """Kafka's unsigned varint, for the small values here: one byte below 128."""
    assert 0 <= value < 128
    return bytes([value])


def compact_string(value: str | None) -> bytes:
    """COMPACT_(NULLABLE_)STRING: uvarint(length + 1) then UTF-8; null is uvarint(0)."""
    if value is None:
        return uvarint(0)
    return uvarint(len(value.encode()) + 1) + value.encode()


NO_TAGS = b"\x00"  # an empty tagged-field section: uvarint(0) fields


def i16(value: int) -> bytes:
    return value.to_bytes(2, "big", signed=True)


def i32(value: int) -> bytes:
    return value.to_bytes(4, "big", signed=True)


def i64(value: int) -> bytes:
    return value.to_bytes(8, "big", signed=True)


def fake_sender(txn_manager: Any) -> Any:
    """What aiokafka's handlers read from their Sender."""
    dead: list[Any] = []
    return SimpleNamespace(_retry_backoff=0.005, _txn_manager=txn_manager, _coordinator_dead=dead.append, dead=dead)


GROUP = GroupMetadata("g1", generation=5, member_id="m-1")
OFFSETS = {
    TopicPartition("cmd", 3): OffsetAndMetadata(7, "x"),
    TopicPartition("cmd", 0): OffsetAndMetadata(42, ""),
}


def test_the_request_is_txn_offset_commit_v3_byte_for_byte() -> None:
    txn = SimpleNamespace(transactional_id="tx", producer_id=1000, producer_epoch=2)
    handler = aiokafka_sender.TxnOffsetCommitHandler(fake_sender(txn), OFFSETS, GROUP)
    request = handler.create_request().prepare({28: (0, 6)})  # what the connection does, with Kafka 4's range
    wire = request.build_request_header(correlation_id=9, client_id="dp").encode() + request.encode()

    header_v2 = (
        i16(28)  # RequestApiKey: TxnOffsetCommit
        + i16(3)  # RequestApiVersion
        + i32(9)  # CorrelationId
        + i16(2) + b"dp"  # ClientId: a classic INT16-length string even in header v2 ("flexibleVersions": "none")
        + NO_TAGS  # header tagged fields
    )  # fmt: skip
    body_v3 = (
        compact_string("tx")  # TransactionalId
        + compact_string("g1")  # GroupId
        + i64(1000)  # ProducerId
        + i16(2)  # ProducerEpoch
        + i32(5)  # GenerationId
        + compact_string("m-1")  # MemberId
        + compact_string(None)  # GroupInstanceId: null
        + uvarint(1 + 1)  # Topics: compact array of 1
        + compact_string("cmd")  # .Name
        + uvarint(2 + 1)  # .Partitions: compact array of 2, sorted by partition
        + i32(0) + i64(42) + i32(-1) + compact_string("") + NO_TAGS  # index, offset, leader epoch -1, metadata, tags
        + i32(3) + i64(7) + i32(-1) + compact_string("x") + NO_TAGS
        + NO_TAGS  # topic tagged fields
        + NO_TAGS  # request tagged fields
    )  # fmt: skip
    assert wire == header_v2 + body_v3
    assert wire.hex() == (
        "001c0003000000090002647000"  # header
        "037478" "036731" "00000000000003e8" "0002" "00000005" "046d2d31" "00"
        "02" "04636d64" "03"
        "00000000" "000000000000002a" "ffffffff" "01" "00"
        "00000003" "0000000000000007" "ffffffff" "0278" "00"
        "00" "00"
    )  # fmt: skip


def test_a_broker_without_v3_is_refused_rather_than_sent_unfenced_offsets() -> None:
    txn = SimpleNamespace(transactional_id="tx", producer_id=1000, producer_epoch=2)
    request = aiokafka_sender.TxnOffsetCommitHandler(fake_sender(txn), OFFSETS, GROUP).create_request()
    with pytest.raises(IncompatibleBrokerVersion, match="not v3"):
        request.prepare({28: (0, 2)})


async def test_a_broker_without_v3_fails_the_transaction_and_spares_the_sender() -> None:
    txn, pending, handler = await open_offsets()

    async def send(node_id: int, request: Any, group: Any) -> Any:
        return request.prepare({28: (0, 2)})  # what the connection does with such a broker's versions

    handler._sender.client = SimpleNamespace(send=send)
    assert await handler.do(0) is True  # no exception escapes into aiokafka's sender task
    assert isinstance(pending.exception(), IncompatibleBrokerVersion)
    assert txn.state is TransactionState.ABORTABLE_ERROR
    with pytest.raises(IncompatibleBrokerVersion):
        txn.committing_transaction()


def test_a_plain_group_id_still_sends_aiokafkas_v0() -> None:
    assert aiokafka_sender.TxnOffsetCommitHandler is kip447.TxnOffsetCommitHandler
    txn = SimpleNamespace(transactional_id="tx", producer_id=1000, producer_epoch=2)
    request = aiokafka_sender.TxnOffsetCommitHandler(fake_sender(txn), OFFSETS, "g1").create_request()
    v0 = request.prepare({28: (0, 6)})
    assert isinstance(v0, TxnOffsetCommitRequest_v0)
    assert v0.group_id == "g1"
    assert v0.topics == [("cmd", [(0, 42, ""), (3, 7, "x")])]


RESPONSE = (
    i32(9)  # ResponseHeader v1: CorrelationId
    + NO_TAGS  # header tagged fields
    + i32(0)  # ThrottleTimeMs
    + uvarint(1 + 1)  # Topics: compact array of 1
    + compact_string("cmd")  # .Name
    + uvarint(2 + 1)  # .Partitions: compact array of 2
    + i32(0) + i16(0) + NO_TAGS  # PartitionIndex, ErrorCode NONE, tags
    + i32(3) + i16(22) + NO_TAGS  # PartitionIndex, ErrorCode ILLEGAL_GENERATION, tags
    + NO_TAGS  # topic tagged fields
    + uvarint(1) + uvarint(5) + uvarint(2) + b"\xab\xcd"  # response tags: one unknown field, tag 5, 2 bytes
)  # fmt: skip


def test_a_v3_response_decodes() -> None:
    txn = SimpleNamespace(transactional_id="tx", producer_id=1000, producer_epoch=2)
    request = aiokafka_sender.TxnOffsetCommitHandler(fake_sender(txn), OFFSETS, GROUP).create_request()
    struct = request.prepare({28: (0, 6)})
    data = io.BytesIO(RESPONSE)
    header = struct.parse_response_header(data)
    response = struct.RESPONSE_TYPE.decode(data)
    assert header.correlation_id == 9
    assert isinstance(response, TxnOffsetCommitResponse_v3)
    assert response.throttle_time_ms == 0
    assert response.topics == [("cmd", [(0, 0, {}), (3, 22, {})], {})]
    assert response.tags == {5: b"\xab\xcd"}
    assert data.read() == b""


def response(*errors: tuple[int, int]) -> TxnOffsetCommitResponse_v3:
    return TxnOffsetCommitResponse_v3(0, [("cmd", [(partition, code, {}) for partition, code in errors], {})], {})


async def open_offsets() -> tuple[TransactionManager, Any, Any]:
    """A real aiokafka TransactionManager with OFFSETS pending for GROUP, the group already added."""
    txn = TransactionManager("tx", 60_000)
    txn.set_pid_and_epoch(1000, 2)
    txn.begin_transaction()
    pending = txn.add_offsets_to_txn(dict(OFFSETS), GROUP)
    txn.consumer_group_added(GROUP)
    handler = aiokafka_sender.TxnOffsetCommitHandler(fake_sender(txn), dict(OFFSETS), GROUP)
    return txn, pending, handler


async def test_accepted_offsets_complete_the_pending_commit() -> None:
    txn, pending, handler = await open_offsets()
    assert handler.handle_response(response((0, 0), (3, 0))) is None
    assert pending.done() and pending.exception() is None
    assert txn.state is TransactionState.IN_TRANSACTION


@pytest.mark.parametrize(
    ("code", "error"), [(22, IllegalGenerationError), (25, UnknownMemberIdError), (82, FencedInstanceIdError)]
)
async def test_a_fenced_commit_makes_the_transaction_abortable_only(code: int, error: type[Exception]) -> None:
    txn, pending, handler = await open_offsets()
    assert handler.handle_response(response((0, 0), (3, code))) is None  # no retry, and the sender lives on
    assert isinstance(pending.exception(), error)
    assert txn.state is TransactionState.ABORTABLE_ERROR
    with pytest.raises(error):
        txn.committing_transaction()  # what commit_transaction() does first: EndTxn(COMMIT) is never sent


async def test_a_producer_discarded_after_a_fenced_commit_logs_no_unretrieved_error() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        txn, pending, handler = await open_offsets()
        handler.handle_response(response((0, IllegalGenerationError.errno)))
        with pytest.raises(IllegalGenerationError, match="generation 5, member id 'm-1'"):
            pending.result()  # what send_offsets raises; the caller then discards the producer
        del txn, pending, handler
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert reported == []


async def test_other_errors_are_aiokafkas_own() -> None:
    _, pending, handler = await open_offsets()
    assert handler.handle_response(response((0, 0), (3, CoordinatorLoadInProgressError.errno))) == 0.005  # retry
    assert not pending.done()
    assert handler.handle_response(response((3, 0))) is None
    assert pending.done() and pending.exception() is None


def test_group_metadata_is_the_group_id_with_its_assignment() -> None:
    group = GroupMetadata("g1", 5, "m-1", "i-1")
    assert group == "g1" and isinstance(group, str)
    assert (group.generation, group.member_id, group.instance_id) == (5, "m-1", "i-1")
    with pytest.raises(AttributeError):
        group.generation = 6


@pytest.mark.parametrize(
    ("generation", "member_id", "message"),
    [(-1, "m-1", "generation -1"), (5, "", "no member id"), (-1, "", "generation -1")],
)
def test_group_metadata_refuses_what_the_broker_would_not_fence(generation: int, member_id: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GroupMetadata("g1", generation, member_id)


def test_assignment_of_reads_the_coordinators_fields_and_refuses_a_member_that_is_not_joined() -> None:
    def consumer(generation: int, member_id: str) -> Any:
        coordinator = SimpleNamespace(
            group_id="g1", generation=generation, member_id=member_id, _group_instance_id=None
        )
        return SimpleNamespace(_coordinator=coordinator)

    group = assignment_of(consumer(7, "m-7"), "g1")
    assert (group, group.generation, group.member_id, group.instance_id) == ("g1", 7, "m-7", None)
    with pytest.raises(ValueError, match="generation -1"):
        assignment_of(consumer(-1, ""), "g1")  # after a failed heartbeat aiokafka resets to -1 / ""
    with pytest.raises(ValueError, match="not of 'g2'"):
        assignment_of(consumer(7, "m-7"), "g2")
    with pytest.raises(ValueError, match="not a member"):
        assignment_of(SimpleNamespace(_coordinator=None), "g1")


def test_the_module_is_pinned_to_the_locked_aiokafka() -> None:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    (locked,) = [package["version"] for package in lock["package"] if package["name"] == "aiokafka"]
    assert locked == aiokafka.__version__ == kip447.AIOKAFKA_VERSION
