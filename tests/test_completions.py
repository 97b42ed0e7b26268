"""consumers/completions.py: every completion printed once, and a restart resumes after the last one."""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from collections.abc import Callable

from dp import kafka as clients
from dp.client import Promises
from dp.settings import Kafka, Topics
from dp.wire import decode_event
from tests.support import REPO, ServeProcess


async def start(bootstrap_servers: str, topics: Topics, group: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumers.completions", "--group", group, "--from-beginning",
        "--bootstrap-servers", bootstrap_servers, "--topic-prefix", topics.prefix,
        stdout=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip


async def completions(process: asyncio.subprocess.Process, count: int) -> list[tuple[str, str]]:
    assert process.stdout is not None
    async with asyncio.timeout(30):
        events = [decode_event(await process.stdout.readline()) for _ in range(count)]
    return [(event.type, event.promise.id) for event in events]


async def committed(kafka: Kafka, group: str, count: int) -> None:
    """Return once the group has committed `count` events in all (the ones it skipped count too)."""
    async with asyncio.timeout(30), clients.started(kafka, clients.admin(kafka)) as admin:
        while True:
            offsets = await admin.list_consumer_group_offsets(group)
            if sum(o.offset for o in offsets.values()) >= count:
                return
            await asyncio.sleep(0.1)


async def stop(process: asyncio.subprocess.Process) -> bytes:
    """SIGTERM: the consumer leaves its group and exits 0; returns whatever it printed after."""
    process.send_signal(signal.SIGTERM)
    rest, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    return rest


async def test_completions_are_printed_once_across_a_restart(
    kafka: Kafka, bootstrap_servers: str, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    spawn()
    group = f"log-{uuid.uuid4().hex[:8]}"
    a, b, c = (f"{name}-{uuid.uuid4().hex[:8]}" for name in "abc")
    first = await start(bootstrap_servers, topics, group)
    try:
        async with Promises(kafka=kafka, topics=topics) as promises:
            for promise_id in (a, b, c):
                await promises.create(promise_id, timeout=3600)
            await promises.resolve(a)
            await promises.reject(b)
            assert sorted(await completions(first, 2)) == [("rejected", b), ("resolved", a)]
            await committed(kafka, group, 5)  # three created events and two completions
            assert await stop(first) == b""
            await promises.cancel(c)
        second = await start(bootstrap_servers, topics, group)
        try:
            assert await completions(second, 1) == [("canceled", c)]
        finally:
            assert await stop(second) == b""
    finally:
        if first.returncode is None:
            first.kill()
