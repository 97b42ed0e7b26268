"""Subscriptions in the replay, and the check of every notification read back from Kafka.

The replay judges each command with `judge`: `transition` as before, plus the subscription rule of
`dp.subscriptions` against the replayed subscriptions of the promise. Whatever completes a promise
(a completion, a timeout seen by any command, an active timeout) notifies every subscription then
waiting, and a subscribe on a completed promise notifies at once; the replay collects those
`Notice`s. The check then wants exactly one notification record per notice, where its target says,
carrying the record the replay completed, and no other notification at all.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, NamedTuple

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from dp.kafka import options as kafka_options
from dp.machine import Outcome, transition
from dp.settings import Kafka, Topics
from dp.subscriptions import NONE, Subscribers, complete, decode_subscribers, subscribe
from dp.wire import (
    NOTIFICATION_KIND,
    Command,
    Get,
    InvalidCommand,
    Promise,
    Search,
    Subscribe,
    Subscription,
    Target,
    TopicTarget,
    WebhookTarget,
    decode_notification,
)
from tests.chaos.accept import home_partition

if TYPE_CHECKING:
    from tests.chaos.verify import Verdict

INBOX_PARTITIONS = 3
COMPLETIONS = frozenset(("resolved", "rejected", "canceled", "timedout"))


def inbox_topic(topics: Topics) -> str:
    """The run's own topic for Kafka-target subscriptions: the subscriber's, not one of the deployment's."""
    return f"{topics.prefix}-chaos.inbox"


class Notice(NamedTuple):
    """One notification the replay says must exist: of subscription `id`, to `target`, with `promise`
    (what a notification shows; when the subscription was made does not matter to it)."""

    id: str
    target: Target
    promise: Promise

    @classmethod
    def of(cls, subscription: Subscription, promise: Promise) -> Notice:
        return cls(subscription.id, subscription.target, promise)


class Judged(NamedTuple):
    """What one command did in the replay: the reply's status, promise and events (`outcome`), the
    promise's record and subscriptions after it, the subscription the reply carries, the notices it
    sent, and why it was refused when the rule refuses it (a subscribe over the limit)."""

    outcome: Outcome
    record: Promise | None
    subscribers: Subscribers
    waiting: Subscription | None = None
    notices: tuple[Notice, ...] = ()
    refused: str | None = None


def judge(prior: Promise | None, subscribers: Subscribers, command: Command, now: int, limit: int) -> Judged:
    """One command at `now`; a subscribe first sees time pass as a get would (a due promise times out)."""
    if not isinstance(command, Subscribe):
        assert not isinstance(command, Search), "the workload sends no searches"
        outcome = transition(prior, command, now)
        notices, after = completed(outcome, subscribers)
        return Judged(outcome, outcome.promise, after, notices=notices)
    lazy = transition(prior, Get(command.id, request_id=command.request_id), now)
    notices, after = completed(lazy, subscribers)
    try:
        subscribed = subscribe(lazy.promise, after, command, now, limit)
    except InvalidCommand as problem:
        return Judged(Outcome("invalid", None, lazy.events), lazy.promise, after, notices=notices, refused=str(problem))
    if subscribed.notify is not None and lazy.promise is not None:
        notices = (*notices, Notice.of(subscribed.notify, lazy.promise))
    outcome = Outcome(subscribed.status, lazy.promise, lazy.events)
    return Judged(outcome, lazy.promise, subscribed.after, subscribed.waiting, notices)


def completed(outcome: Outcome, subscribers: Subscribers) -> tuple[tuple[Notice, ...], Subscribers]:
    """A completion (by any path) notifies every waiting subscription, with the completed record."""
    promise = outcome.promise
    if promise is None or not any(event.type in COMPLETIONS for event in outcome.events):
        return (), subscribers
    waiting, after = complete(subscribers)
    return tuple(Notice.of(subscription, promise) for subscription in waiting), after


class Found(NamedTuple):
    """A notification record as read back, decoded."""

    record: ConsumerRecord
    subscription: str
    promise: Promise
    webhook: WebhookTarget | None


async def read_notifications(kafka: Kafka, topics: Topics, isolation: str = "read_committed") -> list[ConsumerRecord]:
    """Every record now in the inbox and the notifications topic."""
    consumer = AIOKafkaConsumer(**kafka_options(kafka), isolation_level=isolation, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        names = (inbox_topic(topics), topics.notifications)
        tps = [TopicPartition(name, p) for name in names for p in sorted(consumer.partitions_for_topic(name) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list[ConsumerRecord] = []
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            for batch in (await consumer.getmany(timeout_ms=200, max_records=10_000)).values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


def is_notification(record: ConsumerRecord) -> bool:
    return ("dp.kind", NOTIFICATION_KIND) in record.headers


class NotificationCheck:
    """Every notification read back against the replay's notices (see the module doc)."""

    def __init__(self, verdict: Verdict, topics: Topics, sizes: Mapping[str, int]) -> None:
        self.verdict = verdict
        self.topics = topics
        self.sizes = sizes
        self.kinds: Counter[str] = Counter()

    def run(self, notices: Mapping[tuple[str, str], list[Notice]], records: Iterable[ConsumerRecord]) -> int:
        """Checks each record, then the counts per (promise id, subscription id); returns the records found."""
        found: Counter[tuple[str, str]] = Counter()
        unmatched = {key: list(expected) for key, expected in notices.items()}
        for record in records:
            decoded = self.decode(record)
            if decoded is None:
                continue
            key = (decoded.promise.id, decoded.subscription)
            found[key] += 1
            expected = notices.get(key)
            if not expected:
                self.verdict.violate("notification the replay does not send", f"{key} at {where(record)}")
                continue
            # One subscription id may be notified once per life of its promise (a purge frees the id).
            left = unmatched[key]
            same = next((notice for notice in left if notice.promise == decoded.promise), None)
            if same is not None:
                left.remove(same)
            self.compare(decoded, same or expected[0])
        for key, expected in notices.items():
            got = found.get(key, 0)
            if got < len(expected):
                self.verdict.lose("notification missing", f"{key}: {expected[0].target}")
            elif got > len(expected):
                self.verdict.duplicate("notification sent more than once", f"{key}: {got}", got - len(expected))
        return sum(found.values())

    def decode(self, record: ConsumerRecord) -> Found | None:
        headers = dict(record.headers)
        try:
            notification = decode_notification(record.value)
        except Exception as error:  # anything on these topics must be a notification
            self.verdict.violate("notification that does not decode", f"{where(record)}: {error!r}")
            return None
        if headers.get("dp.kind") != NOTIFICATION_KIND or headers.get("dp.subscription") != (
            notification.subscription.encode()
        ):
            self.verdict.violate("notification headers wrong", f"{where(record)}: {headers}")
        return Found(record, notification.subscription, notification.promise, notification.webhook)

    def compare(self, found: Found, notice: Notice) -> None:
        """The record the replay completed, at the place the target names."""
        label = f"{(notice.promise.id, notice.id)} at {where(found.record)}"
        if found.promise != notice.promise:
            self.verdict.violate("notification record differs from the replay", label)
        topic, partition, key, webhook = self.destination(notice)
        record = found.record
        if record.topic == self.topics.dlq:
            self.kinds["dead-lettered"] += 1
            if self.sizes.get(topic, 0) > partition:
                self.verdict.violate("notification dead-lettered although its target exists", label)
            return
        self.kinds[kind_of(notice.target)] += 1
        if (record.topic, record.partition, record.key, found.webhook) != (topic, partition, key, webhook):
            self.verdict.violate(
                "notification not where its target says",
                f"{label}: want {topic}:{partition} key {key!r}, got key {record.key!r} webhook {found.webhook}",
            )

    def destination(self, notice: Notice) -> tuple[str, int, bytes, WebhookTarget | None]:
        """(topic, partition, key, webhook) the contract gives a notification of this subscription."""
        target = notice.target
        if isinstance(target, WebhookTarget):
            key = notice.promise.id.encode()
            topic = self.topics.notifications
            return topic, home_partition(key, max(self.sizes.get(topic, 1), 1)), key, target
        key = (notice.promise.id if target.key is None else target.key).encode()
        if target.partition is not None:
            return target.topic, target.partition, key, None
        return target.topic, home_partition(key, max(self.sizes.get(target.topic, 1), 1)), key, None


def kind_of(target: Target) -> str:
    if isinstance(target, WebhookTarget):
        return "webhook"
    assert isinstance(target, TopicTarget)
    return "partition given" if target.partition is not None else "keyed" if target.key is not None else "by id"


def where(record: ConsumerRecord) -> str:
    return f"{record.topic}:{record.partition}:{record.offset}"


def latest_subscribers(changelog: Iterable[ConsumerRecord]) -> dict[str, Subscribers]:
    """The subscription fields of the last changelog record per id (none after a tombstone: a purge)."""
    found: dict[str, Subscribers] = {}
    for record in changelog:
        if not record.key:
            continue
        if record.value is None:
            found.pop(record.key.decode(), None)
        else:
            found[record.key.decode()] = decode_subscribers(record.value)
    return found


def check_subscribers(
    verdict: Verdict, expected: Mapping[str, Subscribers], changelog: Mapping[str, Subscribers]
) -> None:
    """The changelog's final record per id holds exactly the subscriptions the replay predicts."""
    for promise_id in sorted(set(expected) | set(changelog)):
        want, got = expected.get(promise_id, NONE), changelog.get(promise_id, NONE)
        if want != got:
            verdict.violate(
                "subscriptions in the changelog differ from the replay", f"{promise_id}: {got} vs replay {want}"
            )


async def check_subscriptions(
    verdict: Verdict,
    kafka: Kafka,
    topics: Topics,
    sizes: Mapping[str, int],
    replayed: tuple[list[Notice], Mapping[str, Subscribers], Counter[str]],
    changelog: list[ConsumerRecord],
    dlq: list[ConsumerRecord],
) -> None:
    """The replay's (notices, final subscriptions, subscribes by status) against what Kafka holds:
    the notifications (read_committed, so an aborted transaction's must be invisible) and the changelog."""
    notices, subscribers, subscribes = replayed
    check_subscribers(verdict, subscribers, latest_subscribers(changelog))
    committed = await read_notifications(kafka, topics)
    check = NotificationCheck(verdict, topics, sizes)
    found = check.run(by_key(notices), [*committed, *(record for record in dlq if is_notification(record))])
    aborted = len(await read_notifications(kafka, topics, "read_uncommitted")) - len(committed)
    verdict.figure("subscribes", f"{subscribes.total()} ({', '.join(f'{s} {n}' for s, n in subscribes.most_common())})")
    kinds = ", ".join(f"{kind} {n}" for kind, n in check.kinds.most_common())
    verdict.figure("notifications", f"expected {len(notices)}, found {found} ({kinds})")
    verdict.figure("notification records in aborted transactions (invisible to read_committed)", aborted)


def by_key(notices: Iterable[Notice]) -> dict[tuple[str, str], list[Notice]]:
    keyed: dict[tuple[str, str], list[Notice]] = defaultdict(list)
    for notice in notices:
        keyed[(notice.promise.id, notice.id)].append(notice)
    return keyed
