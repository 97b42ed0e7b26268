"""The wire contract: round trips, the exact JSON shape, and malformed input always becoming InvalidCommand."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any, get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dp import schema
from dp.machine import reply_for, transition
from dp.wire import (
    OK_STATUSES,
    OPS,
    Cancel,
    Command,
    Create,
    Event,
    Get,
    InvalidCommand,
    Limits,
    Promise,
    Reject,
    Reply,
    Resolve,
    Status,
    Value,
    decode_command,
    decode_event,
    decode_promise,
    decode_reply,
    encode,
    reply_address,
)

PROMISE_JSON = {
    "id": "order/42",
    "state": "PENDING",
    "param": {"headers": {"content-type": "application/json"}, "data": "eyJhIjoxfQ=="},
    "value": {"headers": {}, "data": None},
    "timeout": 1798761600000,
    "idempotencyKeyForCreate": "ik-create-1",
    "idempotencyKeyForComplete": None,
    "tags": {"resonate:invocation": "true"},
    "createdOn": 1767225600000,
    "completedOn": None,
}
PROMISE = Promise(
    "order/42",
    "PENDING",
    Value({"content-type": "application/json"}, b'{"a":1}'),
    Value(),
    1798761600000,
    "ik-create-1",
    None,
    {"resonate:invocation": "true"},
    1767225600000,
    None,
)
COMMANDS: list[Command] = [
    Create(
        "order/42",
        "req-1",
        "my.replies",
        3,
        idempotency_key="ik-create-1",
        strict=True,
        param=Value({"h": "v"}, b"\x00\xffbinary"),
        timeout=1798761600000,
        tags={"resonate:timeout": "true"},
    ),
    Resolve(
        "order/42", "req-1", "my.replies", 3, idempotency_key="ik-done", strict=True, value=Value({}, b'"shipped"')
    ),
    Reject("order/42", "req-1", "my.replies", 3, idempotency_key=None, value=Value({"e": "1"}, None)),
    Cancel("order/42", "req-1", "my.replies", 3, idempotency_key="ik-cancel"),
    Get("order/42", "req-1", "my.replies", 3),
]


def record(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


# --- round trips and shape -------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: type(command).__name__)
def test_every_command_round_trips(command: Command) -> None:
    assert decode_command(encode(command)) == command


def test_a_promise_record_is_exactly_the_wire_contracts_object() -> None:
    assert json.loads(encode(PROMISE)) == PROMISE_JSON
    assert decode_promise(json.dumps(PROMISE_JSON).encode()) == PROMISE


def test_a_completed_promise_round_trips() -> None:
    done = Promise("p", "REJECTED_CANCELED", Value(), Value({"a": "b"}, b"why"), 5, None, "k", {}, 1, 3)
    assert decode_promise(encode(done)) == done


def test_a_reply_round_trips_and_carries_every_field() -> None:
    reply = Reply("req-1", "create", "order/42", True, "created", PROMISE, None)
    assert decode_reply(encode(reply)) == reply
    fields = {
        "requestId",
        "op",
        "id",
        "ok",
        "status",
        "promise",
        "error",
        "promises",
        "next",
        "snapshot",
        "subscription",
    }
    assert set(json.loads(encode(reply))) == fields
    invalid = Reply(None, None, None, False, "invalid", None, "`op`: required")
    assert decode_reply(encode(invalid)) == invalid


def test_an_event_round_trips() -> None:
    event = Event("timedout", PROMISE, None)
    assert decode_event(encode(event)) == event
    assert json.loads(encode(event)) == {"type": "timedout", "promise": PROMISE_JSON, "requestId": None}


def test_a_reply_built_from_an_outcome_names_the_command() -> None:
    command = COMMANDS[0]
    reply = reply_for(command, transition(None, command, 1_767_225_600_000))
    assert (reply.request_id, reply.op, reply.id, reply.ok, reply.status, reply.error) == (
        "req-1",
        "create",
        "order/42",
        True,
        "created",
        None,
    )
    assert reply.promise is not None and reply.promise.state == "PENDING"


def test_the_wire_contracts_command_examples_decode() -> None:
    create = decode_command(
        b'{"op": "create", "id": "order/42", "idempotencyKey": "ik-create-1", "strict": false,'
        b' "param": {"headers": {}, "data": "eyJhIjoxfQ=="}, "timeout": 1798761600000, "tags": {},'
        b' "requestId": "9b2f", "replyTo": "dp.replies", "replyPartition": 3}'
    )
    assert create == Create(
        "order/42",
        "9b2f",
        "dp.replies",
        3,
        idempotency_key="ik-create-1",
        param=Value({}, b'{"a":1}'),
        timeout=1798761600000,
    )
    assert decode_command(b'{"op": "get", "id": "order/42", "requestId": "r"}') == Get("order/42", "r")


def test_a_minimal_create_takes_the_documented_defaults() -> None:
    assert decode_command(b'{"op":"create","id":"x","timeout":1}') == Create(
        "x", None, None, None, idempotency_key=None, strict=False, param=Value(), timeout=1, tags={}
    )


def test_unknown_fields_are_ignored() -> None:
    assert decode_command(b'{"op":"get","id":"x","future":{"a":[1]}}') == Get("x")
    assert decode_promise(json.dumps({**PROMISE_JSON, "future": 1}).encode()) == PROMISE


# --- malformed input -------------------------------------------------------------------------------

ONE_MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json", "not valid JSON at byte 0"),
        (b"", "not valid JSON: the text ends before the document does"),
        (b'{"op":"get","id":"x"} trailing', "not valid JSON at byte 22"),
        (b'{"op":"get","id":"\xff"}', "not valid JSON: not UTF-8 at byte 18"),
        (b'{"a":' * 10_000, "not valid JSON: nested too deeply"),
        (b"[1, 2]", "not a JSON object: got an array"),
        (b'"create"', "not a JSON object: got a string"),
        (b"null", "not a JSON object: got null"),
        (b'{"id":"x"}', "`op`: required, one of create, resolve, reject, cancel, get, subscribe, search"),
        (
            b'{"op":"frobnicate","id":"x"}',
            "`op`: unknown op 'frobnicate', expected one of create, resolve, reject, cancel, get, subscribe, search",
        ),
        (
            b'{"op":7,"id":"x"}',
            "`op`: expected one of create, resolve, reject, cancel, get, subscribe, search, got a number",
        ),
        (b'{"op":"get"}', "`id`: required for get"),
        (b'{"op":"get","id":""}', "`id`: must not be empty"),
        (b'{"op":"get","id":42}', "`id`: expected a string, got a number"),
        (record(op="get", id="x" * 300), "`id`: must be at most 256 UTF-8 bytes, got 300"),
        (record(op="get", id="é" * 129), "`id`: must be at most 256 UTF-8 bytes, got 258"),
        (b'{"op":"create","id":"x"}', "`timeout`: required for create"),
        (b'{"op":"create","id":"x","timeout":"soon"}', "`timeout`: expected an integer, got a string"),
        (b'{"op":"create","id":"x","timeout":1.5}', "`timeout`: expected an integer, got a number"),
        (b'{"op":"create","id":"x","timeout":-1}', "`timeout`: must be at least 0"),
        (b'{"op":"create","id":"x","timeout":1e400}', "`timeout`: expected an integer, got a number"),
        (b'{"op":"create","id":"x","timeout":99999999999999999999}', "`timeout`: must be at most 9223372036854775807"),
        (b'{"op":"resolve","id":"x","strict":"yes"}', "`strict`: expected true or false, got a string"),
        (b'{"op":"resolve","id":"x","idempotencyKey":5}', "`idempotencyKey`: expected a string or null, got a number"),
        (b'{"op":"get","id":"x","replyPartition":-2}', "`replyPartition`: must be at least 0"),
        (b'{"op":"create","id":"x","timeout":1,"tags":{"a":1}}', '`tags["a"]`: expected a string, got a number'),
        (b'{"op":"create","id":"x","timeout":1,"param":[]}', "`param`: expected an object, got an array"),
        (
            b'{"op":"create","id":"x","timeout":1,"param":{"data":"not base64!"}}',
            "`param.data`: not valid base64",
        ),
        (b'{"op":"reject","id":"x","value":{"data":"YQ"}}', "`value.data`: not valid base64"),
        (
            record(op="resolve", id="x", value={"data": "A" * (4 * (512 * 1024 // 3 + 1))}),
            "`value.data`: must be at most 524288 bytes decoded, got 524289",
        ),
        (b" " * (ONE_MIB + 1), "record is 1048577 bytes, over the limit of 1048576"),
        (b'{"op":"get","id":NaN}', "not valid JSON: NaN and Infinity are not JSON numbers"),
        (b'{"op":"create","id":"a","timeout":' + b"1" * 5000 + b"}", "`timeout`: must be at most 9223372036854775807"),
        (b'{"op":"get","id":"a","x":' + b"1" * 5000 + b",}", "not valid JSON at byte 5026"),
        (b'{"op":"create","id":"a","timeout":1,"param":{"data":"YWJj="}}', "`param.data`: not valid base64"),
        (
            b'{"op":"zzz","op":"get","id":"a"}',
            "`op`: unknown op 'zzz', expected one of create, resolve, reject, cancel, get, subscribe, search",
        ),
        (b'{"op":"get","id":5,"id":"a"}', "`id`: expected a string, got a number"),
        (
            b'{"op":"get","id":"\\ud800"}',
            "not valid JSON: a string holds an unpaired surrogate escape (\\ud800 to \\udfff)",
        ),
        (b'{"op":"get","id":"x","replyTo":[]}', "`replyTo`: expected a string or null, got an array"),
        (
            b'{"op":"reject","id":"x","value":{"headers":{"a":null}}}',
            '`value.headers["a"]`: expected a string, got null',
        ),
    ],
)
def test_malformed_input_is_an_invalid_command_naming_the_problem(data: bytes, message: str) -> None:
    with pytest.raises(InvalidCommand) as raised:
        decode_command(data)
    assert str(raised.value) == message


def test_an_id_of_exactly_256_utf8_bytes_is_accepted() -> None:
    assert decode_command(record(op="get", id="é" * 128)).id == "é" * 128


def test_data_of_exactly_the_limit_is_accepted() -> None:
    data = b"\x01" * (512 * 1024)
    command = decode_command(encode(Resolve("x", value=Value({}, data))))
    assert isinstance(command, Resolve) and command.value.data == data


def test_limits_are_configurable() -> None:
    limits = Limits(max_id_bytes=3, max_record_bytes=200, max_data_bytes=2)
    assert decode_command(b'{"op":"get","id":"abc"}', limits).id == "abc"
    for data, message in [
        (b'{"op":"get","id":"abcd"}', "`id`: must be at most 3 UTF-8 bytes, got 4"),
        (encode(Create("x", param=Value({}, b"abc"), timeout=1)), "`param.data`: must be at most 2 bytes"),
        (b'{"op":"get","id":"x"}'.ljust(201), "record is 201 bytes, over the limit of 200"),
    ]:
        with pytest.raises(InvalidCommand, match="^" + message.replace("[", r"\[")):
            decode_command(data, limits)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
BASE64 = st.binary(max_size=30).map(lambda data: base64.b64encode(data).decode())
VALUE_LIKE = st.fixed_dictionaries(
    {},
    optional={
        "headers": st.dictionaries(st.text(max_size=5), st.text(max_size=5)) | JSON_VALUES,
        "data": BASE64 | st.text() | JSON_VALUES,
    },
)
# Mostly well-typed fields, each sometimes replaced by any JSON value, so decoding gets deep and sometimes succeeds.
COMMAND_LIKE = st.fixed_dictionaries(
    {"op": st.sampled_from([*OPS, "search"]), "id": st.text(max_size=300) | JSON_VALUES},
    optional={
        "requestId": st.text(max_size=10) | JSON_VALUES,
        "replyTo": st.text(max_size=10) | JSON_VALUES,
        "replyPartition": st.integers(-1, 2**31) | JSON_VALUES,
        "idempotencyKey": st.none() | st.text(max_size=10) | JSON_VALUES,
        "strict": st.booleans() | JSON_VALUES,
        "timeout": st.integers() | JSON_VALUES,
        "param": VALUE_LIKE | JSON_VALUES,
        "value": VALUE_LIKE | JSON_VALUES,
        "tags": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3) | JSON_VALUES,
    },
)


# dp's own sentences: none falls back to "see docs/wire.md", which would mean dp found no reason of its
# own where msgspec refused, and none repeats msgspec's wording (capitalised, "Expected `int`").
DP_REASONS = re.compile(r"not valid JSON(:| at)|not a JSON object: got |`[^`]+`: [a-z]|record is \d+ bytes")


def assert_decodes_or_is_invalid(data: bytes) -> None:
    try:
        command = decode_command(data)
    except InvalidCommand as error:
        assert DP_REASONS.match(str(error)), str(error)
    else:
        assert isinstance(command, get_args(Command))
    request_id, reply_to, partition = reply_address(data)
    assert request_id is None or isinstance(request_id, str)
    assert reply_to is None or isinstance(reply_to, str)
    assert partition is None or (type(partition) is int and partition >= 0)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_only_invalid_command(data: bytes) -> None:
    assert_decodes_or_is_invalid(data)


@settings(max_examples=300)
@given(JSON_VALUES)
def test_arbitrary_json_values_decode_or_raise_only_invalid_command(value: object) -> None:
    assert_decodes_or_is_invalid(json.dumps(value).encode())


@settings(max_examples=300)
@given(COMMAND_LIKE)
def test_command_shaped_json_decodes_or_raises_only_invalid_command(value: dict[str, object]) -> None:
    assert_decodes_or_is_invalid(json.dumps(value).encode())


# --- answering malformed commands ------------------------------------------------------------------


def test_the_reply_address_is_recovered_from_a_command_that_fails_validation() -> None:
    data = b'{"op":"frobnicate","requestId":"r-9","replyTo":"their.replies","replyPartition":2}'
    assert reply_address(data) == ("r-9", "their.replies", 2)


@pytest.mark.parametrize(
    "data",
    [
        b"garbage",
        b"[1]",
        b'{"requestId":7,"replyTo":["x"],"replyPartition":true}',
        b'{"requestId":null,"replyPartition":-1}',
        b'{"replyPartition":99999999999999999999}',
    ],
)
def test_the_reply_address_is_empty_where_nothing_of_the_right_type_is_found(data: bytes) -> None:
    assert reply_address(data) == (None, None, None)


# --- statuses and the committed schema -------------------------------------------------------------


def test_ok_statuses_are_wire_statuses() -> None:
    statuses = set(get_args(Status))
    assert statuses > OK_STATUSES
    assert {"created", "resolved", "rejected", "canceled", "deduplicated", "found", "unchanged"} == OK_STATUSES


def test_the_committed_json_schema_is_generated_from_the_types() -> None:
    committed = Path(__file__).resolve().parents[2] / "docs" / "wire.schema.json"
    assert committed.read_text(encoding="utf-8") == schema.generate(), "run `python -m dp.schema`"
