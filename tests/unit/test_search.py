"""Search, pure: matching, one partition's page, the merge, cursors, and the processor's answers to the
`search` op (pages, the batch's own writes, `unchanged` and when it must not be said)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import msgspec
import pytest

from consumers.effects import Route, TopicInfo, apply_batch
from dp.client import _one_transaction
from dp.search import (
    BadCursor,
    PartitionPage,
    Query,
    compile_pattern,
    decode_cursor,
    encode_cursor,
    merge,
    partition_page,
    position,
)
from dp.settings import Topics
from dp.wire import DEFAULT_LIMITS, Position, Promise, Reply, Snapshot, Value, decode_reply
from tests.memory import MemoryStore

TOPICS = Topics("t")
NOW = 1_000_000
KEY = b"k" * 32
COUNTS = {TOPICS.replies: TopicInfo(1), TOPICS.dlq: TopicInfo(1)}


def promise(id: str, created_on: int, state: str = "PENDING", timeout: int = NOW + 60_000, **tags: str) -> Promise:
    done = None if state == "PENDING" else created_on + 1
    return Promise(id, state, Value(), Value(), timeout, None, None, dict(tags), created_on, done)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pattern", "matching", "not_matching"),
    [
        ("*", ["a", "a/b", ""], []),
        ("order/*", ["order/", "order/1", "order/1/x"], ["orders/1", "x/order/1"]),
        ("*/done", ["a/done", "/done"], ["a/done/x", "done"]),
        ("a*b*c", ["abc", "a-b-c", "abbc"], ["ab", "acb"]),
        ("a.b", ["a.b"], ["axb"]),
        ("(x)+", ["(x)+"], ["x", "xx"]),
        ("line\n*", ["line\nmore"], ["line"]),
    ],
)
def test_a_star_matches_any_run_and_every_other_character_itself(
    pattern: str, matching: list[str], not_matching: list[str]
) -> None:
    compiled = compile_pattern(pattern)
    assert all(compiled.fullmatch(id) for id in matching)
    assert not any(compiled.fullmatch(id) for id in not_matching)


def test_a_page_is_newest_first_filtered_and_bounded_by_count() -> None:
    records = [promise("p3", 3), promise("p2", 2, "RESOLVED"), promise("p1", 1, "REJECTED_CANCELED", team="x")]
    candidates = [(position(p), p) for p in records]
    assert partition_page(Query("*", "pending"), candidates, NOW, 10**6).promises == [records[0]]
    assert partition_page(Query("*", "rejected"), candidates, NOW, 10**6).promises == [records[2]]
    assert partition_page(Query("*", tags={"team": "x"}), candidates, NOW, 10**6).promises == [records[2]]
    two = partition_page(Query("*", limit=2), candidates, NOW, 10**6)
    assert two.promises == records[:2] and two.next == position(records[1])
    assert partition_page(Query("*", limit=3), candidates, NOW, 10**6).next is None


def test_a_pending_promise_past_its_timeout_shows_timed_out_and_filters_so() -> None:
    due = promise("due", 1, timeout=NOW)
    candidates = [(position(due), due)]
    assert partition_page(Query("*", "pending"), candidates, NOW, 10**6).promises == []
    (shown,) = partition_page(Query("*", "rejected"), candidates, NOW, 10**6).promises
    assert shown.state == "REJECTED_TIMEDOUT" and shown.completed_on == NOW


def test_a_page_is_bounded_by_bytes_but_always_holds_its_first_match() -> None:
    big = [msgspec.structs.replace(promise(f"p{n}", 10 - n), param=Value(data=b"x" * 512 * 1024)) for n in range(100)]
    page = partition_page(Query("*"), [(position(p), p) for p in big], NOW, 2 * 1024 * 1024)
    assert len(page.promises) == 2 and page.next == position(big[1])  # 2 x ~683 KiB of base64 fit, 3 do not
    alone = partition_page(Query("*"), [(position(p), p) for p in big], NOW, 1)
    assert len(alone.promises) == 1


def test_a_scan_stops_after_its_budget_and_says_where_it_stopped() -> None:
    places = [(Position(1000 - n, f"x{n}"), None) for n in range(50)]
    page = partition_page(Query("*"), places, NOW, 10**6, scan_budget=20)
    assert page.promises == [] and page.next == Position(981, "x19")


def test_the_merge_is_newest_first_and_never_passes_where_a_partition_stopped() -> None:
    a = [promise("a9", 9), promise("a5", 5), promise("a1", 1)]
    b = [promise("b8", 8), promise("b6", 6)]
    merged, resume = merge(100, [PartitionPage(a, None), PartitionPage(b, position(b[-1]))], 10**6)
    assert [p.id for p in merged] == ["a9", "b8", "b6"] and resume == position(b[-1])
    merged, resume = merge(2, [PartitionPage(a, None), PartitionPage(b, None)], 10**6)
    assert [p.id for p in merged] == ["a9", "b8"] and resume == position(b[0])
    merged, resume = merge(100, [PartitionPage(a, None), PartitionPage(b, None)], 10**6)
    assert len(merged) == 5 and resume is None
    merged, resume = merge(5, [PartitionPage(a, None), PartitionPage(b, None)], 10**6)
    assert len(merged) == 5 and resume == position(a[-1])  # a full page always has a cursor


def test_ties_in_creation_time_are_ordered_by_id() -> None:
    same = [promise("b", 5), promise("a", 5), promise("c", 5)]
    merged, _ = merge(100, [PartitionPage(same[:2], None), PartitionPage(same[2:], None)], 10**6)
    assert [p.id for p in merged] == ["c", "b", "a"]


def test_a_cursor_round_trips_and_cannot_be_edited_or_made_elsewhere() -> None:
    query = Query("order/*", "pending", {"team": "x"}, 10)
    cursor = encode_cursor(query, Position(5, "order/7"), KEY)
    assert decode_cursor(cursor, KEY) == (query, Position(5, "order/7"))
    body, mac = cursor.split(".")
    forged_body = base64.urlsafe_b64encode(json.dumps([1, ["*", None, {}, 100], [5, "order/7"]]).encode())
    for bad in [
        "",
        "garbage",
        f"{body}.",
        f"{body}.{mac[:-2]}AA",
        f"{forged_body.decode().rstrip('=')}.{mac}",
        "ünïcode.x",
        f"{body}",
    ]:
        with pytest.raises(BadCursor):
            decode_cursor(bad, KEY)
    with pytest.raises(BadCursor, match="another cursor key"):
        decode_cursor(cursor, b"another key")


# --- the processor's answers ------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    offset: int
    key: bytes | None
    value: bytes | None


def search(offset: int, pattern: str = "*", **fields: object) -> Record:
    return Record(
        offset, None, json.dumps({"op": "search", "id": pattern, "requestId": f"s{offset}", **fields}).encode()
    )


def create(offset: int, id: str, timeout: int = NOW + 60_000) -> Record:
    body = {"op": "create", "id": id, "timeout": timeout, "requestId": f"c{offset}"}
    return Record(offset, id.encode(), json.dumps(body).encode())


def answers(store: MemoryStore, records: list[Record], now: int = NOW) -> list[Reply]:
    """Apply one batch on a one-partition deployment, commit it to `store`, return its replies."""
    effects = apply_batch(Route(0, 1, TOPICS, DEFAULT_LIMITS), store, records, [], now, COUNTS)
    store.commit(effects.changes, effects.changed)
    return [decode_reply(m.value) for m in effects.messages if m.topic == TOPICS.replies]


def test_a_search_sees_the_writes_before_it_in_its_own_batch() -> None:
    store = MemoryStore({"old": promise("old", 1)})
    (_, page) = answers(store, [create(1, "new"), search(2)])
    assert page.status == "found" and [p.id for p in page.promises or []] == ["new", "old"]
    assert page.snapshot is not None and page.snapshot.version == 1 and page.snapshot.at == NOW


def test_unchanged_is_said_only_when_nothing_the_query_sees_has_changed() -> None:
    store = MemoryStore()
    answers(store, [create(1, "a/1"), create(2, "b/1")])
    (first,) = answers(store, [search(3, "a/*")])
    since = msgspec.to_builtins(first.snapshot)
    answers(store, [create(4, "b/2")])  # another prefix: invisible to the query
    (second,) = answers(store, [search(5, "a/*", since=since)])
    assert second.status == "unchanged" and second.promises is None
    answers(store, [create(6, "a/2")])
    (third,) = answers(store, [search(7, "a/*", since=since)])
    assert third.status == "found" and [p.id for p in third.promises or []] == ["a/2", "a/1"]


def test_a_promise_falling_due_between_the_rounds_is_a_change() -> None:
    store = MemoryStore()
    answers(store, [create(1, "a/1", timeout=NOW + 10)])
    (first,) = answers(store, [search(2, "a/*")])
    since = msgspec.to_builtins(first.snapshot)
    (later,) = answers(store, [search(3, "a/*", since=since)], now=NOW + 5)
    assert later.status == "unchanged"
    (due,) = answers(store, [search(4, "a/*", since=since)], now=NOW + 10)
    assert due.status == "found" and (due.promises or [])[0].state == "REJECTED_TIMEDOUT"


@pytest.mark.parametrize(
    "since",
    [
        {"partition": 1, "version": 0, "at": NOW},  # another partition's snapshot
        {"partition": 0, "version": 9, "at": NOW},  # a version this partition has not reached
        {"partition": 0, "version": 0, "at": NOW + 1},  # a time ahead of this partition's clock
    ],
)
def test_a_snapshot_that_cannot_be_checked_gets_a_fresh_page(since: dict[str, int]) -> None:
    store = MemoryStore({"a": promise("a", 1)})
    (reply,) = answers(store, [search(1, since=since)])
    assert reply.status == "found" and [p.id for p in reply.promises or []] == ["a"]


def test_a_snapshot_older_than_what_the_partition_recalls_gets_a_fresh_page() -> None:
    store = MemoryStore({"a": promise("a", 1)}, version=5, known_since=5)
    (reply,) = answers(store, [search(1, since={"partition": 0, "version": 4, "at": NOW})])
    assert reply.status == "found"


def test_a_keyed_search_is_refused() -> None:
    record = Record(1, b"x", json.dumps({"op": "search", "id": "*", "requestId": "s"}).encode())
    (reply,) = answers(MemoryStore(), [record])
    assert reply.status == "invalid" and "no key" in (reply.error or "")


def test_a_change_to_a_promise_without_the_querys_tags_is_invisible_to_it() -> None:
    store = MemoryStore()
    tagged = Record(
        1, b"a/1", json.dumps({"op": "create", "id": "a/1", "timeout": NOW + 60_000, "tags": {"t": "x"}}).encode()
    )
    answers(store, [tagged])
    (first,) = answers(store, [search(2, "a/*", tags={"t": "x"})])
    since = msgspec.to_builtins(first.snapshot)
    answers(store, [create(3, "a/2")])  # same prefix, no tag
    (second,) = answers(store, [search(4, "a/*", tags={"t": "x"}, since=since)])
    assert second.status == "unchanged"
    (untagged,) = answers(store, [search(5, "a/*", since=since)])
    assert untagged.status == "found"


def test_answers_carry_the_transaction_that_commits_them_and_one_shared_transaction_settles_a_round() -> None:
    route = Route(0, 1, TOPICS, DEFAULT_LIMITS)
    effects = apply_batch(route, MemoryStore(), [search(1)], [], NOW, COUNTS, transaction="cafe.7")
    (reply,) = [decode_reply(m.value) for m in effects.messages if m.topic == TOPICS.replies]
    assert reply.snapshot is not None and reply.snapshot.transaction == "cafe.7"

    def answered(*labels: str | None) -> list[Reply]:
        return [msgspec.structs.replace(reply, snapshot=Snapshot(n, 0, NOW, label)) for n, label in enumerate(labels)]

    assert _one_transaction(answered("cafe.7", "cafe.7", "cafe.7"))
    assert not _one_transaction(answered("cafe.7", "cafe.8", "cafe.7"))
    assert not _one_transaction(answered(None, None))  # answers committed alone say nothing of each other
