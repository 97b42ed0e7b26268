"""Retention in the processor's core: a completed promise past its retention is purged, and its id is free."""

from __future__ import annotations

import msgspec
import pytest

from consumers.effects import Effects, Route, TopicInfo, apply_batch
from dp.machine import retention_over
from dp.wire import DEFAULT_LIMITS, Promise, Value, decode_event, decode_reply
from tests.memory import MemoryStore
from tests.unit.test_effects import PARTITIONS, TOPICS, Record, command, owned_id

NOW = 1_000_000
RETENTION = 60_000
TOPIC_INFO = {TOPICS.replies: TopicInfo(3), TOPICS.dlq: TopicInfo(2), TOPICS.notifications: TopicInfo(2)}
PID = owned_id(0, "r")


def promise(state: str = "RESOLVED", completed_on: int | None = NOW - RETENTION, **fields: object) -> Promise:
    base = Promise(PID, "PENDING", Value(), Value(), NOW + 10**6, None, None, {}, NOW - 2 * RETENTION, None)
    return msgspec.structs.replace(base, state=state, completed_on=completed_on, **fields)  # type: ignore[arg-type]


def run(store: MemoryStore, *commands: dict[str, object], expired: list[Promise] | None = None) -> Effects:
    route = Route(0, PARTITIONS, TOPICS, DEFAULT_LIMITS, retention_ms=RETENTION)
    records = [command(n, **{"id": PID, "requestId": f"r{n}", **fields}) for n, fields in enumerate(commands)]
    records = [Record(r.offset, None, r.value) if b'"search"' in (r.value or b"") else r for r in records]
    effects = apply_batch(route, store, list[Record](records), [], NOW, TOPIC_INFO, expired=expired or [])
    store.persist(effects.persist, effects.changed, effects.purged)
    return effects


@pytest.mark.parametrize(
    ("record", "retention", "over"),
    [
        (promise(), RETENTION, True),  # exactly at completedOn + retention
        (promise(completed_on=NOW - RETENTION + 1), RETENTION, False),
        (promise(state="PENDING", completed_on=None), RETENTION, False),  # pending: never
        (promise(state="REJECTED_TIMEDOUT"), RETENTION, True),
        (promise(), None, False),  # no retention: forever
        (promise(completed_on=NOW - 1_000, tags={"dp:retention": "1s"}), RETENTION, True),  # its own, shorter
        (promise(completed_on=NOW - 1_000, tags={"dp:retention": "1s"}), None, True),  # even with none set
        (promise(tags={"dp:retention": "2m"}), RETENTION, False),  # its own, longer
        (promise(tags={"dp:retention": "forever"}), RETENTION, False),
        (promise(tags={"dp:retention": "soon"}), RETENTION, True),  # unreadable (older records): the default
    ],
)
def test_the_purge_rule(record: Promise, retention: int | None, over: bool) -> None:
    assert retention_over(record, NOW, retention) is over


def test_a_create_with_an_unreadable_retention_tag_is_invalid() -> None:
    effects = run(MemoryStore(), {"op": "create", "timeout": NOW + 5, "tags": {"dp:retention": "a while"}})
    (reply,) = [decode_reply(m.value or b"") for m in effects.messages if m.topic == TOPICS.replies]
    assert reply.status == "invalid" and "`tags.dp:retention`" in (reply.error or "")


def test_a_purge_writes_a_tombstone_and_no_event_and_frees_the_id() -> None:
    store = MemoryStore({PID: promise()}, version=4, history=["x"] * 4)
    effects = run(store, {"op": "get"}, expired=[promise()])
    tombstones = [m for m in effects.messages if m.topic == TOPICS.changelog and m.value is None]
    assert [m.key for m in tombstones] == [PID.encode()]
    assert not [m for m in effects.messages if m.topic == TOPICS.events]
    assert [decode_reply(m.value or b"").status for m in effects.messages if m.topic == TOPICS.replies] == ["not_found"]
    assert effects.changed == [PID] and PID not in store.records  # a change: searches see the promise go


def test_a_create_after_the_purge_makes_a_new_promise_in_the_same_batch() -> None:
    store = MemoryStore({PID: promise(idempotency_key_for_create="k")})
    effects = run(store, {"op": "create", "timeout": NOW + 5, "idempotencyKey": "k"}, expired=[promise()])
    changelog = [m for m in effects.messages if m.topic == TOPICS.changelog]
    assert [m.value is None for m in changelog] == [True, False]  # the tombstone before the new record
    assert [decode_event(m.value or b"").type for m in effects.messages if m.topic == TOPICS.events] == ["created"]
    assert store.records[PID].state == "PENDING" and store.records[PID].created_on == NOW


def test_a_promise_not_past_its_retention_or_pending_is_never_purged() -> None:
    young, pending = promise(completed_on=NOW - 1), promise(state="PENDING", completed_on=None)
    for record in (young, pending):
        store = MemoryStore({PID: record})
        effects = run(store, expired=[record])
        assert not effects.purged and store.records == {PID: record}


def test_a_search_does_not_see_a_purged_promise_and_knows_it_changed() -> None:
    store = MemoryStore({PID: promise(tags={"t": "1"})}, version=1, history=[PID])
    first = run(store, {"op": "search", "id": "r*", "tags": {"t": "1"}})
    (page,) = [decode_reply(m.value or b"") for m in first.messages if m.topic == TOPICS.replies]
    assert [p.id for p in page.promises or []] == [PID] and page.snapshot is not None
    since = {"partition": 0, "version": page.snapshot.version, "at": page.snapshot.at}
    effects = run(store, {"op": "search", "id": "r*", "tags": {"t": "1"}, "since": since}, expired=[promise()])
    (again,) = [decode_reply(m.value or b"") for m in effects.messages if m.topic == TOPICS.replies]
    assert (again.status, again.promises) == ("found", [])
