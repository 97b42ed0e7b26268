"""Every batch commits whole or not at all, whatever a command names or carries (black box, real broker).

Each test is one defect found by a review of the commit path: a reply address that named the
deployment's own topics, a DLQ copy or a reply too large for its topic, a processor clock Kafka
refuses, a reply topic deleted under the processor, a data dir older than the topics, and a
backlog of large commands.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import Counter
from collections.abc import Callable

import pytest
from aiokafka.admin import NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from dp import kafka as clients
from dp.settings import Kafka, Topics
from dp.topics import all_topics, create_topics, partition_counts, wait_until_ready
from dp.wire import decode_event, decode_promise, decode_reply
from tests.support import LONG, TEST_PARTITIONS, ServeProcess, complete, create, unique
from tests.wire_client import WireClient, read_topic


async def make_topic(kafka: Kafka, name: str, partitions: int = 2, **configs: str) -> None:
    async with clients.started(kafka, clients.admin(kafka)) as admin:
        await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=configs)])
        await wait_until_ready(admin, (name,))


async def delete_topic(kafka: Kafka, name: str) -> None:
    async with clients.started(kafka, clients.admin(kafka)) as admin:
        await admin.delete_topics([name])


async def set_configs(kafka: Kafka, name: str, **configs: str) -> None:
    """AlterConfigs replaces a topic's whole configuration: pass every setting that should stay."""
    async with clients.started(kafka, clients.admin(kafka)) as admin:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, name, configs)])


def data_of(size: int) -> str:
    return base64.b64encode(b"x" * size).decode()


async def test_a_reply_address_naming_a_deployment_topic_is_refused_and_nothing_lands_there(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    spawn("a")
    good = unique("good")
    hostile = [
        {"op": "get", "id": unique("h"), "replyTo": topic, **extra}
        for topic in (topics.commands, topics.events, topics.changelog, topics.dlq, "__consumer_offsets")
        for extra in ({}, {"requestId": unique("r")}, {"requestId": unique("r"), "replyPartition": 1})
    ]
    async with WireClient(kafka, topics) as client:
        # The first one has no key: before, it reached the changelog and failed there, and the batch
        # committed without the good create's changelog record.
        await client.send({"replyTo": topics.changelog}, key=b"", partition=0)
        for command in hostile:
            await client.send(command)
        created = await client.call(create(good))
        assert created.status == "created"
        answered = await client.wait_for([c["requestId"] for c in hostile if "requestId" in c])
    for reply in answered.values():
        assert reply.status == "invalid"
        assert "this deployment's own topics" in (reply.error or "") or "internal Kafka topic" in (reply.error or "")
    changelog = await read_topic(kafka, topics.changelog)
    assert all(record.key is not None for record in changelog)
    assert [decode_promise(r.value).id for r in changelog if r.key] == [good]
    assert [decode_event(r.value).promise.id for r in await read_topic(kafka, topics.events)] == [good]
    assert len(await read_topic(kafka, topics.commands)) == len(hostile) + 2
    assert len(await read_topic(kafka, topics.dlq)) == len(hostile) + 1

    spawn("b")  # a second member with an empty data dir: its partitions come back from the changelog alone
    async with WireClient(kafka, topics) as client:
        found = await client.call({"op": "get", "id": good})
    assert found.status == "found"


async def test_a_reply_too_large_for_its_topic_is_refused_and_changes_nothing(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    small = unique("t-small")
    await make_topic(kafka, small, **{"max.message.bytes": "200000"})
    spawn()
    promise = unique("p")
    async with WireClient(kafka, topics) as client:
        created = await client.call(create(promise, param={"data": data_of(200_000)}))  # a reply of ~270 KB
        assert created.status == "created"
        request_id = await client.send({**complete("resolve", promise), "replyTo": small})
        refused = (await client.wait_for([request_id]))[request_id]
        assert refused.status == "invalid"
        assert f"larger than {small!r} accepts (max.message.bytes 200000)" in (refused.error or "")
        still = await client.call({"op": "get", "id": promise})
    assert still.promise is not None and still.promise.state == "PENDING"


async def test_a_dead_letter_too_large_for_the_dlq_is_cut_to_fit_and_says_so(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    spawn()
    async with WireClient(kafka, topics) as client:
        await client.call({"op": "get", "id": unique("warm")})  # the processor knows the DLQ's limit now
        await set_configs(
            kafka, topics.dlq, **{"max.message.bytes": "65536", "message.timestamp.type": "LogAppendTime"}
        )
        await asyncio.sleep(12)  # the processor re-reads topic configurations every 10 s (REFRESH_S)
        big = json.dumps({"op": "nonsense", "id": unique("big"), "requestId": unique("r"), "pad": "y" * 200_000})
        request_id = json.loads(big)["requestId"]
        await client.send({}, key=json.loads(big)["id"].encode(), raw=big.encode())
        after = await client.call(create(unique("after")))
        refused = (await client.wait_for([request_id]))[request_id]
    assert refused.status == "invalid" and after.status == "created"
    (letter,) = await read_topic(kafka, topics.dlq)
    headers = dict(letter.headers)
    assert headers["dp.truncated"].startswith(f"{len(big)} bytes".encode())
    assert len(letter.value) < 65536 and big.encode().startswith(letter.value)


async def test_a_processor_clock_hours_ahead_still_answers_every_command(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    mine = unique("t-mine")  # a client's reply topic with Kafka's defaults: CreateTime, so the skew shows there
    await make_topic(kafka, mine)
    spawn(clock_offset_ms=2 * LONG)
    ids = [unique("c") for _ in range(5)]
    async with WireClient(kafka, topics) as client:
        plain = await client.send_all([create(i, timeout=int(time.time() * 1000) + 4 * LONG) for i in ids])
        pointed = await client.send({**create(unique("d")), "replyTo": mine})
        replies = await client.wait_for([*plain, pointed])
    assert {replies[r].status for r in plain} == {"created"}
    assert replies[pointed].status == "invalid" and "refused" in (replies[pointed].error or "")
    events = await read_topic(kafka, topics.events)
    assert sorted(decode_event(r.value).promise.id for r in events) == sorted(ids)


async def test_a_reply_topic_deleted_under_the_processor_answers_again_and_stops_on_sigterm(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    mine = unique("t-gone")
    await make_topic(kafka, mine)
    processor = spawn()
    async with WireClient(kafka, topics) as client:
        await client.send({"op": "get", "id": unique("g"), "replyTo": mine})
        while not await read_topic(kafka, mine):  # noqa: ASYNC110 - the processor learnt the topic, answered there
            await asyncio.sleep(0.2)
        await delete_topic(kafka, mine)
        again = await client.send({"op": "get", "id": unique("g"), "replyTo": mine})
        answered = await client.wait_for([again], seconds=120)
    assert answered[again].status == "invalid" and "does not exist" in (answered[again].error or "")
    began = time.monotonic()
    assert processor.stop(seconds=30) == 0
    assert time.monotonic() - began < 30


async def test_a_data_dir_older_than_the_topics_is_wiped_and_no_command_goes_unanswered(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    processor = spawn()
    async with WireClient(kafka, topics) as client:
        await client.wait_for(await client.send_all([create(unique("old")) for _ in range(30)]))
    assert processor.stop() == 0
    async with clients.started(kafka, clients.admin(kafka)) as admin:
        await admin.delete_topics(list(all_topics(topics)))
        while await partition_counts(admin, all_topics(topics)):  # noqa: ASYNC110 - deletion is asynchronous
            await asyncio.sleep(0.2)
    await create_topics(kafka, topics, TEST_PARTITIONS)
    processor.start()  # the same data dir, now ahead of every partition
    fresh = [unique("new") for _ in range(30)]
    async with WireClient(kafka, topics) as client:
        replies = await client.wait_for(await client.send_all([create(i) for i in fresh]), seconds=90)
    assert {reply.status for reply in replies.values()} == {"created"}
    assert "wiping" in processor.log.read_text()


@pytest.mark.slow
async def test_kill_9_while_refused_records_are_replayed_one_by_one_loses_and_duplicates_nothing(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    """The worst moments of the isolation path: a transaction aborted for a refused record, the batch
    replayed a command at a time, a kill -9 somewhere in there, and a new owner taking over."""
    mine = unique("t-mine")  # CreateTime: every reply the skewed processors send here is refused by Kafka
    await make_topic(kafka, mine)
    victim = spawn("a", clock_offset_ms=2 * LONG)
    ids = [unique("k") for _ in range(400)]
    commands = [
        {**create(i, timeout=int(time.time() * 1000) + 4 * LONG), **({"replyTo": mine} if n % 4 == 0 else {})}
        for n, i in enumerate(ids)
    ]
    async with WireClient(kafka, topics) as client:
        sent = await client.send_all(commands)
        while sum(1 for r in sent if client.replies.get(r)) < len(sent) // 4:  # noqa: ASYNC110 - replies in flight
            await asyncio.sleep(0.01)
        victim.kill()
        spawn("b", clock_offset_ms=2 * LONG)
        replies = await client.wait_for(sent, seconds=120)
    assert "one at a time" in victim.log.read_text()
    pointed = {r for r, command in zip(sent, commands, strict=True) if "replyTo" in command}
    assert {replies[r].status for r in pointed} == {"invalid"}
    assert {replies[r].status for r in sent if r not in pointed} == {"created"}
    answers = Counter(decode_reply(record.value).request_id for record in await read_topic(kafka, topics.replies))
    assert [r for r in sent if answers[r] != 1] == []  # each answered exactly once, across the kill
    events = Counter(decode_event(record.value).promise.id for record in await read_topic(kafka, topics.events))
    created = {i for i, command in zip(ids, commands, strict=True) if "replyTo" not in command}
    assert events == Counter(created)  # one `created` each, none for a refused command
    assert len(await read_topic(kafka, topics.dlq)) == len(pointed)


@pytest.mark.slow
async def test_a_backlog_of_large_commands_drains_in_bounded_memory(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    count, size = 2_000, 370_000  # ~500 KB a record once base64-encoded
    async with WireClient(kafka, topics) as client:
        sent: list[str] = []
        for _ in range(count // 100):  # a hundred at a time: the test itself stays small
            sent += await client.send_all([create(unique("big"), param={"data": data_of(size)}) for _ in range(100)])
        processor = spawn()
        replies = await client.wait_for(sent, seconds=400)
        peak = processor.peak_rss_bytes()
    print(f"\npeak RSS of dp serve draining {count} commands of ~{size * 4 // 3 // 1000} KB: {peak / 2**20:.0f} MiB")
    assert {reply.status for reply in replies.values()} == {"created"}
    assert peak < 768 * 2**20
