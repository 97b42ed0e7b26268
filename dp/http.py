"""The HTTP contract (docs/http.md), pure: requests in, wire commands out; replies in, responses out.

The gateway (`consumers/gateway.py`) speaks Resonate's durable promise HTTP API by turning each request
into a wire command (`dp.wire`) or a search (`dp.search.Query`), sending it through the client, and
rendering the reply. Everything that decides *what* a request means or *what* a response says lives
here, without a socket or an event loop, so that the whole contract (`tests/http_cases.py`) runs
against this module in microseconds and against the running gateway end to end with the same rows.

A request reaches this module as plain pieces: the path id, the headers as a case-insensitive mapping
(aiohttp's `CIMultiDictProxy`, `multidict.CIMultiDict`) and the body bytes; `dp.http_query` reads the
query string. Anything malformed raises `BadRequest`, whose message says what to fix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar
from urllib.parse import parse_qs, urlsplit

import msgspec

from dp.errors import ClientClosed, CommandInDoubt, DpError, Refused, SearchBusy
from dp.explain import invalid_document, malformed_json
from dp.search import BadCursor
from dp.wire import (
    DEFAULT_LIMITS,
    Cancel,
    Create,
    Event,
    Get,
    Limits,
    Millis,
    Promise,
    PromiseId,
    Reject,
    Reply,
    Resolve,
    State,
    Subscribe,
    Target,
    TopicTarget,
    Value,
    WebhookTarget,
    encode,
)

# --- error codes and the error body -----------------------------------------------------------------

INVALID: Final = 40000
UNAUTHORIZED: Final = 40100
ALREADY_RESOLVED: Final = 40301
ALREADY_REJECTED: Final = 40302
ALREADY_CANCELED: Final = 40303
ALREADY_TIMEDOUT: Final = 40304
NOT_FOUND: Final = 40400
METHOD_NOT_ALLOWED: Final = 40500
ALREADY_EXISTS: Final = 40900
TOO_LARGE: Final = 41300
INTERNAL: Final = 50000
UNAVAILABLE: Final = 50300
NO_ANSWER: Final = 50400


class Detail(msgspec.Struct, frozen=True, gc=False):
    """One field that failed validation (`field` is a dotted path into the body, or a parameter name)."""

    field: str
    message: str


class ErrorInfo(msgspec.Struct, frozen=True, gc=False):
    code: int
    message: str
    details: list[Detail] = []


class ErrorBody(msgspec.Struct, frozen=True, gc=False):
    """Every error response: `code` is the HTTP status times 100 plus a reason (40304: already timed out)."""

    error: ErrorInfo


class HttpError(DpError):
    """An answer that is an error: its HTTP status, the contract's code, one sentence, the failed fields,
    and response headers it needs (a 401's `WWW-Authenticate`)."""

    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        details: Iterable[Detail] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = list(details)
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        return error_body(self.code, self.message, self.details)


class BadRequest(HttpError):
    """A malformed request (400, code 40000): the message says what to fix, `details` which fields."""

    def __init__(self, message: str, details: Iterable[Detail] = ()) -> None:
        super().__init__(400, INVALID, message, details)


def unauthorized() -> HttpError:
    """A request without one of the gateway's bearer tokens."""
    return HttpError(
        401,
        UNAUTHORIZED,
        "this gateway needs a token: send `Authorization: Bearer <token>`.",
        headers={"WWW-Authenticate": 'Bearer realm="dp"'},
    )


def error_body(code: int, message: str, details: Iterable[Detail] = ()) -> bytes:
    return encode(ErrorBody(ErrorInfo(code, message, list(details))))


# --- rendering ---------------------------------------------------------------------------------------


class ValueView(msgspec.Struct, frozen=True, gc=False, omit_defaults=True):
    """A payload as Resonate renders it: `headers` omitted when empty, `data` (base64) when empty."""

    headers: dict[str, str] = {}
    data: bytes | None = None


class PromiseView(msgspec.Struct, frozen=True, gc=False, omit_defaults=True, rename="camel", kw_only=True):
    """A promise as Resonate renders it: null keys and `completedOn` omitted, `tags` omitted when empty."""

    id: str
    state: State
    param: ValueView
    value: ValueView
    timeout: int
    idempotency_key_for_create: str | None = None
    idempotency_key_for_complete: str | None = None
    tags: dict[str, str] = {}
    created_on: int
    completed_on: int | None = None


class SearchPage(msgspec.Struct, frozen=True, gc=False):
    """A search answer: `promises` newest first (`[]` when none match); `cursor` null on the last page."""

    promises: list[PromiseView]
    cursor: str | None


class Status(msgspec.Struct, frozen=True, gc=False):
    """The body of `GET /ping` and of the health checks."""

    status: str


_EMPTY: Final = ValueView()


def _value_view(value: Value) -> ValueView:
    if not value.headers and not value.data:
        return _EMPTY
    return ValueView(value.headers, value.data or None)


def view(promise: Promise) -> PromiseView:
    """The one rendering of a promise, the same in every response (create, complete, get, search, events)."""
    return PromiseView(
        id=promise.id,
        state=promise.state,
        param=_value_view(promise.param),
        value=_value_view(promise.value),
        timeout=promise.timeout,
        idempotency_key_for_create=promise.idempotency_key_for_create,
        idempotency_key_for_complete=promise.idempotency_key_for_complete,
        tags=promise.tags,
        created_on=promise.created_on,
        completed_on=promise.completed_on,
    )


def render_promise(promise: Promise) -> bytes:
    return encode(view(promise))


def render_page(promises: Iterable[Promise], cursor: str | None) -> bytes:
    return encode(SearchPage([view(promise) for promise in promises], cursor))


class CallbackView(msgspec.Struct, frozen=True, gc=False, rename="camel"):
    """A subscription as Resonate's API shows it (`timeout` is echoed: dp notifies whenever it completes)."""

    id: str
    promise_id: str
    timeout: int
    created_on: int


class SubscriptionBody(msgspec.Struct, frozen=True, gc=False):
    """The response of the subscribe and callback routes: the subscription still waiting (null once the
    promise is completed: it was notified then) and the promise."""

    callback: CallbackView | None
    promise: PromiseView


def render_event(event: Event) -> bytes:
    """One Server-Sent Events message: `event: <type>` and the rendered promise as its one data line."""
    return b"event: " + event.type.encode() + b"\ndata: " + render_promise(event.promise) + b"\n\n"


# --- replies to responses ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """A response to write: HTTP status and JSON body."""

    status: int
    body: bytes


Action = Literal["create", "complete", "get"]
_OK: Final[dict[Action, dict[str, int]]] = {
    "create": {"created": 201, "deduplicated": 200},
    "complete": {"resolved": 201, "rejected": 201, "canceled": 201, "deduplicated": 200},
    "get": {"found": 200},
}
_REFUSED_COMPLETE: Final = {
    "already_resolved": (ALREADY_RESOLVED, "has already been resolved"),
    "already_rejected": (ALREADY_REJECTED, "has already been rejected"),
    "already_canceled": (ALREADY_CANCELED, "has already been canceled"),
    "already_timedout": (ALREADY_TIMEDOUT, "has already timed out"),
}
_EXISTS: Final = {
    "already_pending": "pending, created with another idempotency key",
    "already_resolved": "resolved",
    "already_rejected": "rejected",
    "already_canceled": "canceled",
    "already_timedout": "timed out",
}


def answer(action: Action, reply: Reply, promise_id: str) -> Answer:
    """The response to the processor's reply to a create, a completion or a read (docs/http.md tables)."""
    status = _OK[action].get(reply.status)
    if status is not None and reply.promise is not None:
        return Answer(status, render_promise(reply.promise))
    refused = _refusal(action, reply, promise_id)
    return Answer(refused.status, refused.body())


def subscribed(reply: Reply, promise_id: str, timeout: int) -> Answer:
    """The response to a subscribe: 201 when a subscription now waits for the promise, 200 when it already
    did or the promise is completed (notified at once, or before), 404 without the promise."""
    if reply.status in ("created", "deduplicated") and reply.promise is not None:
        waiting = reply.subscription
        callback = None if waiting is None else CallbackView(waiting.id, promise_id, timeout, waiting.created_on)
        status = 201 if reply.status == "created" and waiting is not None else 200
        return Answer(status, encode(SubscriptionBody(callback, view(reply.promise))))
    refused = _refusal("get", reply, promise_id)
    return Answer(refused.status, refused.body())


def _refusal(action: Action, reply: Reply, promise_id: str) -> HttpError:
    subject = f"promise {promise_id!r}"
    if reply.status == "invalid":
        return BadRequest(f"the command was refused as invalid ({reply.error or 'no reason given'}): fix the request.")
    if reply.status == "not_found":
        fix = "create it first with POST /promises" if action == "complete" else "check the id, or create it first"
        return HttpError(404, NOT_FOUND, f"{subject} was not found: {fix}.")
    if action == "create" and reply.status in _EXISTS:
        return HttpError(
            409,
            ALREADY_EXISTS,
            f"{subject} already exists ({_EXISTS[reply.status]}): create it under another id, or repeat the "
            "create with its Idempotency-Key (and no Strict, once it is completed) to get it back.",
        )
    if action == "complete" and reply.status in _REFUSED_COMPLETE:
        code, what = _REFUSED_COMPLETE[reply.status]
        return HttpError(
            403, code, f"{subject} {what}: a promise completes once; read its outcome with GET /promises/{promise_id}."
        )
    return HttpError(
        500,
        INTERNAL,
        f"the processor answered {reply.status!r} to a {action}, which this gateway cannot map: report it.",
    )


def failure(error: Exception, closed: str = "the gateway is shutting down: retry in a moment.") -> HttpError:
    """What an exception out of the client answers; a 500 is a bug, which the caller logs with its cause.
    `closed` is the message for a client that has closed (the gateway is stopping)."""
    if isinstance(error, HttpError):
        return error
    if isinstance(error, BadCursor):
        return BadRequest(str(error), [Detail("cursor", "not a cursor this deployment made")])
    if isinstance(error, SearchBusy):
        return HttpError(503, UNAVAILABLE, str(error))
    if isinstance(error, CommandInDoubt):
        return HttpError(504, NO_ANSWER, str(error))
    if isinstance(error, ClientClosed):
        return HttpError(503, UNAVAILABLE, closed)
    if isinstance(error, Refused) and error.reply.status == "invalid":
        return BadRequest(f"the command was refused as invalid ({error.reply.error}): fix the request.")
    return HttpError(
        500, INTERNAL, "the gateway failed to answer (logged with its cause): retry, and report it if it persists."
    )


# --- request headers ---------------------------------------------------------------------------------

_TRUE: Final = frozenset(("true", "1", "t"))
_FALSE: Final = frozenset(("false", "0", "f"))


def strict(headers: Mapping[str, str]) -> bool:
    """The `Strict` header: true/false/1/0/t/f in any case; absent is false; anything else is a 400."""
    raw = headers.get("Strict")
    if raw is None:
        return False
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise BadRequest(
        f"the Strict header is {raw!r}: send true or false (1/0, t/f, any case), or leave it out.",
        [Detail("Strict", "expected true or false")],
    )


def idempotency_key(headers: Mapping[str, str]) -> str | None:
    """The `Idempotency-Key` header: absent is None (⊥, matches nothing), present but empty is the key ``""``."""
    return headers.get("Idempotency-Key")


def request_id(headers: Mapping[str, str]) -> str | None:
    """The `Request-Id` header, the command's correlation id; None (absent or empty) lets the client make one."""
    return headers.get("Request-Id") or None


# --- request bodies and path ids ---------------------------------------------------------------------


class ValueInput(msgspec.Struct, frozen=True, gc=False):
    """A payload in a request: either field may be null or absent; `data` is padded base64 (`""`: empty)."""

    headers: dict[str, str] | None = None
    data: bytes | None = None


class CreateRequest(msgspec.Struct, frozen=True, gc=False):
    """The body of `POST /promises`: `id` (`/` allowed) and `timeout` (absolute, epoch milliseconds) are
    required; `param` and `tags` may be null or absent; unknown fields are ignored."""

    id: PromiseId
    timeout: Millis
    param: ValueInput | None = None
    tags: dict[str, str] | None = None


class CompleteRequest(msgspec.Struct, frozen=True, gc=False):
    """The body of `PATCH /promises/{id}`: `state` is RESOLVED, REJECTED or REJECTED_CANCELED, read in any
    case; `value` may be null or absent."""

    state: str
    value: ValueInput | None = None


class RecvObject(msgspec.Struct, frozen=True, gc=False):
    """Resonate's structured `recv`: `{"type": "http", "data": {"url", "headers"}}`, or dp's
    `{"type": "kafka", "data": {"topic", "partition", "key"}}`."""

    type: str
    data: dict[str, Any] = {}


Recv = str | RecvObject


class SubscribeRequest(msgspec.Struct, frozen=True, gc=False):
    """The body of `POST /promises/subscribe/{id}`: the subscription's `id` and where to deliver (`recv`)."""

    id: PromiseId
    recv: Recv
    timeout: Millis = 0


class CallbackRequest(msgspec.Struct, frozen=True, gc=False, rename="camel"):
    """The body of `POST /promises/callback/{id}`: one callback per root promise (`rootPromiseId`)."""

    root_promise_id: PromiseId
    recv: Recv
    timeout: Millis = 0


_CREATES: Final = msgspec.json.Decoder(CreateRequest)
_SUBSCRIBES: Final = msgspec.json.Decoder(SubscribeRequest)
_CALLBACKS: Final = msgspec.json.Decoder(CallbackRequest)
_COMPLETES: Final = msgspec.json.Decoder(CompleteRequest)
_COMPLETIONS: Final[dict[str, type[Resolve | Reject | Cancel]]] = {
    "RESOLVED": Resolve, "REJECTED": Reject, "REJECTED_CANCELED": Cancel
}  # fmt: skip
_DETAIL: Final = re.compile(r"`([^`]*)`: (.*)", re.DOTALL)
_T = TypeVar("_T")
# What the client adds to a command beyond its encoding here: replyTo (a topic name, at most 249 characters)
# and replyPartition. A body this much under the record limit needs no exact check: a command's JSON is
# its body's, give or take the fields the wire always writes and the idempotency key and request id.
_ENVELOPE_BYTES: Final = 320
_SLACK_BYTES: Final = 2048


def _decode(decoder: msgspec.json.Decoder[_T], body: bytes, target: type) -> _T:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError:
        problem = invalid_document(body, target)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        problem = malformed_json(body)
    found = _DETAIL.fullmatch(problem)
    if found is None:
        raise BadRequest(f"the body is {problem}; send one JSON object as docs/http.md describes.")
    raise BadRequest(f"`{found[1]}` in the body: {found[2]}; fix it and retry.", [Detail(found[1], found[2])])


def check_id(promise_id: str, limits: Limits = DEFAULT_LIMITS) -> str:
    """A promise id from a path or a body: non-empty, at most `limits.max_id_bytes` in UTF-8."""
    if not promise_id:
        raise BadRequest("the promise id is empty: name a promise.", [Detail("id", "must not be empty")])
    size = len(promise_id.encode("utf-8", "surrogatepass"))
    if size > limits.max_id_bytes:
        raise BadRequest(
            f"the promise id is {size} UTF-8 bytes, over the limit of {limits.max_id_bytes}: use a shorter id.",
            [Detail("id", f"must be at most {limits.max_id_bytes} UTF-8 bytes")],
        )
    return promise_id


def _value(given: ValueInput | None, field: str, limits: Limits) -> Value:
    if given is None:
        return Value()
    if given.data is not None and len(given.data) > limits.max_data_bytes:
        raise BadRequest(
            f"`{field}.data` is {len(given.data)} bytes decoded, over the limit of {limits.max_data_bytes}: "
            "store large payloads elsewhere and pass a reference.",
            [Detail(f"{field}.data", f"must be at most {limits.max_data_bytes} bytes decoded")],
        )
    return Value(given.headers or {}, given.data)


def _check_record(command: Create | Resolve | Reject | Cancel, body: bytes, limits: Limits) -> None:
    """A command too big for the commands topic is refused here, before the log (exact only for big bodies)."""
    extra = len(command.idempotency_key or "") + len(command.request_id or "")
    if len(body) + extra + _SLACK_BYTES <= limits.max_record_bytes:
        return
    size = len(encode(command)) + _ENVELOPE_BYTES
    if size > limits.max_record_bytes:
        raise BadRequest(
            f"the command would be about {size} bytes, over the record limit of {limits.max_record_bytes}: "
            "send less data, headers or tags."
        )


def create_command(body: bytes, headers: Mapping[str, str], limits: Limits = DEFAULT_LIMITS) -> Create:
    """`POST /promises`: the body and the Idempotency-Key, Strict and Request-Id headers as a create."""
    given = _decode(_CREATES, body, CreateRequest)
    command = Create(
        check_id(given.id, limits),
        timeout=given.timeout,
        param=_value(given.param, "param", limits),
        tags=given.tags or {},
        idempotency_key=idempotency_key(headers),
        strict=strict(headers),
        request_id=request_id(headers),
    )
    _check_record(command, body, limits)
    return command


def complete_command(
    promise_id: str, body: bytes, headers: Mapping[str, str], limits: Limits = DEFAULT_LIMITS
) -> Resolve | Reject | Cancel:
    """`PATCH /promises/{id}`: the body's state picks resolve, reject or cancel."""
    check_id(promise_id, limits)
    given = _decode(_COMPLETES, body, CompleteRequest)
    kind = _COMPLETIONS.get(given.state.upper())
    if kind is None:
        raise BadRequest(
            f"the body's `state` is {given.state!r}: send RESOLVED, REJECTED or REJECTED_CANCELED.",
            [Detail("state", "expected RESOLVED, REJECTED or REJECTED_CANCELED")],
        )
    command = kind(
        promise_id,
        value=_value(given.value, "value", limits),
        idempotency_key=idempotency_key(headers),
        strict=strict(headers),
        request_id=request_id(headers),
    )
    _check_record(command, body, limits)
    return command


def get_command(promise_id: str, headers: Mapping[str, str], limits: Limits = DEFAULT_LIMITS) -> Get:
    """`GET /promises/{id}`."""
    return Get(check_id(promise_id, limits), request_id=request_id(headers))


def subscribe_command(
    promise_id: str, body: bytes, headers: Mapping[str, str], *, callback: bool, limits: Limits = DEFAULT_LIMITS
) -> tuple[Subscribe, int]:
    """`POST /promises/subscribe/{id}` (subscription id: the body's `id`) or `POST /promises/callback/{id}`
    (subscription id: `__resume:` + `rootPromiseId`, one per root), with the timeout to echo."""
    check_id(promise_id, limits)
    if callback:
        given_callback = _decode(_CALLBACKS, body, CallbackRequest)
        subscription, recv, timeout = (
            f"__resume:{given_callback.root_promise_id}",
            given_callback.recv,
            given_callback.timeout,
        )
    else:
        given = _decode(_SUBSCRIBES, body, SubscribeRequest)
        subscription, recv, timeout = given.id, given.recv, given.timeout
    command = Subscribe(promise_id, subscription=subscription, target=target_of(recv), request_id=request_id(headers))
    return command, timeout


def target_of(recv: Recv) -> Target:
    """A `recv` as a subscription target: an http(s) URL, `kafka://topic[?partition=N&key=K]`, or the object
    forms. Resonate's logical receivers (`poll://`, a group name) have no meaning here: a 400 says so."""
    if isinstance(recv, RecvObject):
        return _object_target(recv)
    try:
        scheme = urlsplit(recv).scheme.lower()
    except ValueError:  # e.g. an unclosed IPv6 bracket
        scheme = ""
    if scheme in ("http", "https"):
        return WebhookTarget(recv)
    if scheme == "kafka":
        return _kafka_url(recv)
    raise BadRequest(
        f"`recv` is {recv[:100]!r}: dp delivers to an http:// or https:// URL (a webhook) or to kafka://topic; "
        "Resonate's polling receivers are not served.",
        [Detail("recv", 'expected an http(s):// URL, kafka://topic or {"type", "data"}')],
    )


def _kafka_url(recv: str) -> TopicTarget:
    parts = urlsplit(recv)
    query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    topic = parts.netloc + parts.path
    partition = query.get("partition")
    if not topic or (partition is not None and not (partition.isascii() and partition.isdigit())):
        raise BadRequest(
            f"`recv` is {recv[:100]!r}: write kafka://<topic>, optionally ?partition=<n>&key=<key>.",
            [Detail("recv", "expected kafka://<topic>[?partition=<n>&key=<key>]")],
        )
    return TopicTarget(topic, int(partition) if partition is not None else None, query.get("key"))


_TARGETS: Final = msgspec.json.Decoder(Target)


def _object_target(recv: RecvObject) -> Target:
    kind = {"http": "webhook", "https": "webhook"}.get(recv.type.lower(), recv.type.lower())
    try:
        return _TARGETS.decode(encode({"type": kind, **recv.data}))
    except msgspec.ValidationError as error:
        raise BadRequest(
            f'`recv` is not a receiver dp knows ({error}): send {{"type": "http", "data": {{"url": ...}}}} '
            'or {"type": "kafka", "data": {"topic": ...}}.',
            [Detail("recv", str(error))],
        ) from None
