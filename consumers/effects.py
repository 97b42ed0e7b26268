"""What one batch of one partition does, computed without I/O: the processor's functional core.

`apply_batch` runs `transition` over the batch's commands (and `expire` over the promises that fell
due) against one view of the store plus the batch's own changes (`BatchView`), answers searches from
that same view, and returns every record to publish and every change to persist. Nothing here
touches Kafka; the committer publishes `Effects` in one transaction and only then persists
`Effects.changes`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple, Protocol

import msgspec

from dp.machine import Outcome, expire, reply_for, retention_over, transition
from dp.partitioning import partition_for
from dp.search import (
    PAGE_BYTES,
    Query,
    before,
    compile_pattern,
    has_tags,
    literal_prefix,
    overlay,
    partition_page,
    position,
)
from dp.settings import Topics
from dp.subscriptions import NONE, Subscribed, Subscribers, complete, stored_value, subscribe
from dp.wire import (
    NOTIFICATION_KIND,
    OK_STATUSES,
    Command,
    Get,
    InvalidCommand,
    Limits,
    Notification,
    Position,
    Promise,
    Reply,
    Search,
    Snapshot,
    Subscribe,
    Subscription,
    TopicTarget,
    WebhookTarget,
    decode_command,
    encode,
    reply_address,
)

Headers = list[tuple[str, bytes]]
log = logging.getLogger("dp.processor")

# Kafka's default max.message.bytes, for a topic whose limit is not known (yet).
KAFKA_DEFAULT_MAX_MESSAGE_BYTES: Final = 1_048_588
# What a record costs beyond its key, value and headers inside a one-record batch (batch header 61
# bytes, record framing at most ~21), rounded up so that an estimate never undercounts.
RECORD_OVERHEAD: Final = 128


class Incoming(Protocol):
    """The parts of a consumed command record the processor reads (aiokafka's ConsumerRecord has them)."""

    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


class Outgoing(msgspec.Struct, frozen=True, gc=False):
    """One record to publish in the batch's transaction, to an explicit partition."""

    topic: str
    partition: int
    key: bytes | None
    value: bytes | None
    """None: a tombstone (a purged promise's changelog record)."""
    headers: Headers | None = None


class TopicInfo(NamedTuple):
    """What the core must know of a topic before it writes there."""

    partitions: int
    max_message_bytes: int = KAFKA_DEFAULT_MAX_MESSAGE_BYTES
    compacted: bool = False
    internal: bool = False


def record_bytes(message: Outgoing) -> int:
    """An upper bound of the bytes Kafka counts against `max.message.bytes` for this record alone."""
    size = len(message.key or b"") + len(message.value or b"") + RECORD_OVERHEAD
    if message.headers:
        size += sum(len(name) + len(value) + 8 for name, value in message.headers)
    return size


class StoreView(Protocol):
    """What the core reads of a partition's committed state: the store, and the changes the shell recalls."""

    @property
    def version(self) -> int:
        """Promise changes committed on this partition so far: it grows by one with every change."""

    def get(self, promise_id: str) -> Promise | None: ...

    def subscribers(self, promise_id: str) -> Subscribers:
        """The subscriptions kept in a promise's stored record (`NONE` when it has none or is missing)."""

    def newest(self, after: Position | None) -> Iterable[tuple[Position, str]]:
        """Every promise's place (and id) in search order, newest first, strictly after `after`."""

    def changed_since(self, version: int) -> Sequence[str] | None:
        """The ids changed after `version`, or None when that is no longer known (too long ago, or the
        partition has opened since)."""

    def falling_due(self, start: int, end: int) -> Iterable[str]:
        """The ids of pending promises whose timeout is in (start, end]."""


class BatchView:
    """The store as this batch sees it: committed state with the batch's own changes laid over it, for
    commands, timeouts and searches alike (one view, so a search sees the writes before it in the batch)."""

    def __init__(self, store: StoreView) -> None:
        self.store = store
        self.changes: dict[str, Promise] = {}
        self.changed: list[str] = []
        self.subscribed: dict[str, Subscribers] = {}
        self.purged: dict[str, Promise] = {}
        """Records the batch purged, as they were (an id created again is in `changes` too)."""

    @property
    def version(self) -> int:
        return self.store.version + len(self.changed)

    def get(self, promise_id: str) -> Promise | None:
        changed = self.changes.get(promise_id)
        if changed is not None or promise_id in self.purged:
            return changed
        return self.store.get(promise_id)

    def put(self, promise: Promise) -> None:
        self.changes[promise.id] = promise
        self.changed.append(promise.id)

    def purge(self, promise: Promise) -> None:
        """The promise is gone, and its subscriptions with it: its id is free (a change, for searches)."""
        self.purged[promise.id] = promise
        self.changed.append(promise.id)

    def subscribers(self, promise_id: str) -> Subscribers:
        changed = self.subscribed.get(promise_id)
        if changed is not None:
            return changed
        return NONE if promise_id in self.purged else self.store.subscribers(promise_id)

    def put_subscribers(self, promise_id: str, subscribers: Subscribers) -> None:
        """Subscriptions are not promise changes: they are persisted with the record, the version stays."""
        self.subscribed[promise_id] = subscribers

    def changed_since(self, version: int) -> Sequence[str] | None:
        base = self.store.version
        if version > self.version:
            return None
        if version >= base:
            return self.changed[version - base :]
        committed = self.store.changed_since(version)
        return None if committed is None else [*committed, *self.changed]

    def candidates(self, pattern: str, after: Position | None) -> Iterator[tuple[Position, Promise | None]]:
        """Search candidates newest first: each place with its record, or None where the id cannot match."""
        if "*" not in pattern:
            promise = self.get(pattern)
            if promise is not None and before(position(promise), after):
                yield position(promise), promise
            return
        matches, prefix = compile_pattern(pattern).fullmatch, literal_prefix(pattern)
        stored = (
            (place, self.store.get(promise_id) if promise_id.startswith(prefix) and matches(promise_id) else None)
            for place, promise_id in self.store.newest(after)
        )
        yield from overlay(stored, self.changes, pattern, after, gone=self.purged)


@dataclass
class Effects:
    """Everything a batch publishes (in order) and the records it changed (latest version per id, and
    every change's id in order: the partition's version grows by `len(changed)`); `persist` has each
    changed stored record (a promise or its subscriptions changed) with its encoding."""

    messages: list[Outgoing] = field(default_factory=list)
    changes: dict[str, Promise] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)
    persist: list[tuple[Promise, bytes]] = field(default_factory=list)
    purged: dict[str, Promise] = field(default_factory=dict)


@dataclass(frozen=True)
class Route:
    """Where this partition's writer publishes, and what it accepts."""

    partition: int
    partitions: int
    topics: Topics
    limits: Limits
    reply_prefixes: tuple[str, ...] = ()
    """When set, a `replyTo` must start with one of these (the deployment's replies topic always may)."""
    retention_ms: int | None = None
    """How long a completed promise is kept (None: forever)."""


def apply_batch(
    route: Route,
    store: StoreView,
    records: list[Incoming],
    due: list[Promise],
    now: int,
    reply_topics: Mapping[str, TopicInfo],
    refusals: Mapping[int, str | None] | None = None,
    *,
    transaction: str | None = None,
    expired: Sequence[Promise] = (),
) -> Effects:
    """Purge the `expired` completed promises (retention), apply due timeouts, then each command in log
    order; `reply_topics` describes the cluster's topics.

    `refusals` (by offset) are records the shell learnt Kafka will not take the output of: each is
    refused with the reason given on the deployment's replies topic, or with None passed over silently.
    `transaction` names the Kafka transaction the batch is committed in (with other partitions' batches),
    for the snapshots of search answers.
    """
    view = BatchView(store)
    effects = Effects(changes=view.changes, changed=view.changed, purged=view.purged)
    for promise in expired:
        if retention_over(promise, now, route.retention_ms):
            view.purge(promise)
            effects.messages.append(Outgoing(route.topics.changelog, route.partition, promise.id.encode(), None))
    for promise in due:
        timed_out = expire(promise, now)
        if timed_out is not None:
            record_changes(route, effects, view, timed_out, reply_topics)
    for record in records:
        if refusals and record.offset in refusals:
            reason = refusals[record.offset]
            if reason is not None:
                refuse(route, effects, record, reason, reply_topics, answer_on_default=True)
            continue
        outcome: Outcome | None = None
        subscribed: Subscribed | None = None
        try:
            command = accept(route, record, reply_topics)
            if type(command) is Search:
                answer = search(route, view, command, now, reply_topics, transaction)
            elif type(command) is Subscribe:
                outcome, subscribed = judge_subscribe(route, view, command, now)
                answer = Reply(
                    command.request_id,
                    "subscribe",
                    command.id,
                    subscribed.status in OK_STATUSES,
                    subscribed.status,
                    outcome.promise,
                    subscription=subscribed.waiting,
                )
            else:
                outcome = transition(view.get(command.id), command, now)
                answer = reply_for(command, outcome)
            reply = reply_message(route, command, answer, reply_topics)
            check_fits(reply, reply_topics)
        except ReplyTooLarge as problem:
            refuse(route, effects, record, str(problem), reply_topics, answer_on_default=True)
            continue
        except InvalidCommand as problem:
            refuse(route, effects, record, str(problem), reply_topics)
            continue
        except Exception as error:  # a bug must not wedge the partition on one record: refuse it, go on
            log.exception("partition %d: offset %d could not be applied", route.partition, record.offset)
            refuse(route, effects, record, f"internal error ({type(error).__name__}): not applied", reply_topics)
            continue
        if outcome is not None:
            record_changes(route, effects, view, outcome, reply_topics)
        if subscribed is not None:
            record_subscription(route, effects, view, command.id, subscribed, reply_topics)
        effects.messages.append(reply)
    for promise_id in (*effects.changes, *(name for name in view.subscribed if name not in effects.changes)):
        stored = view.get(promise_id)
        assert stored is not None, "only existing promises have subscriptions"
        value = stored_value(stored, view.subscribers(promise_id))
        effects.persist.append((stored, value))
        effects.messages.append(Outgoing(route.topics.changelog, route.partition, promise_id.encode(), value))
    return effects


def accept(route: Route, record: Incoming, reply_topics: Mapping[str, TopicInfo]) -> Command:
    """Decode a command and check what decoding cannot: its key, partition and reply address."""
    if record.value is None:
        raise InvalidCommand("record has no value (a tombstone is not a command)")
    command = decode_command(record.value, route.limits)
    if type(command) is Subscribe:
        check_target(route, command.target, reply_topics)
    if type(command) is Search:
        if record.key is not None:
            raise InvalidCommand("a search is sent to each partition with no key (its `id` is a pattern)")
        check_reply_address(route, command.reply_to, command.reply_partition, reply_topics)
        return command
    if record.key is None or record.key != command.id.encode():
        raise InvalidCommand("record key must equal the command's `id` (the promise id, UTF-8)")
    expected = partition_for(record.key, route.partitions)
    if expected != route.partition:
        raise InvalidCommand(
            f"misrouted: promise {command.id!r} belongs on partition {expected}, not {route.partition}; "
            "produce with the key set to the id and Kafka's default (murmur2) partitioner"
        )
    check_reply_address(route, command.reply_to, command.reply_partition, reply_topics)
    return command


class ReplyTooLarge(InvalidCommand):
    """The reply would not fit its topic: the command is refused on the deployment's replies topic."""


def check_reply_address(
    route: Route, reply_to: str | None, reply_partition: int | None, reply_topics: Mapping[str, TopicInfo]
) -> None:
    """A reply may go only where it cannot hurt: never into the deployment's own topics (a reply in the
    changelog would corrupt every restore, one in the commands topic would be applied), an internal or a
    compacted topic, nor outside the configured reply prefixes."""
    topic = reply_to or route.topics.replies
    check_destination(route, topic, reply_partition, reply_topics, ("`replyTo`", "`replyPartition`"))


def check_target(route: Route, target: TopicTarget | WebhookTarget, reply_topics: Mapping[str, TopicInfo]) -> None:
    """A subscription's topic is checked like a `replyTo`; a webhook needs the notifications topic."""
    if type(target) is TopicTarget:
        check_destination(route, target.topic, target.partition, reply_topics, ("`target.topic`", "`target.partition`"))
    elif route.topics.notifications not in reply_topics:
        raise InvalidCommand(
            f"`target`: webhooks need the {route.topics.notifications!r} topic, which does not exist; "
            "run `dp topics create`"
        )


def check_destination(
    route: Route,
    topic: str,
    partition: int | None,
    reply_topics: Mapping[str, TopicInfo],
    fields: tuple[str, str],
) -> None:
    name, partition_field = fields
    if topic in route.topics.own:
        raise InvalidCommand(
            f"{name}: {topic!r} is one of this deployment's own topics; name a topic of yours, "
            f"or leave `replyTo` out for {route.topics.replies!r}"
        )
    if topic.startswith("__"):
        raise InvalidCommand(f"{name}: {topic!r} is an internal Kafka topic")
    if topic != route.topics.replies and route.reply_prefixes and not topic.startswith(route.reply_prefixes):
        raise InvalidCommand(f"{name}: must start with one of {', '.join(map(repr, route.reply_prefixes))}")
    info = reply_topics.get(topic)
    if info is None or info.partitions == 0:
        raise InvalidCommand(f"{name}: topic {topic!r} does not exist")
    if info.internal:
        raise InvalidCommand(f"{name}: {topic!r} is an internal Kafka topic")
    if info.compacted:
        raise InvalidCommand(f"{name}: {topic!r} is compacted; dp writes only to topics with cleanup.policy=delete")
    if partition is not None and partition >= info.partitions:
        raise InvalidCommand(f"{partition_field}: {topic!r} has {info.partitions} partitions, got {partition}")


def check_fits(message: Outgoing, topics: Mapping[str, TopicInfo]) -> None:
    """A reply too large for its topic is refused before Kafka refuses it (and the whole batch with it)."""
    size, limit = record_bytes(message), topics[message.topic].max_message_bytes
    if size > limit:
        raise ReplyTooLarge(
            f"the reply ({size} bytes) is larger than {message.topic!r} accepts (max.message.bytes {limit}): "
            "not applied; raise the topic's max.message.bytes or send smaller data"
        )


def record_changes(
    route: Route, effects: Effects, view: BatchView, outcome: Outcome, reply_topics: Mapping[str, TopicInfo]
) -> None:
    """Persist a changed promise and emit its events; a completion notifies every waiting subscription."""
    promise = outcome.promise
    if not outcome.events or promise is None:
        return
    view.put(promise)
    effects.messages.extend(
        Outgoing(route.topics.events, route.partition, event.promise.id.encode(), encode(event))
        for event in outcome.events
    )
    if promise.state != "PENDING":
        subscribers = view.subscribers(promise.id)
        if subscribers.subscriptions:
            notified, after = complete(subscribers)
            view.put_subscribers(promise.id, after)
            effects.messages.extend(
                notification(route, subscription, promise, reply_topics) for subscription in notified
            )


def judge_subscribe(route: Route, view: BatchView, command: Subscribe, now: int) -> tuple[Outcome, Subscribed]:
    """A subscribe sees the promise as a get would: time applies first (a due promise times out, and its
    waiting subscriptions are to be notified), then the subscription is judged against that record.
    Nothing is recorded here: like any command's, the timeout is recorded only once the reply is sure."""
    lazy = transition(view.get(command.id), Get(command.id, request_id=command.request_id), now)
    subscribers = view.subscribers(command.id)
    if lazy.events:  # timed out now: its waiting subscriptions will have been notified
        subscribers = complete(subscribers)[1]
    return lazy, subscribe(lazy.promise, subscribers, command, now, route.limits.max_subscriptions)


def record_subscription(
    route: Route,
    effects: Effects,
    view: BatchView,
    promise_id: str,
    subscribed: Subscribed,
    reply_topics: Mapping[str, TopicInfo],
) -> None:
    if subscribed.status != "created":  # not_found, deduplicated: nothing changed
        return
    view.put_subscribers(promise_id, subscribed.after)
    promise = view.get(promise_id)
    if subscribed.notify is not None and promise is not None:
        effects.messages.append(notification(route, subscribed.notify, promise, reply_topics))


def notification(
    route: Route, subscription: Subscription, promise: Promise, reply_topics: Mapping[str, TopicInfo]
) -> Outgoing:
    """The record that tells one subscription of the completion; a target that has become unwritable
    (its topic deleted, or too small for the record) gets it in the DLQ instead, with the reason."""
    target = subscription.target
    webhook: WebhookTarget | None = None
    if isinstance(target, TopicTarget):
        topic, partition = target.topic, target.partition
        key = (promise.id if target.key is None else target.key).encode()
    else:
        topic, partition, webhook, key = route.topics.notifications, None, target, promise.id.encode()
    value = encode(Notification("notify", subscription.id, promise, webhook))
    headers: Headers = [(KIND_HEADER, NOTIFICATION_KIND), (SUBSCRIPTION_HEADER, subscription.id.encode())]
    info = reply_topics.get(topic)
    if info is None or info.partitions == 0 or (partition is not None and partition >= info.partitions):
        problem = f"notification target topic {topic!r} is gone or refuses dp's writes"
        return undeliverable(route, key, value, headers, problem, reply_topics)
    message = Outgoing(
        topic, partition_for(key, info.partitions) if partition is None else partition, key, value, headers
    )
    if record_bytes(message) > info.max_message_bytes:
        problem = f"the notification is larger than {topic!r} accepts (max.message.bytes {info.max_message_bytes})"
        return undeliverable(route, key, value, headers, problem, reply_topics)
    return message


KIND_HEADER: Final = "dp.kind"
SUBSCRIPTION_HEADER: Final = "dp.subscription"


def is_notification(message: Outgoing) -> bool:
    return bool(message.headers) and (KIND_HEADER, NOTIFICATION_KIND) in (message.headers or ())


def undeliverable(
    route: Route, key: bytes, value: bytes, headers: Headers, problem: str, reply_topics: Mapping[str, TopicInfo]
) -> Outgoing:
    """A notification that cannot go where it was meant to, kept in the DLQ with the reason."""
    dlq = reply_topics[route.topics.dlq]
    return fitted(
        Outgoing(
            route.topics.dlq, partition_for(key, dlq.partitions), key, value, [("dp.error", problem.encode()), *headers]
        ),
        dlq,
    )


def search(
    route: Route,
    view: BatchView,
    command: Search,
    now: int,
    reply_topics: Mapping[str, TopicInfo],
    transaction: str | None,
) -> Reply:
    """One partition's answer to a search: `unchanged` when the command's `since` snapshot still holds for
    what the query can see, else a page (as large as the reply topic takes) and the snapshot it reflects."""
    query = Query(command.id, command.state, command.tags, command.limit)
    snapshot = Snapshot(route.partition, view.version, now, transaction)
    if command.since is not None and unchanged(route, view, query, command.since, now):
        return Reply(command.request_id, "search", command.id, True, "unchanged", snapshot=snapshot)
    topic = command.reply_to or route.topics.replies
    room = min(PAGE_BYTES, reply_topics[topic].max_message_bytes - SEARCH_REPLY_OVERHEAD)
    page = partition_page(query, view.candidates(command.id, command.after), now, room)
    return Reply(
        command.request_id,
        "search",
        command.id,
        True,
        "found",
        promises=page.promises,
        next=page.next,
        snapshot=snapshot,
    )


# What a search reply costs beyond its promises (request id, pattern, snapshot, framing), rounded up.
SEARCH_REPLY_OVERHEAD: Final = 4 * 1024


def unchanged(route: Route, view: BatchView, query: Query, since: Snapshot, now: int) -> bool:
    """Whether nothing the query could see changed on this partition since `since`: no promise it could
    match was written, and none it could match fell due (a read shows a due promise timed out)."""
    if since.partition != route.partition or since.at > now:
        return False
    changed = view.changed_since(since.version)
    if changed is None:
        return False
    matches = compile_pattern(query.pattern).fullmatch
    for promise_id in changed:
        if matches(promise_id) and (not query.tags or _tagged(query, view.get(promise_id))):
            return False
    return not any(matches(promise_id) for promise_id in view.store.falling_due(since.at, now))


def _tagged(query: Query, promise: Promise | None) -> bool:
    """Whether a changed promise could have been seen by the query: one no longer there (purged) could."""
    return promise is None or has_tags(query, promise)


def reply_partition_of(route: Route, topic: str, partition: int | None, topics: Mapping[str, TopicInfo]) -> int:
    """The asked-for partition, else this partition's number modulo the topic's count: replies are matched
    by requestId, not by partition, and hashing every requestId would cost more than the rest of a reply."""
    return partition if partition is not None else route.partition % topics[topic].partitions


def reply_message(route: Route, command: Command, reply: Reply, reply_topics: Mapping[str, TopicInfo]) -> Outgoing:
    topic = command.reply_to or route.topics.replies
    key = (command.request_id or command.id).encode()
    return Outgoing(topic, reply_partition_of(route, topic, command.reply_partition, reply_topics), key, encode(reply))


def refuse(
    route: Route,
    effects: Effects,
    record: Incoming,
    problem: str,
    reply_topics: Mapping[str, TopicInfo],
    *,
    answer_on_default: bool = False,
) -> None:
    """An unusable record: answer `invalid` where an address is recoverable (else, or when told, on the
    deployment's replies topic), and copy it to the DLQ, cut to what the DLQ accepts."""
    raw = record.value or b""
    request_id, reply_to, requested = reply_address(raw)
    try:
        check_reply_address(route, reply_to, requested, reply_topics)
    except InvalidCommand:
        answer_on_default = True
    reply = Reply(request_id, None, None, False, "invalid", None, problem)
    key = (request_id or "").encode() or record.key
    answer = Outgoing(reply_to or route.topics.replies, 0, key, encode(reply))
    if answer_on_default or record_bytes(answer) > reply_topics[answer.topic].max_message_bytes:
        reply_to, requested = None, None
    topic = reply_to or route.topics.replies
    partition = reply_partition_of(route, topic, requested, reply_topics)
    effects.messages.append(Outgoing(topic, partition, key, answer.value))
    effects.messages.append(dead_letter(route, record, problem, reply_topics[route.topics.dlq]))


def dead_letter(route: Route, record: Incoming, problem: str, dlq: TopicInfo) -> Outgoing:
    """The record as it came, with headers saying why and from where (cut to fit, see `fitted`)."""
    raw = record.value or b""
    headers: Headers = [
        ("dp.error", problem.encode()),
        ("dp.topic", route.topics.commands.encode()),
        ("dp.partition", str(route.partition).encode()),
        ("dp.offset", str(record.offset).encode()),
    ]
    partition = partition_for(record.key, dlq.partitions) if record.key else 0
    return fitted(Outgoing(route.topics.dlq, partition, record.key, raw, headers), dlq)


def fitted(letter: Outgoing, dlq: TopicInfo) -> Outgoing:
    """The letter, or, when it would not fit the DLQ, its value cut to fit (and a header saying so), so
    that the copy is never what fails the batch."""
    excess = record_bytes(letter) - dlq.max_message_bytes
    if excess <= 0:
        return letter
    raw, headers = letter.value or b"", [*(letter.headers or [])]
    headers.append(("dp.truncated", f"{len(raw)} bytes, cut to fit the DLQ's max.message.bytes".encode()))
    key = letter.key if letter.key is None or len(letter.key) < dlq.max_message_bytes // 2 else letter.key[:256]
    room = max(0, dlq.max_message_bytes - record_bytes(Outgoing(letter.topic, letter.partition, key, b"", headers)))
    return Outgoing(letter.topic, letter.partition, key, raw[:room], headers)
