"""The HTTP contract (docs/http.md) as one table of cases, run against every face.

`tests/unit/test_http.py` runs each row against the pure contract (`dp.http`, `dp.http_query`) with the
pure state machine and search core standing in for the processor, in microseconds; `tests/test_gateway.py`
runs the same rows against a real `dp gateway` and `dp serve` on the test broker. A row names the request,
the requests that set the scene first (`given`), and what the answer must be: its status, its error code,
a subset of its JSON (`expect`), keys it must not have (`absent`) and the fields its error details name.

Templates, which `tests.support.Scene` fills in: in any string, `{id}` is the row's own unique id
(`{id256}`/`{id257}`: padded to that many UTF-8 bytes) and `{cursor}` the cursor of the last answer that
had one; the string values `"{future}"` and `"{past}"` become timeouts an hour ahead and a second ago.
`tests.support.mismatches` checks an answer: in `expect`, `ANY` matches any value and `SOME` any value
but null; a list matches a list of the same length, item by item.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

BOTH: Final = frozenset(("pure", "gateway"))
GATEWAY: Final = frozenset(("gateway",))
"""Rows about what only the running server does: routing, body limits, long-poll, probes."""
ANY: Final = "<any>"
SOME: Final = "<not null>"
FUTURE: Final = "{future}"
PAST: Final = "{past}"
OVER_DATA: Final = base64.b64encode(b"x" * (512 * 1024 + 1)).decode()
AT_DATA: Final = base64.b64encode(b"x" * (512 * 1024)).decode()
ABSENT_ON_PENDING: Final = ("idempotencyKeyForComplete", "completedOn", "value.headers", "value.data")


@dataclass(frozen=True)
class Step:
    """One HTTP request: `body` is a JSON template (or raw bytes, sent as they are; None: no body)."""

    method: str
    path: str
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    name: str
    request: Step
    status: int
    code: int | None = None
    expect: Any = None
    absent: tuple[str, ...] = ()
    details: tuple[str, ...] | None = None
    given: tuple[Step, ...] = ()
    faces: frozenset[str] = BOTH


# --- the scenes rows start from --------------------------------------------------------------------


def create(
    id: str = "{id}", key: str | None = "ikc", timeout: str = FUTURE, headers: Mapping[str, str] = {}, **fields: Any
) -> Step:
    keyed = {} if key is None else {"Idempotency-Key": key}
    return Step("POST", "/promises", {"id": id, "timeout": timeout, **fields}, {**keyed, **headers})


def post(body: Any) -> Step:
    return Step("POST", "/promises", body)


def patch(body: Any) -> Step:
    return Step("PATCH", "/promises/{id}", body)


def get(path: str = "/promises/{id}") -> Step:
    return Step("GET", path)


def complete(state: str, id: str = "{id}", key: str | None = "iku", **headers: str) -> Step:
    given = {"Idempotency-Key": key} if key is not None else {}
    return Step("PATCH", f"/promises/{id}", {"state": state}, {**given, **headers})


PENDING: Final = (create(),)
RESOLVED: Final = (create(), complete("RESOLVED"))
REJECTED: Final = (create(), complete("REJECTED"))
CANCELED: Final = (create(), complete("REJECTED_CANCELED"))
TIMEDOUT: Final = (create(timeout=PAST),)
SEARCHABLE: Final = (
    create("{id}/a", tags={"color": "red", "size": "s"}),
    create("{id}/b", tags={"color": "blue"}),
    create("{id}/c/done", tags={"color": "red"}),
    complete("RESOLVED", "{id}/b"),
    complete("REJECTED_CANCELED", "{id}/c/done"),
    create("{id}/t", timeout=PAST),
)
"""Four promises, created in this order (search answers newest first): a (pending, red, small), b
(resolved, blue), c/done (canceled, red), t (timed out)."""


def _promise(id: str, state: str) -> dict[str, Any]:
    return {"id": id, "state": state}


def search(query: str) -> Step:
    return Step("GET", f"/promises?{query}")


def _create_cases() -> Iterator[Case]:
    yield Case(
        "create: minimal body",
        create(key=None),
        201,
        expect={"id": "{id}", "state": "PENDING", "param": {}, "value": {}, "timeout": SOME, "createdOn": SOME},
        absent=("idempotencyKeyForCreate", "tags", "param.headers", "param.data", *ABSENT_ON_PENDING),
    )
    yield Case(
        "create: everything",
        create(
            key="ik-1",
            headers={"Strict": "true", "Request-Id": "r-{id}"},
            param={"headers": {"a": "1"}, "data": "eyJ4IjoxfQ=="},
            tags={"resonate:invocation": "true"},
        ),
        201,
        expect={
            "param": {"headers": {"a": "1"}, "data": "eyJ4IjoxfQ=="},
            "idempotencyKeyForCreate": "ik-1",
            "tags": {"resonate:invocation": "true"},
        },
        absent=ABSENT_ON_PENDING,
    )
    yield Case(
        "create: param, tags and headers may be null",
        create(key=None, param={"headers": None, "data": None}, tags=None),
        201,
        expect={"param": {}},
        absent=("tags",),
    )
    yield Case("create: param null", create(param=None), 201, expect={"param": {}})
    yield Case("create: empty data is no data", create(param={"data": ""}), 201, expect={"param": {}})
    yield Case("create: unknown fields are ignored", create(extra={"x": 1}, iKey="k"), 201)
    yield Case("create: JSON whatever the Content-Type", create(headers={"Content-Type": "text/plain"}), 201)
    yield Case("create: 512 KiB of data", create(param={"data": AT_DATA}), 201)
    yield Case("create: an id of 256 bytes", create("{id256}"), 201, expect={"id": "{id256}"})
    yield Case(
        "create: a past timeout creates it timed out",
        create(timeout=PAST),
        201,
        expect={"state": "REJECTED_TIMEDOUT", "completedOn": SOME},
        absent=("idempotencyKeyForComplete",),
    )
    yield Case(
        "create: a timer promise resolves at a past timeout",
        create(timeout=PAST, tags={"resonate:timeout": "true"}),
        201,
        expect={"state": "RESOLVED"},
    )
    # refusals before the log
    for name, body, fields in (
        ("no timeout", {"id": "{id}"}, ("timeout",)),
        ("no id", {"timeout": FUTURE}, ("id",)),
        ("an empty id", {"id": "", "timeout": FUTURE}, ("id",)),
        ("a timeout that is text", {"id": "{id}", "timeout": "soon"}, ("timeout",)),
        ("a fractional timeout", {"id": "{id}", "timeout": 1.5}, ("timeout",)),
        ("a negative timeout", {"id": "{id}", "timeout": -1}, ("timeout",)),
        (
            "data that is not base64",
            {"id": "{id}", "timeout": FUTURE, "param": {"data": "not base64!"}},
            ("param.data",),
        ),
        ("a tag that is not text", {"id": "{id}", "timeout": FUTURE, "tags": {"a": 1}}, ('tags["a"]',)),
        ("a header that is not text", {"id": "{id}", "timeout": FUTURE, "param": {"headers": {"a": []}}}, None),
        ("an id of 257 bytes", {"id": "{id257}", "timeout": FUTURE}, ("id",)),
        ("data over 512 KiB", {"id": "{id}", "timeout": FUTURE, "param": {"data": OVER_DATA}}, ("param.data",)),
    ):
        yield Case(f"create refused: {name}", post(body), 400, 40000, details=fields)
    for name, raw in (
        ("malformed JSON", b'{"id": '),
        ("an empty body", b""),
        ("an array", b"[]"),
        ("not UTF-8", b"\xff"),
    ):
        yield Case(f"create refused: {name}", post(raw), 400, 40000, details=())
    yield Case(
        "create refused: Strict is not a boolean", create(headers={"Strict": "yes"}), 400, 40000, details=("Strict",)
    )
    for value in ("TRUE", "t", "1", "False", "F", "0"):
        yield Case(f"create: Strict {value!r} is a boolean", create(headers={"Strict": value}), 201)
    # outcomes on an existing promise
    yield Case("create: the same key deduplicates", create(), 200, expect={"state": "PENDING"}, given=PENDING)
    yield Case(
        "create: an empty key is a key",
        create(key=""),
        200,
        expect={"idempotencyKeyForCreate": ""},
        given=(create(key=""),),
    )
    yield Case(
        "create: no key matches nothing, not even no key", create(key=None), 409, 40900, given=(create(key=None),)
    )
    yield Case("create: another key on a pending promise", create(key="other"), 409, 40900, given=PENDING)
    yield Case(
        "create: the same key on a resolved promise, not strict",
        create(),
        200,
        expect={"state": "RESOLVED"},
        given=RESOLVED,
    )
    yield Case(
        "create: the same key on a resolved promise, strict",
        create(headers={"Strict": "1"}),
        409,
        40900,
        given=RESOLVED,
    )
    for state, scene in (
        ("resolved", RESOLVED),
        ("rejected", REJECTED),
        ("canceled", CANCELED),
        ("timedout", TIMEDOUT),
    ):
        yield Case(f"create: another key on a {state} promise", create(key="other"), 409, 40900, given=scene)


def _read_cases() -> Iterator[Case]:
    yield Case(
        "read: a pending promise",
        get(),
        200,
        expect={"id": "{id}", "state": "PENDING", "idempotencyKeyForCreate": "ikc"},
        absent=ABSENT_ON_PENDING,
        given=PENDING,
    )
    yield Case(
        "read: a resolved promise",
        get(),
        200,
        expect={"state": "RESOLVED", "idempotencyKeyForComplete": "iku", "completedOn": SOME},
        given=RESOLVED,
    )
    yield Case("read: no such promise", get(), 404, 40400)
    yield Case(
        "read: an id with slashes",
        get("/promises/{id}/a/b"),
        200,
        expect={"id": "{id}/a/b"},
        given=(create("{id}/a/b"),),
    )
    yield Case(
        "read: an id with %2F", get("/promises/{id}%2Fa"), 200, expect={"id": "{id}/a"}, given=(create("{id}/a"),)
    )
    yield Case("read: an id of 257 bytes", get("/promises/{id257}"), 400, 40000, details=("id",))
    yield Case(
        "read: a long-poll on a completed promise answers at once",
        get("/promises/{id}?wait=30s"),
        200,
        expect={"state": "RESOLVED"},
        given=RESOLVED,
        faces=GATEWAY,
    )
    yield Case(
        "read: a long-poll that times out answers the record as it is",
        get("/promises/{id}?wait=300ms"),
        200,
        expect={"state": "PENDING"},
        given=PENDING,
        faces=GATEWAY,
    )
    yield Case("read: a long-poll on no promise", get("/promises/{id}?wait=1"), 404, 40400, faces=GATEWAY)
    yield Case(
        "read: a long-poll with a malformed wait",
        get("/promises/{id}?wait=soon"),
        400,
        40000,
        details=("wait",),
        given=PENDING,
        faces=GATEWAY,
    )


def _complete_cases() -> Iterator[Case]:
    for state, given in (
        ("RESOLVED", "RESOLVED"),
        ("rejected", "REJECTED"),
        ("Rejected_Canceled", "REJECTED_CANCELED"),
    ):
        yield Case(
            f"complete: {state}",
            complete(state),
            201,
            expect={"state": given, "idempotencyKeyForComplete": "iku", "completedOn": SOME},
            given=PENDING,
        )
    yield Case(
        "complete: with a value",
        patch({"state": "RESOLVED", "value": {"headers": {"h": "v"}, "data": "ImRvbmUi"}}),
        201,
        expect={"value": {"headers": {"h": "v"}, "data": "ImRvbmUi"}},
        absent=("idempotencyKeyForComplete",),
        given=PENDING,
    )
    yield Case(
        "complete: a null value is an empty value",
        patch({"state": "RESOLVED", "value": None}),
        201,
        expect={"value": {}},
        given=PENDING,
    )
    yield Case("complete: no such promise", complete("RESOLVED"), 404, 40400)
    for name, body, fields in (
        ("no state", {"value": {}}, ("state",)),
        ("state PENDING", {"state": "PENDING"}, ("state",)),
        ("state REJECTED_TIMEDOUT", {"state": "REJECTED_TIMEDOUT"}, ("state",)),
        ("a state that is not text", {"state": 1}, ("state",)),
        ("value data that is not base64", {"state": "RESOLVED", "value": {"data": "%%"}}, ("value.data",)),
        ("data over 512 KiB", {"state": "RESOLVED", "value": {"data": OVER_DATA}}, ("value.data",)),
    ):
        yield Case(f"complete refused: {name}", patch(body), 400, 40000, details=fields, given=PENDING)
    yield Case("complete refused: an empty body", patch(b""), 400, 40000, given=PENDING)
    yield Case(
        "complete refused: Strict is not a boolean",
        complete("RESOLVED", Strict="maybe"),
        400,
        40000,
        details=("Strict",),
        given=PENDING,
    )
    for state, scene, code in (
        ("resolved", RESOLVED, 40301),
        ("rejected", REJECTED, 40302),
        ("canceled", CANCELED, 40303),
    ):
        yield Case(
            f"complete: another key on a {state} promise", complete("RESOLVED", key="other"), 403, code, given=scene
        )
    yield Case("complete: a timed-out promise, strict", complete("RESOLVED", Strict="true"), 403, 40304, given=TIMEDOUT)
    yield Case(
        "complete: a timed-out promise, not strict",
        complete("RESOLVED"),
        200,
        expect={"state": "REJECTED_TIMEDOUT"},
        given=TIMEDOUT,
    )
    yield Case(
        "complete: the same key deduplicates", complete("RESOLVED"), 200, expect={"state": "RESOLVED"}, given=RESOLVED
    )
    yield Case(
        "complete: the same key, another state, not strict, is the stored promise",
        complete("REJECTED"),
        200,
        expect={"state": "RESOLVED"},
        given=RESOLVED,
    )
    yield Case(
        "complete: the same key, another state, strict", complete("REJECTED", Strict="true"), 403, 40301, given=RESOLVED
    )
    yield Case(
        "complete: no key matches nothing",
        complete("RESOLVED", key=None),
        403,
        40301,
        given=(create(), complete("RESOLVED", key=None)),
    )


def _search_cases() -> Iterator[Case]:
    every = [
        _promise("{id}/t", "REJECTED_TIMEDOUT"),
        _promise("{id}/c/done", "REJECTED_CANCELED"),
        _promise("{id}/b", "RESOLVED"),
        _promise("{id}/a", "PENDING"),
    ]
    yield Case(
        "search: newest first", search("id={id}/*"), 200, expect={"promises": every, "cursor": None}, given=SEARCHABLE
    )
    yield Case("search: nothing matches", search("id={id}/*"), 200, expect={"promises": [], "cursor": None})
    yield Case(
        "search: a pattern with * inside",
        search("id={id}/*/done"),
        200,
        expect={"promises": [every[1]]},
        given=SEARCHABLE,
    )
    yield Case("search: an exact id", search("id={id}/a"), 200, expect={"promises": [every[3]]}, given=SEARCHABLE)
    for state, found in (("pending", [every[3]]), ("RESOLVED", [every[2]]), ("Rejected", every[:2])):
        yield Case(
            f"search: state={state}",
            search(f"id={{id}}/*&state={state}"),
            200,
            expect={"promises": found},
            given=SEARCHABLE,
        )
    yield Case(
        "search: a tag",
        search("id={id}/*&tags[color]=red"),
        200,
        expect={"promises": [every[1], every[3]]},
        given=SEARCHABLE,
    )
    yield Case(
        "search: every tag must match",
        search("id={id}/*&tags[color]=red&tags[size]=s"),
        200,
        expect={"promises": [every[3]]},
        given=SEARCHABLE,
    )
    yield Case(
        "search: a full page has a cursor",
        search("id={id}/*&limit=3"),
        200,
        expect={"promises": every[:3], "cursor": SOME},
        given=SEARCHABLE,
    )
    yield Case(
        "search: the cursor's page",
        search("cursor={cursor}"),
        200,
        expect={"promises": every[3:]},
        given=(*SEARCHABLE, search("id={id}/*&limit=3")),
    )
    yield Case(
        "search: the cursor wins over other parameters",
        search("cursor={cursor}&state=nonsense&limit=900"),
        200,
        expect={"promises": every[2:]},
        given=(*SEARCHABLE, search("id={id}/*&limit=2")),
    )
    yield Case(
        "search: limit=0 is the default",
        search("id={id}/*&limit=0"),
        200,
        expect={"promises": every, "cursor": None},
        given=SEARCHABLE,
    )
    for name, query, fields in (
        ("no id", "state=pending", ("id",)),
        ("an empty id", "id=", ("id",)),
        ("an unknown state", "id=x*&state=done", ("state",)),
        ("limit over 100", "id=x*&limit=101", ("limit",)),
        ("a negative limit", "id=x*&limit=-1", ("limit",)),
        ("a limit that is not a number", "id=x*&limit=ten", ("limit",)),
        ("a forged cursor", "cursor=Zm9v.YmFy", ("cursor",)),
        ("a tag given twice, differently", "id=x*&tags[a]=1&tags[a]=2", ("tags[a]",)),
    ):
        yield Case(f"search refused: {name}", search(query), 400, 40000, details=fields)


def _extra_cases() -> Iterator[Case]:
    yield Case("ping", get("/ping"), 200, expect={"status": "ok"}, faces=GATEWAY)
    yield Case("healthz", get("/healthz"), 200, expect={"status": "ok"}, faces=GATEWAY)
    yield Case("readyz", get("/readyz"), 200, expect={"status": "ok"}, faces=GATEWAY)
    yield Case("openapi.json", get("/openapi.json"), 200, expect={"openapi": "3.1.0"}, faces=GATEWAY)
    yield Case("an unknown route", get("/promise"), 404, 40400, faces=GATEWAY)
    yield Case("an unknown route under /promises", get("/promises/"), 404, 40400, faces=GATEWAY)
    yield Case("a method a route does not take", Step("DELETE", "/promises/{id}"), 405, 40500, faces=GATEWAY)
    yield Case("a body over the limit", Step("POST", "/promises", b"x" * (2 * 1024 * 1024)), 413, 41300, faces=GATEWAY)
    yield Case(
        "events: an unknown type", get("/events?types=resolved,done"), 400, 40000, details=("types",), faces=GATEWAY
    )


HOOK: Final = "http://127.0.0.1:9/hooks/{id}"


def subscribe(recv: Any = HOOK, id: str = "s1", path: str = "/promises/subscribe/{id}", **fields: Any) -> Step:
    return Step("POST", path, {"id": id, "recv": recv, **fields})


def callback(root: str = "root", recv: Any = HOOK) -> Step:
    return Step("POST", "/promises/callback/{id}", {"rootPromiseId": root, "recv": recv})


def _subscribe_cases() -> Iterator[Case]:
    waiting = {"id": "s1", "promiseId": "{id}", "timeout": 0, "createdOn": SOME}
    yield Case(
        "subscribe: a webhook on a pending promise",
        subscribe(timeout=5),
        201,
        expect={"callback": {**waiting, "timeout": 5}, "promise": {"id": "{id}", "state": "PENDING"}},
        given=PENDING,
    )
    yield Case(
        "subscribe: the same id again is the same subscription",
        subscribe(),
        200,
        expect={"callback": waiting, "promise": {"state": "PENDING"}},
        given=(*PENDING, subscribe()),
    )
    yield Case(
        "subscribe: a completed promise is notified at once",
        subscribe(),
        200,
        expect={"callback": None, "promise": {"state": "RESOLVED"}},
        given=RESOLVED,
    )
    yield Case(
        "subscribe: Resonate's structured recv",
        subscribe({"type": "http", "data": {"url": HOOK, "headers": {"x-token": "t"}}}),
        201,
        expect={"callback": waiting},
        given=PENDING,
    )
    yield Case(
        "callback: one per root promise",
        callback(),
        201,
        expect={"callback": {**waiting, "id": "__resume:root"}, "promise": {"state": "PENDING"}},
        given=PENDING,
    )
    yield Case("subscribe: no such promise", subscribe(), 404, 40400)
    yield Case("subscribe: recv is required", Step("POST", "/promises/subscribe/{id}", {"id": "s"}), 400, 40000,
               details=("recv",), given=PENDING)  # fmt: skip
    yield Case(
        "subscribe: a polling recv", subscribe("poll://any@default"), 400, 40000, details=("recv",), given=PENDING
    )
    yield Case(
        "subscribe: a recv that is no URL", subscribe("http://[::1"), 400, 40000, details=("recv",), given=PENDING
    )
    yield Case("subscribe: a kafka recv with a bad partition", subscribe("kafka://t?partition=²"), 400, 40000,
               details=("recv",), given=PENDING)  # fmt: skip
    yield Case("subscribe: an unknown recv type", subscribe({"type": "sqs", "data": {}}), 400, 40000,
               details=("recv",), given=PENDING)  # fmt: skip
    yield Case("callback: rootPromiseId is required", Step("POST", "/promises/callback/{id}", {"recv": HOOK}), 400,
               40000, details=("rootPromiseId",), given=PENDING)  # fmt: skip
    yield Case(
        "subscribe: a kafka topic that does not exist",
        subscribe("kafka://no-such-topic-{id}"),
        400,
        40000,
        given=PENDING,
        faces=GATEWAY,
    )
    yield Case(
        "subscribe: a URL the processor refuses",
        subscribe("http://"),
        400,
        40000,
        given=PENDING,
        faces=GATEWAY,
    )


CASES: Final[tuple[Case, ...]] = (
    *_create_cases(),
    *_read_cases(),
    *_complete_cases(),
    *_search_cases(),
    *_subscribe_cases(),
    *_extra_cases(),
)


def cases(face: str) -> list[Case]:
    return [case for case in CASES if face in case.faces]
