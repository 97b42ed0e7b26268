"""Subscriptions through Kafka: one notification per subscription, in the completion's transaction, across kills;
and the client's waits multiplexed over one inbox."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import TopicAlreadyExistsError

from consumers.partition import Partition
from consumers.reply_topics import ReplyTopics
from dp.client import Promises, target_id
from dp.errors import ClientClosed, Refused, WaitTimeout
from dp.settings import Kafka, Topics
from dp.wire import NOTIFICATION_KIND, Notification, WebhookTarget, decode_notification, decode_reply
from tests.support import REPO, GatewayProcess, ServeProcess, complete, create, now_ms, unique
from tests.test_commit_path import make_topic, set_configs
from tests.test_faults import Crash, in_process, partition_0_ids, wait_until
from tests.wire_client import WireClient, read_topic


def subscribe(promise_id: str, subscription: str, topic: str, **target: Any) -> dict[str, Any]:
    return {
        "op": "subscribe",
        "id": promise_id,
        "subscription": subscription,
        "target": {"type": "kafka", "topic": topic, **target},
    }


async def inbox(kafka: Kafka) -> str:
    name = f"inbox-{uuid.uuid4().hex[:8]}"
    await make_topic(kafka, name, partitions=3)
    return name


async def notifications(kafka: Kafka, topic: str) -> list[tuple[int, Notification]]:
    return [
        (record.partition, decode_notification(record.value))
        for record in await read_topic(kafka, topic)
        if ("dp.kind", NOTIFICATION_KIND) in record.headers
    ]


def per_subscription(found: list[tuple[int, Notification]]) -> Counter[tuple[str, str]]:
    return Counter((note.promise.id, note.subscription) for _, note in found)


async def test_every_completion_path_notifies_each_subscription_exactly_once(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    spawn()
    target = await inbox(kafka)
    paths = {"resolve": "RESOLVED", "reject": "REJECTED", "cancel": "REJECTED_CANCELED"}
    ids = {path: unique(path) for path in [*paths, "active", "lazy", "timer", "done", "refused"]}
    soon = now_ms() + 1_500
    async with WireClient(kafka, topics) as client:
        sent = await client.send_all([
            *(create(ids[p]) for p in [*paths, "done", "refused"]),
            create(ids["active"], timeout=soon),
            create(ids["lazy"], timeout=soon),
            create(ids["timer"], timeout=soon, tags={"resonate:timeout": "true"}),
        ])  # fmt: skip
        await client.wait_for(sent)
        await client.call(complete("resolve", ids["done"]))

        def subscribes() -> list[dict[str, Any]]:
            return [subscribe(i, "s1", target, partition=2) for i in ids.values()] + [
                subscribe(i, "s2", target, key="k") for i in ids.values()
            ]

        replies = await client.wait_for(await client.send_all(subscribes()))
        assert sorted(r.status for r in replies.values()) == ["created"] * len(replies)
        repeats = await client.wait_for(await client.send_all(subscribes()))
        assert {r.status for r in repeats.values()} == {"deduplicated"}
        await client.wait_for(await client.send_all([complete(op, ids[op]) for op in paths]))
        await client.call(complete("resolve", ids["refused"]))
        refused = await client.call(complete("reject", ids["refused"], key="other"))
        assert refused.status == "already_resolved"
        await wait_until(lambda: now_ms() > soon + 200, 10, "the short timeouts passing")
        assert (await client.call({"op": "get", "id": ids["lazy"]})).promise.state == "REJECTED_TIMEDOUT"  # type: ignore[union-attr]
        expected = {(i, s) for i in ids.values() for s in ("s1", "s2")}
        found: list[tuple[int, Notification]] = []

        async def all_arrived() -> bool:
            found[:] = await notifications(kafka, target)
            return set(per_subscription(found)) >= expected

        for _ in range(300):  # the active timeouts fire on the processor's schedule
            if await all_arrived():
                break
            await asyncio.sleep(0.2)
    assert per_subscription(found) == Counter({pair: 1 for pair in expected})
    states = {note.promise.id: note.promise.state for _, note in found}
    assert states == {
        **{ids[p]: state for p, state in paths.items()},
        ids["active"]: "REJECTED_TIMEDOUT",
        ids["lazy"]: "REJECTED_TIMEDOUT",
        ids["timer"]: "RESOLVED",
        ids["done"]: "RESOLVED",
        ids["refused"]: "RESOLVED",
    }
    assert {partition for (partition, note) in found if note.subscription == "s1"} == {2}


async def test_a_crash_between_the_kafka_commit_and_the_rocksdb_write_notifies_each_subscription_once(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The completions' transaction commits (with its notifications) and the process dies before RocksDB
    hears of it: the restarted owner restores the completed records, so repeated completions and
    subscribes notify nobody again."""
    group = f"g-{uuid.uuid4().hex[:8]}"
    target = await inbox(kafka)
    ids = partition_0_ids("n", 20)
    async with WireClient(kafka, topics) as client:
        first = spawn("a", group=group)
        await client.wait_for(await client.send_all([create(i) for i in ids]))
        await client.wait_for(await client.send_all([subscribe(i, "s", target) for i in ids]))
        assert first.stop() == 0

        monkeypatch.setattr(Partition, "persist", lambda *_: (_ for _ in ()).throw(Crash))
        async with in_process(kafka, topics, tmp_path / "data-a", group) as dying:
            sent = await client.send_all([complete("resolve", i) for i in ids])
            fetched: list[Any] = []
            while len(fetched) < len(ids):
                fetched.extend((await dying.consumer.getmany(dying.source, timeout_ms=500)).get(dying.source, []))
            dying.partition.offer(fetched, dying.consumer)
            with pytest.raises(Crash):
                await dying.committer.cycle()
            await client.wait_for(sent)  # committed: the replies (and notifications) are out
        spawn("a", group=group)
        again = await client.wait_for(await client.send_all([complete("resolve", i, key="again") for i in ids]))
        assert {r.status for r in again.values()} == {"already_resolved"}
        repeats = await client.wait_for(await client.send_all([subscribe(i, "s", target) for i in ids]))
        assert {(r.status, r.promise.state if r.promise else None) for r in repeats.values()} == {
            ("deduplicated", "RESOLVED")
        }
    assert per_subscription(await notifications(kafka, target)) == Counter({(i, "s"): 1 for i in ids})


async def test_kill_9_while_subscribed_promises_complete_notifies_each_once(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    victim, survivor = spawn("a"), spawn("b")
    target = await inbox(kafka)
    ids = [unique("k") for _ in range(600)]
    async with WireClient(kafka, topics) as client:
        await client.wait_for(await client.send_all([create(i) for i in ids]), seconds=90)
        await client.wait_for(await client.send_all([subscribe(i, "s", target) for i in ids]), seconds=90)
        sent = await client.send_all([complete("resolve", i) for i in ids])
        await wait_until(lambda: sum(1 for r in sent if client.replies.get(r)) > len(sent) // 4, 60, "replies")
        victim.kill()
        victim.start()
        await client.wait_for(sent, seconds=120)
    assert survivor.alive and victim.alive
    assert per_subscription(await notifications(kafka, target)) == Counter({(i, "s"): 1 for i in ids})


async def test_wait_many_and_as_completed_share_one_inbox(kafka: Kafka, topics: Topics, promises: Promises) -> None:
    ids = [unique("many") for _ in range(300)]
    await asyncio.gather(*(promises.create(i, timeout=3600) for i in ids))
    await promises.resolve(ids[0], data="early")  # completed before anyone waits
    order = ids[1:]
    random.shuffle(order)
    streamed: list[str] = []

    async def follow() -> None:
        async for promise in promises.as_completed(ids, timeout=120):
            streamed.append(promise.id)

    following = asyncio.create_task(follow())
    waiting = asyncio.create_task(promises.wait_many(ids, timeout=120))
    await wait_until(lambda: len(streamed) == 1, 60, "the early completion arriving")
    for promise_id in order:
        await promises.resolve(promise_id, data=promise_id)
    completed = await waiting
    await following
    assert list(completed) == ids and {p.state for p in completed.values()} == {"RESOLVED"}
    assert all(completed[i].value.data == i.encode() for i in order)
    assert streamed[0] == ids[0] and sorted(streamed) == sorted(ids)
    assert streamed[1:] == order, "as_completed yields in completion order"
    assert not promises._awaiting, "every wait was answered and forgotten"
    inbox_notes = await notifications(kafka, topics.replies)
    assert Counter(note.promise.id for _, note in inbox_notes if note.promise.id in order) == Counter(order)


async def test_a_restarted_client_resubscribes_and_loses_nothing(
    kafka: Kafka, topics: Topics, promises: Promises
) -> None:
    pending = unique("restart")
    await promises.create(pending, timeout=3600)
    async with Promises(kafka=kafka, topics=topics, reply_partition=promises.reply_partition) as first:
        with pytest.raises(WaitTimeout):
            await first.wait(pending, timeout=0.5)
    await promises.resolve(pending, data="while away")  # nobody of that inbox is reading
    async with Promises(kafka=kafka, topics=topics, reply_partition=promises.reply_partition) as second:
        assert (await second.wait(pending, timeout=30)).value.data == b"while away"
    with pytest.raises(Refused, match="does not exist"):
        await promises.wait(unique("missing"), timeout=30)
    replies = [decode_reply(r.value) for r in await read_topic(kafka, topics.replies) if not r.headers]
    statuses = [r.status for r in replies if r.op == "subscribe" and r.id == pending]
    assert statuses == ["created", "deduplicated"]


async def test_the_readme_examples_of_awaiting_and_subscribing_work_as_written(
    kafka: Kafka,
    topics: Topics,
    spawn: Callable[..., ServeProcess],
    gateways: Callable[..., GatewayProcess],
    bootstrap_servers: str,
) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Awaiting completions and subscribing") :]
    section = section[: section.index("\n## ")]
    (program,) = re.findall(r"```python\n(.*?)```", section, re.S)
    (block,) = re.findall(r"```sh\n(.*?)```", section, re.S)
    spawn()
    gateway = gateways()
    env = {**os.environ, "DP_BOOTSTRAP_SERVERS": bootstrap_servers, "DP_TOPIC_PREFIX": topics.prefix}
    ran = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", program], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[-1] == "1000 completed" and len(lines) == 1001
    assert sorted(lines[:-1]) == sorted(f"batch/7/{n} RESOLVED" for n in range(1_000))

    with contextlib.suppress(TopicAlreadyExistsError):
        await make_topic(kafka, "billing.inbox")
    async with WireClient(kafka, topics) as client:
        await client.call(create("order/42"))
    script = block.replace(".venv/bin/dp", f"{sys.executable} -m dp.cli").replace("127.0.0.1:8001", gateway.url)
    ran = await asyncio.to_thread(
        subprocess.run, ["bash", "-euo", "pipefail", "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    out = ran.stdout.splitlines()
    assert f"subscription {target_id(WebhookTarget('https://billing.example/hooks/done'))!r} waits" in out[0]
    assert "subscription 'billing' waits for the completion" in out
    answer = json.loads(out[-1])
    assert answer["callback"]["id"] == "billing" and answer["promise"]["state"] == "PENDING"


async def test_a_notification_kafka_refuses_goes_to_the_dlq_and_the_completion_commits(
    kafka: Kafka, topics: Topics, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The target topic shrinks its max.message.bytes behind the processor's back (its description stays
    stale, as a topic whose ACLs refuse dp would look): the first transaction is refused, then the
    command's notification goes to the DLQ and the resolve itself commits."""
    target = await inbox(kafka)
    (promise_id,) = partition_0_ids("big", 1)
    group = f"g-{uuid.uuid4().hex[:8]}"
    async with in_process(kafka, topics, tmp_path / "data", group) as owner, WireClient(kafka, topics) as client:

        async def apply(*commands: dict[str, Any]) -> list[str]:
            sent = await client.send_all(list(commands))
            fetched: list[Any] = []
            while len(fetched) < len(commands):
                fetched.extend((await owner.consumer.getmany(owner.source, timeout_ms=500)).get(owner.source, []))
            owner.partition.offer(fetched, owner.consumer)
            await owner.committer.cycle()
            return sent

        big = {"headers": {}, "data": base64.b64encode(b"x" * 200_000).decode()}
        await client.wait_for(await apply(create(promise_id, param=big), subscribe(promise_id, "s", target)))
        await set_configs(kafka, target, **{"max.message.bytes": "100000"})
        monkeypatch.setattr(ReplyTopics, "refresh", lambda *_, **__: asyncio.sleep(0, result=False))
        (resolving,) = await apply(complete("resolve", promise_id))
        assert (await client.wait_for([resolving]))[resolving].status == "resolved"
        assert owner.failures == []
    assert await notifications(kafka, target) == []
    (letter,) = [r for r in await read_topic(kafka, topics.dlq) if ("dp.kind", NOTIFICATION_KIND) in r.headers]
    assert b"refuses dp's writes" in dict(letter.headers)["dp.error"]
    assert decode_notification(letter.value).promise.state == "RESOLVED"


async def test_as_completed_times_out_in_its_own_wait_never_in_the_callers_loop_body(promises: Promises) -> None:
    done, pending = unique("done"), unique("pending")
    await promises.create(done, timeout=3600)
    await promises.create(pending, timeout=3600)
    await promises.resolve(done)
    seen: list[str] = []
    with pytest.raises(WaitTimeout, match=pending):
        async for promise in promises.as_completed([done, pending], timeout=0.5):
            seen.append(promise.id)
            await asyncio.sleep(1.0)  # the caller's own work outlasts the deadline: it is not cut short
            seen.append("body finished")
    assert seen == [done, "body finished"]
    with pytest.raises(ClientClosed):
        await Promises(kafka=promises.kafka, topics=promises.topics).wait(done)
