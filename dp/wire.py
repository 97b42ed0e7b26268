"""The wire contract (v1) as msgspec types: commands in, replies and events out, promise records.

Everything on Kafka is a UTF-8 JSON object with camelCase field names; unknown fields are ignored so
that older readers survive newer writers. `docs/wire.md` is the prose version of this module and
`docs/wire.schema.json` is generated from it (`python -m dp.schema`).

Decoders and the encoder are module-level and reused: building them per record costs more than the
decoding itself.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Literal, final, get_args
from urllib.parse import urlsplit

import msgspec

from dp.durations import duration_seconds
from dp.explain import invalid_document, malformed_json

State = Literal["PENDING", "RESOLVED", "REJECTED", "REJECTED_CANCELED", "REJECTED_TIMEDOUT"]
EventType = Literal["created", "resolved", "rejected", "canceled", "timedout"]
Status = Literal[
    "created",
    "resolved",
    "rejected",
    "canceled",
    "deduplicated",
    "found",
    "not_found",
    "already_pending",
    "already_resolved",
    "already_rejected",
    "already_canceled",
    "already_timedout",
    "invalid",
    "unchanged",
]
OK_STATUSES: Final[frozenset[str]] = frozenset(
    ("created", "resolved", "rejected", "canceled", "deduplicated", "found", "unchanged")
)
SearchState = Literal["pending", "resolved", "rejected"]
"""A search's state filter: `rejected` also matches canceled and timed-out promises."""
MAX_SEARCH_LIMIT: Final = 100

# Epoch milliseconds, bounded to a signed 64-bit long so that every Kafka client language can hold it.
Millis = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
PromiseId = Annotated[str, msgspec.Meta(min_length=1)]
Partition = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
# Any string decodes (a reader must not choke on a status added later); the schema lists the v1 set.
StatusText = Annotated[str, msgspec.Meta(extra_json_schema={"enum": list(get_args(Status))})]


class Value(msgspec.Struct, frozen=True, gc=False):
    """A payload: string headers plus opaque bytes, base64 on the wire."""

    headers: dict[str, str] = {}
    data: bytes | None = None


class Promise(msgspec.Struct, frozen=True, gc=False, rename="camel"):
    """A promise record, the same object over Kafka and HTTP; every field is always present."""

    id: str
    state: State
    param: Value
    value: Value
    timeout: Millis
    idempotency_key_for_create: str | None
    idempotency_key_for_complete: str | None
    tags: dict[str, str]
    created_on: int
    completed_on: int | None


class _Command(msgspec.Struct, frozen=True, gc=False, rename="camel", tag_field="op"):
    """Fields every command carries: the promise it targets and where to send the reply."""

    id: PromiseId
    request_id: str | None = None
    reply_to: str | None = None
    reply_partition: Partition | None = None


class _Keyed(_Command, frozen=True, kw_only=True):
    """An action of the specification: an idempotency key (null is ⊥, matching nothing) and `strict`."""

    idempotency_key: str | None = None
    strict: bool = False


@final
class Create(_Keyed, frozen=True, tag="create", kw_only=True):
    """Create a pending promise that times out at `timeout` (epoch ms)."""

    param: Value = Value()
    timeout: Millis
    tags: dict[str, str] = {}


class Completion(_Keyed, frozen=True, kw_only=True):
    """Complete a pending promise with `value`."""

    value: Value = Value()


@final
class Resolve(Completion, frozen=True, tag="resolve"):
    """Complete a pending promise as RESOLVED."""


@final
class Reject(Completion, frozen=True, tag="reject"):
    """Complete a pending promise as REJECTED."""


@final
class Cancel(Completion, frozen=True, tag="cancel"):
    """Complete a pending promise as REJECTED_CANCELED."""


@final
class Get(_Command, frozen=True, tag="get"):
    """Read a promise (through the log, so the answer is linearizable)."""


class TopicTarget(msgspec.Struct, frozen=True, gc=False, tag="kafka", tag_field="type"):
    """Notify by a record on a Kafka topic: to `partition` if given, else by `key` (default: the promise
    id) with Kafka's default partitioner. Checked like `replyTo`: never one of the deployment's topics."""

    topic: str
    partition: Partition | None = None
    key: str | None = None


class WebhookTarget(msgspec.Struct, frozen=True, gc=False, tag="webhook", tag_field="type"):
    """Notify by an HTTP POST to `url` (with `headers`), made by `dp webhooks` from the notifications topic."""

    url: str
    headers: dict[str, str] = {}


Target = TopicTarget | WebhookTarget


class Subscription(msgspec.Struct, frozen=True, gc=False, rename="camel"):
    """A wish to hear of a promise's completion: one notification to `target`, once."""

    id: str
    target: Target
    created_on: int


class Position(msgspec.Struct, frozen=True, gc=False, rename="camel"):
    """A place in search order (newest first: by `createdOn` descending, then `id` descending)."""

    created_on: int
    id: str


class Snapshot(msgspec.Struct, frozen=True, gc=False, rename="camel"):
    """What one partition's search answer reflected: its change `version` at its clock's `at`, and the
    Kafka transaction that committed the answer (answers committed together reflect one instant)."""

    partition: Partition
    version: Annotated[int, msgspec.Meta(ge=0)]
    at: Millis
    transaction: str | None = None


@final
class Search(_Command, frozen=True, tag="search", kw_only=True):
    """Search one partition (sent with an explicit partition and no key): `id` is a pattern where `*`
    matches any run of characters. Answers the newest matches after `after`; with `since`, answers
    `unchanged` instead when nothing the query could see changed on this partition since that snapshot."""

    state: SearchState | None = None
    tags: dict[str, str] = {}
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_SEARCH_LIMIT)] = MAX_SEARCH_LIMIT
    after: Position | None = None
    since: Snapshot | None = None


@final
class Subscribe(_Command, frozen=True, tag="subscribe", kw_only=True):
    """Be notified at `target` when the promise completes (at once if it is completed): one notification
    per `subscription` id, however often the same id subscribes."""

    subscription: PromiseId
    target: Target


PromiseCommand = Create | Resolve | Reject | Cancel | Get
"""A command of the specification on one promise: keyed by its id, applied by `dp.machine.transition`."""
Command = PromiseCommand | Subscribe | Search
_OP_NAMES: Final[dict[type[Command], str]] = {kind: str(kind.__struct_config__.tag) for kind in get_args(Command)}
OPS: Final[tuple[str, ...]] = tuple(_OP_NAMES.values())


class Reply(msgspec.Struct, frozen=True, gc=False, rename="camel"):
    """The answer to one command; `promise` is the record after the command, null if none exists."""

    request_id: str | None
    op: str | None
    id: str | None
    ok: bool
    status: StatusText
    promise: Promise | None = None
    error: str | None = None
    promises: list[Promise] | None = None
    """A search's page from one partition, newest first."""
    next: Position | None = None
    """A search's resume point when the partition has more matches than the page holds."""
    snapshot: Snapshot | None = None
    """What a search answer reflected; sent back as `since` to confirm nothing changed."""
    subscription: Subscription | None = None
    """A subscribe's subscription while it waits for the completion (null once notified)."""


class Notification(msgspec.Struct, frozen=True, gc=False, rename="camel", omit_defaults=True):
    """A completed promise, sent once per subscription to its target (with the `dp.kind: notification`
    header); `webhook` says where `dp webhooks` posts it, and is left out of what it posts."""

    type: Literal["notify"]
    subscription: str
    promise: Promise
    webhook: WebhookTarget | None = None


NOTIFICATION_KIND: Final = b"notification"
"""The `dp.kind` header value of a notification record (a reply topic may carry both)."""


class Event(msgspec.Struct, frozen=True, gc=False, rename="camel"):
    """One state change of a promise, with the record after the change."""

    type: EventType
    promise: Promise
    request_id: str | None = None


class Limits(msgspec.Struct, frozen=True):
    """Size limits on commands; over a limit a command is `invalid` and changes nothing."""

    max_id_bytes: int = 256
    max_record_bytes: int = 1024 * 1024
    max_data_bytes: int = 512 * 1024
    max_subscriptions: int = 100
    """Subscriptions one promise holds, waiting or notified: each is kept in its record."""
    max_url_bytes: int = 2048
    max_webhook_header_bytes: int = 4096


DEFAULT_LIMITS: Final = Limits()


class InvalidCommand(ValueError):
    """A command that cannot be applied; the message names the field and what is wrong with it."""


class _Envelope(msgspec.Struct, rename="camel"):
    """Whatever can be salvaged from a malformed command, each field of any JSON type."""

    op: Any = None
    request_id: Any = None
    reply_to: Any = None
    reply_partition: Any = None


_ENCODER: Final = msgspec.json.Encoder()
_COMMANDS: Final[msgspec.json.Decoder[Command]] = msgspec.json.Decoder(Command)
_PROMISES: Final = msgspec.json.Decoder(Promise)
_REPLIES: Final = msgspec.json.Decoder(Reply)
_EVENTS: Final = msgspec.json.Decoder(Event)
_NOTIFICATIONS: Final = msgspec.json.Decoder(Notification)
_ENVELOPES: Final = msgspec.json.Decoder(_Envelope)
_MALFORMED: Final = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)

encode: Final = _ENCODER.encode
decode_promise: Final = _PROMISES.decode
decode_reply: Final = _REPLIES.decode
decode_event: Final = _EVENTS.decode
decode_notification: Final = _NOTIFICATIONS.decode


def op_name(command: Command) -> str:
    """The wire name of a command's `op` (its tag)."""
    return _OP_NAMES[type(command)]


def decode_command(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Command:
    """Decode and validate one command record; anything malformed raises `InvalidCommand`, nothing else."""
    if len(data) > limits.max_record_bytes:
        raise InvalidCommand(f"record is {len(data)} bytes, over the limit of {limits.max_record_bytes}")
    try:
        command = _COMMANDS.decode(data)
    except msgspec.ValidationError:
        raise InvalidCommand(invalid_document(data, Command)) from None
    except _MALFORMED:
        raise InvalidCommand(malformed_json(data)) from None
    _check_sizes(command, limits)
    return command


def reply_address(data: bytes) -> tuple[str | None, str | None, int | None]:
    """Best-effort (requestId, replyTo, replyPartition) of a malformed command, so it can be answered."""
    envelope = _envelope(data)
    if envelope is None:
        return None, None, None
    partition = envelope.reply_partition
    return (
        envelope.request_id if isinstance(envelope.request_id, str) else None,
        envelope.reply_to if isinstance(envelope.reply_to, str) else None,
        partition if type(partition) is int and 0 <= partition < 2**31 else None,
    )


def _envelope(data: bytes) -> _Envelope | None:
    try:
        return _ENVELOPES.decode(data)
    except _MALFORMED:
        return None


RETENTION_TAG: Final = "dp:retention"
"""A promise's own retention, overriding the processor's `--retention`: a duration, or `forever`."""
FOREVER: Final = "forever"


def tag_retention_ms(text: str) -> int | None:
    """The retention a `dp:retention` tag asks for, in milliseconds (None: forever); ValueError if neither."""
    if text.strip().lower() == FOREVER:
        return None
    seconds = duration_seconds(text)
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return int(seconds * 1000)


def _check_sizes(command: Command, limits: Limits) -> None:
    id_bytes = len(command.id.encode())
    if id_bytes > limits.max_id_bytes:
        raise InvalidCommand(f"`id`: must be at most {limits.max_id_bytes} UTF-8 bytes, got {id_bytes}")
    if type(command) is Create:
        _check_data("param", command.param, limits)
        _check_retention_tag(command)
    elif isinstance(command, Completion):
        _check_data("value", command.value, limits)
    elif type(command) is Subscribe:
        _check_target(command, limits)


_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
RESERVED_HEADERS: Final = frozenset(
    ("host", "content-length", "content-type", "transfer-encoding", "connection", "keep-alive", "te", "trailer",
     "upgrade", "idempotency-key")
)  # fmt: skip
"""Headers `dp webhooks` sets itself, or that would change where or how a request goes."""


def _check_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - validates the port
    except ValueError as error:
        raise InvalidCommand(f"`target.url`: not a URL ({error})") from None
    if parts.scheme not in ("http", "https") or not host or _CONTROL.search(url) or " " in url:
        raise InvalidCommand(f"`target.url`: must be an http:// or https:// URL with a host, got {url[:200]!r}")


def _check_headers(headers: dict[str, str]) -> None:
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name):
            raise InvalidCommand(f"`target.headers`: {name[:100]!r} is not a header name")
        if name.lower() in RESERVED_HEADERS or name.lower().startswith("proxy-"):
            raise InvalidCommand(f"`target.headers`: {name!r} is set by dp webhooks or not allowed")
        if _CONTROL.search(value):
            raise InvalidCommand(f"`target.headers`: the value of {name!r} holds a line break or control character")


def _check_target(command: Subscribe, limits: Limits) -> None:
    sizes = {"`subscription`": len(command.subscription.encode())}
    target = command.target
    if type(target) is TopicTarget and target.key is not None:
        sizes["`target.key`"] = len(target.key.encode())
    for field, size in sizes.items():
        if size > limits.max_id_bytes:
            raise InvalidCommand(f"{field}: must be at most {limits.max_id_bytes} UTF-8 bytes, got {size}")
    if type(target) is WebhookTarget:
        if len(encode(target.url)) > limits.max_url_bytes:
            raise InvalidCommand(f"`target.url`: must be at most {limits.max_url_bytes} bytes as JSON")
        _check_url(target.url)
        _check_headers(target.headers)
        if len(encode(target.headers)) > limits.max_webhook_header_bytes:
            raise InvalidCommand(
                f"`target.headers`: must be at most {limits.max_webhook_header_bytes} bytes together, as JSON"
            )


def _check_retention_tag(command: Create) -> None:
    given = command.tags.get(RETENTION_TAG)
    if given is None:
        return
    try:
        tag_retention_ms(given)
    except ValueError:
        raise InvalidCommand(
            f"`tags.{RETENTION_TAG}`: {given[:100]!r} is not a retention; write a duration such as 30d or 12h, "
            f"or {FOREVER!r}"
        ) from None


def _check_data(field: str, value: Value, limits: Limits) -> None:
    if value.data is not None and len(value.data) > limits.max_data_bytes:
        raise InvalidCommand(
            f"`{field}.data`: must be at most {limits.max_data_bytes} bytes decoded, got {len(value.data)}"
        )
