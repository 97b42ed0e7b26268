"""The asyncio client against the real broker and a spawned processor."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from dp.client import Promises, Result, deadline_ms
from dp.errors import BrokerUnreachable, ClientClosed, Refused, ReplyTimeout, TopicsProblem, WaitTimeout
from dp.settings import Kafka, Topics
from dp.wire import Event, Promise
from tests.support import free_port, unique

HOUR = timedelta(hours=1)


def record(result: Result) -> Promise:
    assert result.promise is not None, result
    return result.promise


async def take(stream: AsyncIterator[Event], count: int, seconds: float = 30.0) -> list[Event]:
    async with asyncio.timeout(seconds):
        return [await anext(stream) for _ in range(count)]


async def test_every_command_returns_a_typed_result(promises: Promises) -> None:
    order = unique("order")
    created = await promises.create(
        order, timeout=HOUR, param='{"item": 7}', headers={"content-type": "json"}, tags={"t": "1"}, idempotency_key="k"
    )
    assert (created.status, created.ok, created.error) == ("created", True, None)
    assert created.promise is not None and created.promise.state == "PENDING"
    assert created.promise.param.data == b'{"item": 7}' and created.promise.param.headers == {"content-type": "json"}
    assert created.promise.tags == {"t": "1"} and created.promise.idempotency_key_for_create == "k"
    assert abs(created.promise.timeout - (time.time() + 3600) * 1000) < 60_000
    assert (await promises.create(order, timeout=HOUR, idempotency_key="k")).status == "deduplicated"

    refused = await promises.create(order, timeout=HOUR)  # a fresh key: not a repeat
    assert (refused.status, refused.ok) == ("already_pending", False)
    with pytest.raises(Refused, match="already exists, pending"):
        refused.raise_for_status()

    resolved = (await promises.resolve(order, data=b"\x00shipped", headers={"h": "v"})).raise_for_status()
    assert resolved.status == "resolved" and resolved.promise is not None
    assert resolved.promise.value.data == b"\x00shipped" and resolved.promise.value.headers == {"h": "v"}
    key = resolved.promise.idempotency_key_for_complete
    assert key, "a completion gets an idempotency key by default"
    assert (await promises.resolve(order, idempotency_key=key)).status == "deduplicated"
    assert (await promises.reject(order)).status == "already_resolved"

    rejected, canceled = unique("rejected"), unique("canceled")
    at = datetime.now(UTC) + HOUR
    assert record(await promises.create(rejected, timeout=at)).timeout == int(at.timestamp() * 1000)
    assert (await promises.create(canceled, timeout=60)).ok
    assert record(await promises.reject(rejected, data="no")).state == "REJECTED"
    assert record(await promises.cancel(canceled)).state == "REJECTED_CANCELED"

    expired = unique("expired")
    assert (await promises.create(expired, timeout=datetime.now(UTC) - HOUR)).status == "created"
    assert (await promises.resolve(expired, strict=True)).status == "already_timedout"
    assert (await promises.resolve(expired)).status == "deduplicated"

    found = await promises.get(rejected)
    assert found.status == "found" and found.promise is not None and found.promise.value.data == b"no"
    missing = await promises.get(unique("missing"))
    assert (missing.status, missing.ok, missing.promise) == ("not_found", False, None)
    invalid = await promises.get("x" * 300)
    assert invalid.status == "invalid" and "at most 256" in (invalid.error or "")


async def test_a_timeout_is_required_and_must_mean_a_point_in_time() -> None:
    now = 1_000.0
    assert deadline_ms(90, now) == 1_090_000
    assert deadline_ms(timedelta(minutes=1), now) == 1_060_000
    assert deadline_ms(datetime(2030, 1, 1, tzinfo=UTC)) == 1_893_456_000_000
    with pytest.raises(ValueError, match="timezone-aware"):
        deadline_ms(datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="not in the future"):
        deadline_ms(0, now)
    with pytest.raises(TypeError):
        deadline_ms("1h", now)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="timeout"):
        await Promises().create("x")  # type: ignore[call-arg]


async def test_wait_sees_a_completion_before_during_and_after_it_is_called(promises: Promises) -> None:
    before = unique("before")
    await promises.create(before, timeout=HOUR)
    await promises.resolve(before, data="early")
    assert (await promises.wait(before)).value.data == b"early"

    racing = [unique("during") for _ in range(10)]
    await asyncio.gather(*(promises.create(i, timeout=HOUR) for i in racing))
    waits = [asyncio.create_task(promises.wait(i)) for i in racing]
    await asyncio.gather(*(promises.resolve(i) for i in racing))
    assert {(await w).state for w in waits} == {"RESOLVED"}

    after = unique("after")
    await promises.create(after, timeout=HOUR)
    with pytest.raises(WaitTimeout, match=r"did not complete within 0\.5s"):
        await promises.wait(after, timeout=0.5)
    waiting = asyncio.create_task(promises.wait(after, timeout=30))
    done, _ = await asyncio.wait({waiting}, timeout=1.0)
    assert not done, "wait returned while the promise was pending"
    await promises.reject(after, data="late")
    assert (await waiting).state == "REJECTED"

    timing_out = unique("times-out")
    await promises.create(timing_out, timeout=1.0)
    assert (await promises.wait(timing_out, timeout=timedelta(seconds=20))).state == "REJECTED_TIMEDOUT"
    with pytest.raises(Refused, match="does not exist"):
        await promises.wait(unique("missing"))


async def test_concurrent_requests_and_clients_each_get_their_own_replies(
    kafka: Kafka, topics: Topics, promises: Promises
) -> None:
    ids = [unique("many") for _ in range(100)]
    results = await asyncio.gather(*(promises.create(i, timeout=HOUR) for i in ids))
    assert [r.promise.id if r.promise else None for r in results] == ids
    assert {r.status for r in results} == {"created"}
    assert len({r.reply.request_id for r in results}) == 100

    async with Promises(kafka=kafka, topics=topics, reply_partition=promises.reply_partition) as other:
        mine = asyncio.gather(*(promises.resolve(i) for i in ids[:50]))
        theirs = asyncio.gather(*(other.get(i) for i in ids[50:]))
        resolved, found = await asyncio.gather(mine, theirs)
    assert [(r.reply.op, r.promise.id if r.promise else None) for r in resolved] == [("resolve", i) for i in ids[:50]]
    assert [(r.reply.op, r.promise.id if r.promise else None) for r in found] == [("get", i) for i in ids[50:]]
    assert not promises._waiting, "every request was answered and forgotten"


async def test_events_filter_and_a_group_resumes_after_the_last_event_handled(promises: Promises) -> None:
    tag = uuid.uuid4().hex[:6]
    p1, p2, q1 = f"p/{tag}/1", f"p/{tag}/2", f"q/{tag}/1"
    for promise_id in (p1, p2, q1):
        await promises.create(promise_id, timeout=HOUR)
    await promises.resolve(p1)
    await promises.cancel(p2)
    await promises.reject(q1)
    everything = [(e.type, e.promise.id) for e in await take(promises.events(from_beginning=True), 6)]
    assert sorted(everything) == sorted(
        [("created", p1), ("created", p2), ("created", q1), ("resolved", p1), ("canceled", p2), ("rejected", q1)]
    )
    by_prefix = await take(promises.events(from_beginning=True, prefix="p/"), 4)
    assert {e.promise.id for e in by_prefix} == {p1, p2}
    completions = await take(promises.events(from_beginning=True, types=["canceled", "rejected"]), 2)
    assert {(e.type, e.promise.id) for e in completions} == {("canceled", p2), ("rejected", q1)}

    group = unique("group")
    first = promises.events(group=group, from_beginning=True)
    handled = await take(first, 3)
    await first.aclose()
    rest = await take(promises.events(group=group, from_beginning=True), 4)
    # The first two were committed when the third was asked for; the third was in hand, so it comes again.
    assert sorted(handled[:2] + rest, key=repr) == sorted(await take(promises.events(from_beginning=True), 6), key=repr)
    assert handled[2] in rest


async def test_no_processor_means_a_reply_timeout_that_says_a_retry_is_safe(kafka: Kafka, topics: Topics) -> None:
    async with Promises(kafka=kafka, topics=topics, reply_timeout=0.5) as promises:
        with pytest.raises(ReplyTimeout, match=r"no reply within 0.5s .*may still be applied.*'ik-1'.* is safe"):
            await promises.create("nobody-home", timeout=HOUR, idempotency_key="ik-1")
        with pytest.raises(ReplyTimeout, match="retrying is safe"):
            await promises.get("nobody-home", reply_timeout=0.2)
    with pytest.raises(ClientClosed):
        await promises.get("x")
    with pytest.raises(BrokerUnreachable, match="no Kafka broker answered"):
        await Promises(f"127.0.0.1:{free_port()}").start()
    with pytest.raises(TopicsProblem, match="dp topics create"):
        await Promises(kafka=kafka, topics=Topics(unique("none"))).start()


async def test_a_client_is_healthy_while_it_runs(promises: Promises) -> None:
    assert promises.healthy
    await promises.close()
    assert not promises.healthy


async def test_an_event_stream_says_when_it_is_in_place_and_misses_nothing_after(promises: Promises) -> None:
    positioned = asyncio.Event()
    prefix = unique("placed") + "/"
    stream = promises.events(prefix=prefix, positioned=positioned)
    first = asyncio.ensure_future(anext(stream))
    async with asyncio.timeout(30):
        await positioned.wait()
    assert not first.done()
    (await promises.create(f"{prefix}1", timeout=HOUR)).raise_for_status()
    async with asyncio.timeout(30):
        event = await first
    assert (event.type, event.promise.id) == ("created", f"{prefix}1")
    await stream.aclose()
