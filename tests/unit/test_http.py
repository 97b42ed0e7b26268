"""The HTTP contract against the pure mapping: every row of tests/http_cases.py that needs no server, with
the pure state machine and search core answering as the processor would; then the rules the table does
not reach (rendering of odd records, header and parameter parsing, client errors, size limits)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

import msgspec
import pytest
from multidict import CIMultiDict

from dp import http, openapi
from dp.errors import ClientClosed, ReplyTimeout, SearchBusy, SendFailed
from dp.http_query import events_filter, search_request, wait_seconds
from dp.machine import reply_for, transition
from dp.search import (
    PAGE_BYTES,
    BadCursor,
    Query,
    before,
    compile_pattern,
    decode_cursor,
    encode_cursor,
    merge,
    order_key,
    partition_page,
    position,
)
from dp.subscriptions import NONE, Subscribers, subscribe
from dp.wire import Create, Event, Get, Limits, Promise, Reply, Resolve, Subscribe, Value
from tests.http_cases import Case, Step, cases
from tests.support import Scene, mismatches


class PureFace:
    """What the gateway does with a request, minus aiohttp and Kafka: dp.http makes the command, the pure
    state machine (or the pure search core, over one partition) answers it, dp.http renders the answer."""

    def __init__(self) -> None:
        self.store: dict[str, Promise] = {}
        self.subscribers: dict[str, Subscribers] = {}
        self.key = os.urandom(16)

    def request(self, method: str, target: str, headers: CIMultiDict[str], body: bytes) -> tuple[int, bytes]:
        url = urlsplit(target)
        params = parse_qsl(url.query, keep_blank_values=True)
        try:
            if url.path == "/promises":
                if method == "POST":
                    command = http.create_command(body, headers)
                    return self._answer("create", command, command.id)
                return 200, self._search(search_request(params))
            for route, callback in (("/promises/subscribe/", False), ("/promises/callback/", True)):
                if url.path.startswith(route):
                    promise_id = unquote(url.path.removeprefix(route))
                    subscribing, timeout = http.subscribe_command(promise_id, body, headers, callback=callback)
                    return self._subscribe(subscribing, timeout)
            promise_id = unquote(url.path.removeprefix("/promises/"))
            if method == "PATCH":
                return self._answer("complete", http.complete_command(promise_id, body, headers), promise_id)
            return self._answer("get", http.get_command(promise_id, headers), promise_id)
        except Exception as error:
            failed = http.failure(error)
            assert failed.status != 500, f"{method} {target}: {error!r}"
            return failed.status, failed.body()

    def _answer(self, action: http.Action, command: Create | Resolve | Get, promise_id: str) -> tuple[int, bytes]:
        outcome = transition(self.store.get(command.id), command, _now())
        if outcome.promise is not None:
            self.store[command.id] = outcome.promise
        answer = http.answer(action, reply_for(command, outcome), promise_id)
        return answer.status, answer.body

    def _subscribe(self, command: Subscribe, timeout: int) -> tuple[int, bytes]:
        promise = self.store.get(command.id)
        judged = subscribe(promise, self.subscribers.get(command.id, NONE), command, _now(), 100)
        self.subscribers[command.id] = judged.after
        reply = Reply(None, "subscribe", command.id, True, judged.status, promise, subscription=judged.waiting)
        answer = http.subscribed(reply, command.id, timeout)
        return answer.status, answer.body

    def _search(self, asked: Query | str) -> bytes:
        after = None
        query, after = decode_cursor(asked, self.key) if isinstance(asked, str) else (asked, None)
        matches = compile_pattern(query.pattern).fullmatch
        ordered = sorted((p for p in self.store.values() if matches(p.id)), key=order_key, reverse=True)
        while True:
            candidates = [(position(p), p) for p in ordered if before(position(p), after)]
            page = partition_page(query, candidates, _now(), PAGE_BYTES)
            promises, resume = merge(query.limit, [page], PAGE_BYTES)
            if promises or resume is None:
                break
            after = resume
        return http.render_page(promises, encode_cursor(query, resume, self.key) if resume is not None else None)


def _now() -> int:
    return int(time.time() * 1000)


def run(face: PureFace, scene: Scene, step: Step) -> tuple[int, bytes]:
    body = step.body if isinstance(step.body, bytes) or step.body is None else json.dumps(scene.value(step.body))
    raw = body.encode() if isinstance(body, str) else (body or b"")
    status, answer = face.request(step.method, scene.text(step.path), CIMultiDict(scene.headers(step)), raw)
    document = json.loads(answer)
    if isinstance(document, dict) and isinstance(document.get("cursor"), str):
        scene.cursor = document["cursor"]
    return status, answer


@pytest.mark.parametrize("case", cases("pure"), ids=lambda case: case.name)
def test_the_contract_against_the_pure_mapping(case: Case) -> None:
    face, scene = PureFace(), Scene("p-row", _now())
    for step in case.given:
        status, answer = run(face, scene, step)
        assert status < 300, f"setting the scene failed: {step} → {status} {answer!r}"
    status, answer = run(face, scene, case.request)
    assert mismatches(case, scene, status, json.loads(answer)) == []


def test_the_table_reaches_every_status_and_code_of_the_contract() -> None:
    reached = {(case.status, case.code) for case in cases("pure") + cases("gateway")}
    for status, code in [(200, None), (201, None), (400, 40000), (403, 40301), (403, 40302), (403, 40303),
                         (403, 40304), (404, 40400), (409, 40900), (405, 40500), (413, 41300)]:  # fmt: skip
        assert (status, code) in reached, (status, code)


# --- rendering --------------------------------------------------------------------------------------


def record(**fields: object) -> Promise:
    base: dict[str, object] = {
        "id": "a", "state": "PENDING", "param": Value(), "value": Value(), "timeout": 10,
        "idempotency_key_for_create": None, "idempotency_key_for_complete": None, "tags": {},
        "created_on": 1, "completed_on": None,
    }  # fmt: skip
    return Promise(**{**base, **fields})  # type: ignore[arg-type]


def test_a_promise_renders_with_null_and_empty_fields_omitted() -> None:
    assert json.loads(http.render_promise(record())) == {
        "id": "a", "state": "PENDING", "param": {}, "value": {}, "timeout": 10, "createdOn": 1,
    }  # fmt: skip
    full = record(
        state="RESOLVED", param=Value({"h": "v"}, b"\x00\x01"), value=Value({}, b""), tags={"t": "1"},
        idempotency_key_for_create="", idempotency_key_for_complete="k", completed_on=5,
    )  # fmt: skip
    assert json.loads(http.render_promise(full)) == {
        "id": "a", "state": "RESOLVED", "param": {"headers": {"h": "v"}, "data": "AAE="}, "value": {},
        "timeout": 10, "idempotencyKeyForCreate": "", "idempotencyKeyForComplete": "k", "tags": {"t": "1"},
        "createdOn": 1, "completedOn": 5,
    }  # fmt: skip


def test_a_page_always_has_a_list_and_a_cursor_key() -> None:
    assert json.loads(http.render_page([], None)) == {"promises": [], "cursor": None}
    assert json.loads(http.render_page([record()], "c"))["cursor"] == "c"


def test_an_event_is_one_server_sent_event_message() -> None:
    message = http.render_event(Event("created", record(), "r"))
    assert message == b"event: created\ndata: " + http.render_promise(record()) + b"\n\n"
    assert message.count(b"\n") == 3


def test_an_unexpected_reply_status_is_a_500_not_a_guess() -> None:
    answer = http.answer("get", Reply("r", "get", "a", False, "already_pending"), "a")
    assert answer.status == 500 and json.loads(answer.body)["error"]["code"] == 50000
    invalid = http.answer("create", Reply("r", "create", "a", False, "invalid", error="`id`: too long"), "a")
    assert invalid.status == 400 and "`id`: too long" in json.loads(invalid.body)["error"]["message"]


# --- headers, parameters, limits and client errors ------------------------------------------------------


def test_request_headers() -> None:
    assert http.idempotency_key(CIMultiDict()) is None
    assert http.idempotency_key(CIMultiDict({"idempotency-key": ""})) == ""
    assert http.request_id(CIMultiDict({"REQUEST-ID": "r1"})) == "r1"
    assert http.request_id(CIMultiDict({"Request-Id": ""})) is None
    assert http.strict(CIMultiDict()) is False
    assert [http.strict(CIMultiDict({"strict": v})) for v in ("tRuE", "T", "1", "fAlSe", "f", "0")] == [True] * 3 + [
        False
    ] * 3
    for bad in ("", "yes", "2", "on"):
        with pytest.raises(http.BadRequest):
            http.strict(CIMultiDict({"Strict": bad}))


def test_commands_carry_the_headers() -> None:
    headers = CIMultiDict({"Idempotency-Key": "k", "Strict": "t", "Request-Id": "r"})
    command = http.complete_command("x/y", b'{"state": "resolved"}', headers)
    assert command == Resolve("x/y", request_id="r", idempotency_key="k", strict=True)
    assert http.get_command("x", headers) == Get("x", request_id="r")


def test_a_command_over_the_record_limit_is_refused_before_the_log() -> None:
    limits = Limits(max_record_bytes=4096, max_data_bytes=4096)
    body = json.dumps({"id": "a", "timeout": 1, "tags": {"t": "x" * 3900}}).encode()
    with pytest.raises(http.BadRequest, match="over the record limit of 4096"):
        http.create_command(body, CIMultiDict(), limits)
    assert http.create_command(json.dumps({"id": "a", "timeout": 1}).encode(), CIMultiDict(), limits).id == "a"


@pytest.mark.parametrize(
    ("given", "seconds"),
    [("500ms", 0.5), ("30s", 30.0), ("2m", 120.0), ("1.5", 1.5), ("1h", 300.0), ("0", None), ("", None)],
)
def test_wait_durations_are_cut_to_the_maximum(given: str, seconds: float | None) -> None:
    assert wait_seconds([("wait", given)], max_wait=300.0) == seconds


def test_no_wait_is_a_plain_read_and_a_bad_one_is_refused() -> None:
    assert wait_seconds([], 300.0) is None
    for bad in ("-1s", "soon", "1d", "1e3"):
        with pytest.raises(http.BadRequest):
            wait_seconds([("wait", bad)], 300.0)


def test_event_filters() -> None:
    assert events_filter([]) == (None, None)
    assert events_filter([("prefix", "order/"), ("types", "Resolved, rejected")]) == (
        "order/",
        ("resolved", "rejected"),
    )
    with pytest.raises(http.BadRequest, match="'done'"):
        events_filter([("types", "done")])


def test_a_search_reads_the_first_of_repeated_parameters_and_ignores_unknown_ones() -> None:
    query = search_request([("id", "a*"), ("id", "b*"), ("page", "3"), ("tags[x]", "1"), ("tags[x]", "1")])
    assert query == Query("a*", None, {"x": "1"}, 100)
    assert search_request([("cursor", ""), ("id", "c")]) == Query("c")


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (ReplyTimeout(30, "create", "a", "k"), 504, 50400),
        (SendFailed("Kafka failed", "get", "a", None), 504, 50400),
        (SearchBusy(8), 503, 50300),
        (ClientClosed(), 503, 50300),
        (BadCursor("unreadable"), 400, 40000),
        (RuntimeError("bug"), 500, 50000),
    ],
)
def test_client_errors_map_to_the_contract(error: Exception, status: int, code: int) -> None:
    answer = http.failure(error)
    assert (answer.status, answer.code) == (status, code)
    assert json.loads(answer.body())["error"]["message"].endswith(".")


def test_every_error_body_decodes_as_the_documented_type() -> None:
    body = http.error_body(40304, "m", [http.Detail("f", "why")])
    assert msgspec.json.decode(body, type=http.ErrorBody).error.details == [http.Detail("f", "why")]


def test_the_committed_openapi_document_is_generated_from_the_types() -> None:
    committed = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
    assert committed.read_text(encoding="utf-8") == openapi.generate(), "run `python -m dp.openapi`"
    document = json.loads(committed.read_text(encoding="utf-8"))
    assert document["openapi"].startswith("3.1")
    assert {"CreateRequest", "CompleteRequest", "PromiseView", "SearchPage", "ErrorBody"} <= set(
        document["components"]["schemas"]
    )
