"""Processes die at the worst moments; nothing is lost, nothing is duplicated (slow: `scripts/test -m slow`)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable

import pytest

from dp.settings import Kafka, Topics
from dp.wire import decode_reply
from tests.replay import essence, events_per_promise, latest_changelog, replay
from tests.support import TEST_PARTITIONS, ServeProcess, complete, create, unique
from tests.wire_client import WireClient, read_topic

pytestmark = pytest.mark.slow


async def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {seconds}s")
        await asyncio.sleep(0.05)


def sharing(*processes: ServeProcess) -> bool:
    """Every partition is served, each by exactly one of `processes`, and each process serves some."""
    owned = [process.owned() for process in processes]
    every = [number for numbers in owned for number in numbers]
    return all(owned) and sorted(every) == list(range(TEST_PARTITIONS))


async def verify_exactly_once(kafka: Kafka, topics: Topics, request_ids: list[str], ids: list[str]) -> None:
    """Every request answered once, as the replay says; events complete and unduplicated; states equal."""
    replies = [decode_reply(record.value) for record in await read_topic(kafka, topics.replies)]
    counts = Counter(reply.request_id for reply in replies)
    assert [r for r in request_ids if counts[r] != 1] == []
    expected_status, expected_state = replay(await read_topic(kafka, topics.commands))
    actual_status = {reply.request_id: reply.status for reply in replies}
    assert {r: actual_status[r] for r in request_ids} == {r: expected_status[r] for r in request_ids}
    events = events_per_promise(await read_topic(kafka, topics.events))
    stored = latest_changelog(await read_topic(kafka, topics.changelog))
    for promise_id in ids:
        assert events[promise_id] == ["created", "resolved"], promise_id
        assert essence(stored[promise_id]) == essence(expected_state[promise_id]), promise_id


async def test_kill_9_mid_stream_loses_and_duplicates_nothing(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    victim, survivor = spawn("a"), spawn("b")
    ids = [unique(f"k{i}") for i in range(1200)]
    async with WireClient(kafka, topics) as client:
        sent = await client.send_all([create(i) for i in ids])
        await wait_until(lambda: sum(1 for r in sent if client.replies.get(r)) > len(sent) // 3, 60, "first replies")
        victim.kill()
        sent += await client.send_all([complete("resolve", i) for i in ids])
        sent += await client.send_all([complete("resolve", i) for i in ids[::3]])  # retries: deduplicated
        await wait_until(lambda: sum(1 for r in sent if client.replies.get(r)) > len(sent) * 2 // 3, 90, "more")
        victim.start()
        await client.wait_for(sent, seconds=120)
    assert survivor.alive and victim.alive
    await verify_exactly_once(kafka, topics, sent, ids)


async def test_a_stopped_zombie_is_fenced_and_nothing_it_did_is_visible(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    zombie, survivor = spawn("a"), spawn("b")
    ids: list[str] = []
    sent: list[str] = []
    streaming = True

    async def stream(client: WireClient) -> None:
        """Keep both processors busy so that the stop lands mid-batch, with a transaction open."""
        while streaming:
            batch = [unique("z") for _ in range(40)]
            ids.extend(batch)
            sent.extend(await client.send_all([create(i) for i in batch]))
            sent.extend(await client.send_all([complete("resolve", i) for i in batch]))

    await wait_until(lambda: sharing(zombie, survivor), 60, "both processors serving")
    async with WireClient(kafka, topics) as client:
        producer = asyncio.create_task(stream(client))
        await wait_until(lambda: sum(1 for r in sent if client.replies.get(r)) > 400, 60, "steady stream")
        zombie.signal(signal.SIGSTOP)
        stopped_at = len(sent)
        after_stop = lambda: sent[stopped_at : stopped_at + 400]  # noqa: E731
        await wait_until(
            lambda: len(after_stop()) == 400 and all(client.replies.get(r) for r in after_stop()),
            90,
            "the survivor taking over the zombie's partitions",
        )
        zombie.signal(signal.SIGCONT)
        resumed_at = len(sent)
        await wait_until(lambda: len(sent) > resumed_at + 800, 60, "more traffic after the zombie woke")
        streaming = False
        await producer
        await client.wait_for(sent, seconds=90)
    assert zombie.alive and survivor.alive
    await verify_exactly_once(kafka, topics, sent, ids)
