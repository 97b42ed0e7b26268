"""Subscriptions in the processor's core: one notification per subscription, whichever way a promise completes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from consumers.effects import Effects, Route, TopicInfo, apply_batch
from dp.subscriptions import NONE, decode_subscribers, stored_value
from dp.wire import (
    DEFAULT_LIMITS,
    NOTIFICATION_KIND,
    Limits,
    Notification,
    Promise,
    Reply,
    Subscription,
    TopicTarget,
    Value,
    decode_notification,
    decode_promise,
    decode_reply,
)
from tests.memory import MemoryStore
from tests.unit.test_effects import PARTITIONS, TOPICS, Record, command, owned_id

NOW = 1_000_000
TOPIC_INFO = {
    TOPICS.replies: TopicInfo(3),
    TOPICS.dlq: TopicInfo(2),
    TOPICS.notifications: TopicInfo(4),
    "inbox": TopicInfo(6),
    "compacted": TopicInfo(1, compacted=True),
}
PID = owned_id(0, "s")
INBOX = {"type": "kafka", "topic": "inbox", "partition": 5}
HOOK = {"type": "webhook", "url": "https://hooks.example/done", "headers": {"X-Token": "t"}}


class Partition:
    """One partition's core over an in-memory store, batch after batch, as the processor runs it."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS, topics: dict[str, TopicInfo] | None = None) -> None:
        self.store = MemoryStore()
        self.route = Route(0, PARTITIONS, TOPICS, limits)
        self.topics = topics or TOPIC_INFO
        self.offset = 0

    def batch(self, *commands: dict[str, Any], due: list[Promise] | None = None, now: int = NOW) -> Effects:
        records: list[Record] = []
        for fields in commands:
            self.offset += 1
            records.append(command(self.offset, **{"id": PID, "requestId": f"r{self.offset}", **fields}))
        effects = apply_batch(self.route, self.store, list(records), due or [], now, self.topics)
        self.store.persist(effects.persist, effects.changed)
        return effects


def create(timeout: int = NOW + 1_000, **fields: Any) -> dict[str, Any]:
    return {"op": "create", "timeout": timeout, **fields}


def sub(subscription: str, target: dict[str, Any] = INBOX) -> dict[str, Any]:
    return {"op": "subscribe", "subscription": subscription, "target": target}


def notifications(effects: Effects) -> list[tuple[str, int, Notification]]:
    return [
        (m.topic, m.partition, decode_notification(m.value))
        for m in effects.messages
        if m.headers and ("dp.kind", NOTIFICATION_KIND) in m.headers
    ]


def answers(effects: Effects) -> list[Reply]:
    return [decode_reply(m.value) for m in effects.messages if m.topic == TOPICS.replies]


def test_a_subscription_waits_in_the_record_and_changes_no_promise() -> None:
    part = Partition()
    part.batch(create())
    effects = part.batch(sub("a"))
    (reply,) = answers(effects)
    assert (reply.status, reply.ok, reply.promise is not None) == ("created", True, True)
    assert reply.subscription == Subscription("a", TopicTarget("inbox", 5), NOW)
    assert not effects.changed and not notifications(effects)
    assert [m.topic for m in effects.messages if m.topic == TOPICS.events] == []
    assert part.store.subscribers(PID).subscriptions == (reply.subscription,)


@pytest.mark.parametrize(
    ("completing", "state"),
    [
        ({"op": "resolve"}, "RESOLVED"),
        ({"op": "reject"}, "REJECTED"),
        ({"op": "cancel"}, "REJECTED_CANCELED"),
        ({"op": "get"}, "REJECTED_TIMEDOUT"),  # lazily timed out: the get sees the promise past its timeout
        ({"op": "subscribe", "subscription": "late", "target": INBOX}, "REJECTED_TIMEDOUT"),
    ],
)
def test_every_completing_command_notifies_each_subscription_once(completing: dict[str, Any], state: str) -> None:
    part = Partition()
    part.batch(create(timeout=NOW + 10), sub("a"), sub("b", HOOK))
    later = NOW + 20 if state == "REJECTED_TIMEDOUT" else NOW
    effects = part.batch(completing, now=later)
    sent = notifications(effects)
    first_two = [(topic, n.subscription, n.promise.state) for topic, _, n in sent[:2]]
    assert first_two == [("inbox", "a", state), (TOPICS.notifications, "b", state)]
    assert len(sent) == (3 if completing.get("subscription") else 2)  # a late subscriber hears at once
    assert sent[0][1] == 5 and sent[0][2].webhook is None
    assert sent[1][2].webhook is not None and sent[1][2].webhook.url == HOOK["url"]
    after = part.store.subscribers(PID)
    assert after.subscriptions == () and set(after.notified) >= {"a", "b"}
    assert not notifications(part.batch(completing, {"op": "resolve"}, now=later + 1))


def test_active_timeouts_and_timer_promises_notify_too() -> None:
    part = Partition()
    part.batch(create(timeout=NOW + 10, tags={"resonate:timeout": "true"}), sub("a"))
    pending = part.store.get(PID)
    assert pending is not None
    effects = part.batch(due=[pending], now=NOW + 10)
    ((topic, _, note),) = notifications(effects)
    assert (topic, note.promise.state, note.promise.completed_on) == ("inbox", "RESOLVED", NOW + 10)


def test_subscribing_to_a_completed_promise_notifies_at_once_and_a_repeat_changes_nothing() -> None:
    part = Partition()
    part.batch(create(), {"op": "resolve"})
    effects = part.batch(sub("a"))
    ((_, _, note),) = notifications(effects)
    (reply,) = answers(effects)
    assert (reply.status, reply.subscription, note.promise.state) == ("created", None, "RESOLVED")
    again = part.batch(sub("a"), sub("a", HOOK))
    assert [r.status for r in answers(again)] == ["deduplicated", "deduplicated"]
    assert not notifications(again) and not again.persist


def test_a_repeated_subscription_keeps_its_first_target() -> None:
    part = Partition()
    part.batch(create(), sub("a"))
    effects = part.batch(sub("a", HOOK))
    (reply,) = answers(effects)
    assert reply.status == "deduplicated" and reply.subscription is not None
    assert reply.subscription.target == TopicTarget("inbox", 5) and not effects.persist


def test_subscribe_to_a_missing_promise_is_not_found_and_stores_nothing() -> None:
    part = Partition()
    effects = part.batch(sub("a"))
    assert [r.status for r in answers(effects)] == ["not_found"] and not effects.persist
    assert part.store.subscribers(PID) == NONE


def test_a_promise_takes_a_bounded_number_of_subscriptions() -> None:
    part = Partition(Limits(max_subscriptions=2))
    part.batch(create(), sub("a"), sub("b"))
    effects = part.batch(sub("c"), sub("a"))
    assert [(r.status, r.error is not None) for r in answers(effects)] == [("invalid", True), ("deduplicated", False)]
    assert [m.topic for m in effects.messages].count(TOPICS.dlq) == 1


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ({"type": "kafka", "topic": TOPICS.events}, "own topics"),
        ({"type": "kafka", "topic": TOPICS.notifications}, "own topics"),
        ({"type": "kafka", "topic": "__consumer_offsets"}, "internal"),
        ({"type": "kafka", "topic": "nowhere"}, "does not exist"),
        ({"type": "kafka", "topic": "compacted"}, "compacted"),
        ({"type": "kafka", "topic": "inbox", "partition": 6}, "6 partitions"),
        ({"type": "webhook", "url": "ftp://x/"}, "http:// or https://"),
        ({"type": "webhook", "url": "https:///no-host"}, "http:// or https://"),
        ({"type": "webhook", "url": "https://x/", "headers": {"A": "b\r\nInjected: 1"}}, "line break"),
        ({"type": "webhook", "url": "https://x/", "headers": {"A": "b\u0001"}}, "control character"),
        ({"type": "webhook", "url": "https://x/", "headers": {"Host": "admin.internal"}}, "not allowed"),
        ({"type": "webhook", "url": "https://x/", "headers": {"Content-Length": "1"}}, "not allowed"),
        ({"type": "webhook", "url": "https://x/", "headers": {"Proxy-Authorization": "x"}}, "not allowed"),
        ({"type": "webhook", "url": "https://x/", "headers": {"Bad Name": "v"}}, "not a header name"),
        ({"type": "webhook", "url": "https://x/\u007f"}, "http:// or https://"),
        ({"type": "webhook", "url": "https://x/" + "\u0001" * 400}, "bytes as JSON"),
        ({"type": "pigeon"}, "`target.type`"),
    ],
)
def test_a_target_is_checked_before_anything_is_stored(target: dict[str, Any], problem: str) -> None:
    part = Partition()
    part.batch(create())
    effects = part.batch(sub("a", target))
    (reply,) = answers(effects)
    assert reply.status == "invalid" and problem in (reply.error or ""), reply.error
    assert not effects.persist


def test_webhooks_need_the_notifications_topic() -> None:
    topics = {name: info for name, info in TOPIC_INFO.items() if name != TOPICS.notifications}
    part = Partition(topics=topics)
    part.batch(create())
    (reply,) = answers(part.batch(sub("a", HOOK)))
    assert reply.status == "invalid" and "dp topics create" in (reply.error or "")


def test_a_notification_whose_topic_is_gone_goes_to_the_dlq_and_the_completion_still_commits() -> None:
    part = Partition()
    part.batch(create(), sub("a"))
    part.topics = {name: info for name, info in TOPIC_INFO.items() if name != "inbox"}
    effects = part.batch({"op": "resolve"})
    (letter,) = [m for m in effects.messages if m.topic == TOPICS.dlq]
    assert letter.headers is not None and b"'inbox' is gone or refuses" in dict(letter.headers)["dp.error"]
    assert decode_notification(letter.value).promise.state == "RESOLVED"
    assert [r.status for r in answers(effects)] == ["resolved"]


def test_the_stored_record_is_a_promise_record_with_its_subscriptions_beside() -> None:
    part = Partition()
    part.batch(create(param={"headers": {}, "data": "aGk="}), sub("a"))
    promise = part.store.get(PID)
    assert promise is not None and promise.param == Value({}, b"hi")
    stored = stored_value(promise, part.store.subscribers(PID))
    assert decode_promise(stored) == promise
    assert [s.id for s in decode_subscribers(stored).subscriptions] == ["a"]
    assert set(json.loads(stored)) - set(json.loads(stored_value(promise, NONE))) == {"subscriptions"}


def test_a_refused_subscribe_records_no_timeout_like_any_refused_command() -> None:
    part = Partition(Limits(max_subscriptions=1))
    part.batch(create(timeout=NOW + 10), sub("a"))
    refused = part.batch(sub("b"), now=NOW + 20)
    assert [r.status for r in answers(refused)] == ["invalid"]
    assert not refused.changed and not notifications(refused)
    timed_out = part.batch({"op": "get"}, now=NOW + 20)
    assert [n.subscription for _, _, n in notifications(timed_out)] == ["a"]
