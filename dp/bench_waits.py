"""`dp bench --waits N`: one client process awaits N pending promises at once, then they complete in random order.

The waiting client runs in a child process of its own (`python -m dp.bench_waits`), so that its peak
memory and its Kafka connections are its alone: it subscribes to every promise with
`Promises.as_completed`, says when all subscriptions are in place, and then times each promise from
its completion (`completedOn`, the processor's clock on this machine) to the moment its wait
returned. Meanwhile this process resolves the promises, shuffled, each with its own id as the value,
so that every record a wait returns can be checked.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from dp.bench import READY_SECONDS, BenchOptions, Replies, Spawned, delete_topics, new_histogram, wait_until_serving
from dp.bench_http import NotServing
from dp.client import Promises
from dp.errors import DpError
from dp.settings import Kafka, Topics
from dp.topics import DEFAULT_PARTITIONS, check_topics, create_topics

PROMISE_LIFETIME_S: Final = 3_600.0
SEND_CHUNK: Final = 1_000
"""Creates and resolves in flight at once from the driving client."""
WAITER_SECONDS: Final = 600.0
"""The longest the waiting child may take to subscribe, or to see every completion."""
ESTABLISHED: Final = "01"


@dataclass(frozen=True)
class WaitBenchOptions:
    kafka: Kafka
    topics: Topics
    waits: int = 100_000
    spawn: int = 0
    partitions: int = DEFAULT_PARTITIONS
    progress: bool = True


@dataclass
class Waited:
    """What the waiting child measured."""

    returned: int
    wrong: int
    subscribe_seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    peak_rss_bytes: int
    kafka_connections: int


@dataclass
class WaitReport:
    waits: int
    partitions: int
    processors: int
    create_seconds: float
    complete_seconds: float
    waited: Waited


class WaiterFailed(DpError):
    """The waiting child ended without its report."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"the waiting client failed ({detail}); see its output above.")


async def run_wait_bench(options: WaitBenchOptions) -> WaitReport:
    """Create the promises, start the waiter, resolve them in random order once it is subscribed, and
    collect its report; whatever was started (processes, topics) is removed however the run ends."""
    run = uuid.uuid4().hex[:8]
    spawned = Spawned()
    topics = Topics(f"dpbench-{run}") if options.spawn else options.topics
    connection = ("--bootstrap-servers", options.kafka.bootstrap_servers, "--topic-prefix", topics.prefix)
    try:
        if options.spawn:
            await create_topics(options.kafka, topics, options.partitions)
            spawned.processors(options.spawn, connection, f"dpbench-{run}")
        partitions = await check_topics(options.kafka, topics)
        async with Replies(options.kafka, topics.replies, decode=False) as replies:
            try:
                await wait_until_serving(BenchOptions(options.kafka, topics), topics, replies, partitions)
            except TimeoutError:
                raise NotServing(topics, READY_SECONDS) from None
        ids = [f"dpbench-{run}/wait/{n}" for n in range(options.waits)]
        ids_file = spawned.scratch / "ids.json"
        ids_file.write_text(json.dumps(ids))
        async with Promises(kafka=options.kafka, topics=topics, reply_timeout=120.0) as driver:
            say(options, f"creating {len(ids):,} promises")
            began = time.monotonic()
            await in_chunks(ids, lambda id: driver.create(id, timeout=PROMISE_LIFETIME_S))
            created = time.monotonic() - began
            waiter = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "dp.bench_waits", *connection, str(ids_file), stdout=asyncio.subprocess.PIPE
            )
            try:
                say(options, "the waiting client is subscribing")
                await report_line(waiter)
                shuffled = random.sample(ids, len(ids))
                say(options, f"resolving {len(ids):,} promises in random order")
                began = time.monotonic()
                await in_chunks(shuffled, lambda id: driver.resolve(id, data=id))
                completed = time.monotonic() - began
                waited = Waited(**await report_line(waiter))
                await waiter.wait()
            finally:
                if waiter.returncode is None:
                    waiter.kill()
                    await waiter.wait()
        return WaitReport(len(ids), partitions, options.spawn, created, completed, waited)
    finally:
        spawned.close()
        if options.spawn:
            await delete_topics(options.kafka, topics)


async def in_chunks(ids: Sequence[str], send: Callable[[str], Awaitable[object]]) -> None:
    for start in range(0, len(ids), SEND_CHUNK):
        await asyncio.gather(*(send(id) for id in ids[start : start + SEND_CHUNK]))


async def report_line(waiter: asyncio.subprocess.Process) -> dict[str, Any]:
    """The waiter's next JSON line."""
    assert waiter.stdout is not None
    async with asyncio.timeout(WAITER_SECONDS):
        line = await waiter.stdout.readline()
    if not line:
        raise WaiterFailed(f"exit status {await waiter.wait()}")
    report: dict[str, Any] = json.loads(line)
    return report


def say(options: WaitBenchOptions, text: str) -> None:
    if options.progress:
        print(f"dp bench: {text}", file=sys.stderr, flush=True)


# --- the waiting child -------------------------------------------------------------------------------


async def wait_all(kafka: Kafka, topics: Topics, ids: list[str]) -> None:
    """Await every id over one client; print a line once subscribed, and the `Waited` figures at the end."""
    latency = new_histogram()
    returned = wrong = 0
    subscribed = asyncio.Event()
    async with Promises(kafka=kafka, topics=topics, reply_timeout=120.0) as promises:
        began = time.monotonic()

        async def consume() -> None:
            nonlocal returned, wrong
            async for promise in promises.as_completed(ids, subscribed=subscribed):
                arrived_ms = time.time_ns() // 1_000_000
                returned += 1
                wrong += promise.state != "RESOLVED" or promise.value.data != promise.id.encode()
                latency.record_value(max(1, arrived_ms - (promise.completed_on or arrived_ms)))

        consuming = asyncio.ensure_future(consume())
        async with asyncio.timeout(WAITER_SECONDS):
            await asyncio.wait((consuming, asyncio.ensure_future(subscribed.wait())), return_when="FIRST_COMPLETED")
        subscribe_seconds = time.monotonic() - began
        connections = kafka_connections()
        print(json.dumps({"subscribed": subscribe_seconds}), flush=True)
        async with asyncio.timeout(WAITER_SECONDS):
            await consuming
    waited = Waited(
        returned=returned,
        wrong=wrong,
        subscribe_seconds=subscribe_seconds,
        p50_ms=float(latency.get_value_at_percentile(50)),
        p99_ms=float(latency.get_value_at_percentile(99)),
        max_ms=float(latency.get_max_value()),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        kafka_connections=connections,
    )
    print(json.dumps(asdict(waited)), flush=True)


def kafka_connections() -> int:
    """This process's established TCP connections (all of them Kafka's, in the waiting child)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            count += fields[3] == ESTABLISHED and fields[9] in inodes
    return count


def main(argv: list[str]) -> None:
    """`python -m dp.bench_waits --bootstrap-servers B --topic-prefix P IDS.json`: the waiting child."""
    _, servers, _, prefix, ids_file = argv
    asyncio.run(wait_all(Kafka(bootstrap_servers=servers), Topics(prefix), json.loads(Path(ids_file).read_text())))


def summary(report: WaitReport) -> str:
    waited = report.waited
    return "\n".join(
        (
            f"waits: {report.waits:,} promises awaited by one client process ({report.partitions} partitions"
            f"{f', {report.processors} processors' if report.processors else ''})",
            f"  created in {report.create_seconds:.1f}s; all subscribed in {waited.subscribe_seconds:.1f}s; "
            f"resolved in random order in {report.complete_seconds:.1f}s",
            f"  returned {waited.returned:,} (wrong records: {waited.wrong})",
            f"  completion → wait returned: p50 {waited.p50_ms:.0f} ms, p99 {waited.p99_ms:.0f} ms, "
            f"max {waited.max_ms:.0f} ms",
            f"  the waiting client: peak RSS {waited.peak_rss_bytes / 2**20:.0f} MiB, "
            f"{waited.kafka_connections} Kafka connections",
        )
    )


def render(report: WaitReport, as_json: bool) -> str:
    return json.dumps(asdict(report)) if as_json else summary(report)


if __name__ == "__main__":
    main(sys.argv[1:])
