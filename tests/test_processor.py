"""The processor end to end, against the real broker, speaking only the wire contract."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from consumers.store import PartitionStore
from dp.partitioning import partition_for
from dp.settings import Kafka, Topics
from dp.wire import DEFAULT_LIMITS, decode_event, decode_reply
from tests.support import REPO, TEST_PARTITIONS, ServeProcess, complete, create, free_port, now_ms, unique
from tests.wire_client import WireClient, read_topic


async def events_by_promise(kafka: Kafka, topics: Topics) -> dict[str, list[str]]:
    by_id: dict[str, list[str]] = defaultdict(list)
    for record in await read_topic(kafka, topics.events):
        event = decode_event(record.value)
        by_id[event.promise.id].append(event.type)
    return by_id


async def wait_for_event(
    kafka: Kafka, topics: Topics, promise_id: str, kind: str, seconds: float
) -> tuple[dict[str, Any], int]:
    """The first event of `kind` for a promise and the wall-clock ms when it was seen; polls to a deadline."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for record in await read_topic(kafka, topics.events):
            event = json.loads(record.value)
            if event["promise"]["id"] == promise_id and event["type"] == kind:
                return event, now_ms()
        await asyncio.sleep(0.1)
    raise TimeoutError(f"no {kind} event for {promise_id} within {seconds}s")


def store_records(data_dir: Path) -> dict[str, Any]:
    records: dict[str, Any] = {}
    for path in sorted(data_dir.glob("*/partition-*")):
        store = PartitionStore(path)
        records.update(store.records())
        store.close()
    return records


def restored_counts(log: Path) -> list[int]:
    return [int(n) for n in re.findall(r"open \(restored (\d+) records", log.read_text())]


async def test_every_status_is_reachable_with_one_event_per_change(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    spawn()
    a, b, c, d, t = (unique(n) for n in "abcdt")
    script: list[tuple[dict[str, Any], str]] = [
        (create(a), "created"),
        (create(a), "deduplicated"),
        (create(a, key="other"), "already_pending"),
        (complete("resolve", a), "resolved"),
        (complete("resolve", a), "deduplicated"),
        (complete("reject", a, strict=True), "already_resolved"),
        (create(a, strict=True), "already_resolved"),
        ({"op": "get", "id": a}, "found"),
        ({"op": "get", "id": unique("none")}, "not_found"),
        (complete("resolve", unique("none")), "not_found"),
        (create(b), "created"),
        (complete("reject", b), "rejected"),
        (complete("cancel", b, key="x"), "already_rejected"),
        (create(c), "created"),
        (complete("cancel", c), "canceled"),
        (complete("resolve", c, key="y"), "already_canceled"),
        (create(t, timeout=now_ms() - 1), "created"),
        (complete("resolve", t, strict=True), "already_timedout"),
        (complete("resolve", t, strict=False), "deduplicated"),
        ({"op": "frobnicate", "id": d}, "invalid"),
    ]
    async with WireClient(kafka, topics) as client:
        for command, status in script:
            reply = await client.call(command)
            assert (reply.op, reply.status) == (command["op"] if status != "invalid" else None, status), command
            assert reply.ok == (status in {"created", "resolved", "rejected", "canceled", "deduplicated", "found"})
        final = await client.call({"op": "get", "id": a})
    assert final.promise is not None and final.promise.state == "RESOLVED"
    assert final.promise.value.data == b'"done"' and final.promise.idempotency_key_for_complete == "iku"
    events = await events_by_promise(kafka, topics)
    assert events[a] == ["created", "resolved"]
    assert events[b] == ["created", "rejected"]
    assert events[c] == ["created", "canceled"]
    assert events[t] == ["created", "timedout"]
    assert d not in events


async def test_pending_promise_times_out_actively_and_timer_resolves(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    spawn()
    plain, timer = unique("plain"), unique("timer")
    async with WireClient(kafka, topics) as client:
        assert (await client.call({"op": "get", "id": plain})).status == "not_found"  # processor is up
        deadline = now_ms() + 2_000
        await client.call(create(plain, timeout=deadline))
        await client.call(create(timer, timeout=deadline, tags={"resonate:timeout": "true"}))
    event, seen = await wait_for_event(kafka, topics, plain, "timedout", seconds=10)
    assert seen - deadline <= 3_000
    assert event["promise"]["state"] == "REJECTED_TIMEDOUT" and event["promise"]["completedOn"] == deadline
    event, seen = await wait_for_event(kafka, topics, timer, "timedout", seconds=10)
    assert seen - deadline <= 3_000
    assert event["promise"]["state"] == "RESOLVED" and event["promise"]["completedOn"] == deadline


async def test_restart_keeps_state_and_an_empty_data_dir_is_restored_from_the_changelog(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    ids = [unique(f"p{i}") for i in range(40)]
    processor = spawn()
    async with WireClient(kafka, topics) as client:
        await client.wait_for([await client.send(create(i)) for i in ids])
        await client.wait_for([await client.send(complete("resolve", i)) for i in ids[::2]])
    assert processor.stop() == 0
    before = store_records(processor.data_dir)
    assert len(before) == len(ids)

    processor.start()
    async with WireClient(kafka, topics) as client:
        replies = await client.wait_for([await client.send({"op": "get", "id": i}) for i in ids])
    assert processor.stop() == 0
    assert {r.promise.id: r.promise for r in replies.values() if r.promise} == before
    assert sum(restored_counts(processor.log)[-TEST_PARTITIONS:]) == 0

    for path in processor.data_dir.iterdir():
        shutil.rmtree(path)
    processor.start()
    async with WireClient(kafka, topics) as client:
        await client.wait_for([await client.send({"op": "get", "id": i}) for i in ids])
    assert processor.stop() == 0
    assert sum(restored_counts(processor.log)[-TEST_PARTITIONS:]) >= len(ids)
    assert store_records(processor.data_dir) == before


async def test_bad_records_are_answered_invalid_dead_lettered_and_valid_ones_applied(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    processor = spawn()
    good = [unique("good") for _ in range(6)]
    misrouted = unique("lost")
    wrong_partition = (partition_for(misrouted.encode(), TEST_PARTITIONS) + 1) % TEST_PARTITIONS
    huge = base64.b64encode(b"x" * (600 * 1024)).decode()
    async with WireClient(kafka, topics) as client:
        for junk in (b"{not json", b"[1, 2, 3]", b'{"op": "create", "timeout": 1'):
            await client.send({"id": "x"}, raw=junk)  # no requestId to recover: DLQ only
        bad = [
            await client.send({"id": "x"}, raw=b'{"requestId": "raw-1", "op": 7}') and "raw-1",
            await client.send({"op": "frobnicate", "id": "x"}),
            await client.send({"op": "create", "id": "x", "timeout": "soon"}),
            await client.send({"op": "create", "id": "x"}),
            await client.send({"op": "create", "id": "x", "timeout": 1, "param": {"data": huge}}),
            await client.send(create(misrouted), partition=wrong_partition),
            await client.send(create("x"), key=b"not-x"),
            await client.send(create("x", replyTo="no.such.topic")),
        ]
        valid = []
        for promise_id in good:
            valid.append(await client.send(create(promise_id)))
            await client.send({"id": "x"}, raw=b"\xff\xfe binary junk")
        replies = await client.wait_for(bad + valid)
        fine = await client.call({"op": "get", "id": good[-1]})
    for request_id in bad:
        assert replies[request_id].status == "invalid" and replies[request_id].error, request_id
    expected_partition = partition_for(misrouted.encode(), TEST_PARTITIONS)
    assert f"belongs on partition {expected_partition}" in (replies[bad[5]].error or "")
    assert "record key must equal" in (replies[bad[6]].error or "")
    assert "no.such.topic" in (replies[bad[7]].error or "")
    assert all(replies[r].status == "created" for r in valid)
    assert fine.status == "found"
    dlq = await read_topic(kafka, topics.dlq)
    assert len(dlq) == 3 + len(bad) + len(good)
    headers = dict(dlq[0].headers)
    assert {"dp.error", "dp.topic", "dp.partition", "dp.offset"} <= headers.keys()
    assert processor.alive
    assert Counter(r.status for r in replies.values())["invalid"] == len(bad)


def serve_command(bootstrap_servers: str, prefix: str, data_dir: Path) -> list[str]:
    return [sys.executable, "-m", "dp.cli", "serve", "--bootstrap-servers", bootstrap_servers,
            "--topic-prefix", prefix, "--data-dir", str(data_dir)]  # fmt: skip


def test_serve_without_topics_exits_2_saying_how_to_create_them(bootstrap_servers: str, tmp_path: Path) -> None:
    result = subprocess.run(serve_command(bootstrap_servers, unique("absent"), tmp_path), capture_output=True,
                            text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert result.returncode == 2
    assert "missing topics" in result.stderr and "dp topics create" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_keeps_retrying_while_no_broker_answers_and_says_so(tmp_path: Path) -> None:
    command = serve_command(f"127.0.0.1:{free_port()}", "dp", tmp_path)
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert process.stderr is not None
        first = process.stderr.readline()
        assert "no Kafka broker answered" in first and "Retrying in" in first
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=30)
    assert "Traceback" not in rest


def test_a_second_processor_on_the_same_data_dir_exits_2_saying_so(
    bootstrap_servers: str, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    """Its transactional id is the data dir's: two processors sharing one would fence each other forever."""
    first = spawn("a")
    deadline = time.monotonic() + 60
    while "serving group" not in first.log.read_text():
        assert time.monotonic() < deadline and first.alive, "the first processor never started serving"
        time.sleep(0.05)
    command = [*serve_command(bootstrap_servers, topics.prefix, first.data_dir), "--group", first.group]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert "is in use by another running `dp serve`" in result.stderr and "--data-dir" in result.stderr
    assert "Traceback" not in result.stderr and first.alive


async def test_the_largest_promise_the_limits_allow_round_trips(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    spawn()
    big = base64.b64encode(b"p" * DEFAULT_LIMITS.max_data_bytes).decode()
    promise_id = unique("big")
    async with WireClient(kafka, topics) as client:
        created = await client.call(create(promise_id, param={"headers": {}, "data": big}))
        resolved = await client.call({**complete("resolve", promise_id), "value": {"headers": {}, "data": big}})
        after = await client.call({"op": "get", "id": unique("after")})
    assert (created.status, resolved.status, after.status) == ("created", "resolved", "not_found")
    assert resolved.promise is not None and len(resolved.promise.value.data or b"") == DEFAULT_LIMITS.max_data_bytes


async def test_a_lost_consumer_offset_commit_does_not_apply_commands_twice(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    """Kafka can complete a transaction without its consumer-offset commit (markers skipped for a
    __consumer_offsets partition whose leader a restarted broker does not know yet). The changelog's
    progress record, committed in the same transaction, still tells the next owner where to resume."""
    processor = spawn()
    ids = [unique("once") for _ in range(30)]
    async with WireClient(kafka, topics) as client:
        sent = await client.send_all([create(i) for i in ids])
        await client.wait_for(sent)
    assert processor.stop() == 0
    await rewind_group(kafka, topics, processor.group)
    shutil.rmtree(processor.data_dir)
    processor.start()
    async with WireClient(kafka, topics) as client:
        await client.call({"op": "get", "id": ids[0]})
    counts = Counter(decode_reply(r.value).request_id for r in await read_topic(kafka, topics.replies))
    assert [r for r in sent if counts[r] != 1] == []
    assert all(kinds == ["created"] for kinds in (await events_by_promise(kafka, topics)).values())


async def rewind_group(kafka: Kafka, topics: Topics, group: str) -> None:
    """What a lost offset commit leaves behind: the group's committed command offsets back at 0."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topics.commands, p) for p in range(TEST_PARTITIONS)]
        consumer.assign(tps)
        await consumer.commit({tp: 0 for tp in tps})
        assert {await consumer.committed(tp) for tp in tps} == {0}
    finally:
        await consumer.stop()
