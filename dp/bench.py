"""`dp bench`: throughput and latency of the whole pipeline, beside a raw Kafka baseline from the same run.

Absolute numbers drift on shared machines; the ratio to the baseline (`consumers/baseline.py`, the
processor's Kafka shape with nothing of ours in it) does not. Three phases, each counted from the
replies received:

* throughput: N promises created then resolved (2N commands) from several producer tasks, flat out;
* latency: open loop at a fixed offered rate, send-to-reply time per command (HdrHistogram);
* baseline: the throughput phase again through the raw pipe, on fresh topics.

Without --spawn it targets the processors already serving the deployment's topics; with --spawn K
it creates fresh topics, starts K `dp serve` processes on them, and removes both afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from aiokafka import AIOKafkaProducer, TopicPartition
from hdrh.histogram import HdrHistogram

from dp import kafka as clients
from dp.partitioning import partition_for
from dp.settings import Kafka, Topics
from dp.topics import DEFAULT_PARTITIONS, all_topics, check_topics, create_topics
from dp.wire import Command, Create, Get, Reply, Resolve, Value, decode_reply, encode

READY_SECONDS = 120.0
DRAIN_SECONDS = 300.0


@dataclass(frozen=True)
class BenchOptions:
    kafka: Kafka
    topics: Topics
    promises: int = 50_000
    producers: int = 4
    rate: int = 1_000
    latency_seconds: float = 20.0
    spawn: int = 0
    partitions: int = DEFAULT_PARTITIONS
    progress: bool = True
    preload: int = 0
    restore: bool = False


@dataclass
class Report:
    commands: int
    seconds: float
    throughput: float
    baseline_throughput: float
    ratio: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    partitions: int
    processors: int
    offered_rate: int
    latency_commands: int
    ok: int
    preloaded_promises: int
    restore_seconds: float | None
    restored_records: int


# --- replies -------------------------------------------------------------------------------------


class Replies:
    """Reads the replies topic from its end; counts replies and times those of commands we sent."""

    def __init__(self, kafka: Kafka, topic: str, decode: bool) -> None:
        self.topic = topic
        self.decode = decode
        self.count = 0
        self.ok = 0
        self.sent_at: dict[str, float] = {}
        self.histogram = HdrHistogram(1, 120_000_000, 3)
        self.changed = asyncio.Event()
        self._consumer = clients.reader(kafka, fetch_max_wait_ms=20)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Replies:
        await self._consumer.start()
        partitions = await self._consumer._client._wait_on_metadata(self.topic)
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        for tp, end in (await self._consumer.end_offsets(tps)).items():
            self._consumer.seek(tp, end)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()

    async def _read(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=100, max_records=10_000)
            arrived = time.perf_counter()
            for records in batches.values():
                self.count += len(records)
                if self.decode:
                    for record in records:
                        self._time(decode_reply(record.value), arrived)
            if batches:
                self.changed.set()

    def _time(self, reply: Reply, arrived: float) -> None:
        self.ok += reply.ok
        sent = self.sent_at.pop(reply.request_id, None) if reply.request_id else None
        if sent is not None:
            self.histogram.record_value(max(1, int((arrived - sent) * 1_000_000)))

    async def until(self, count: int, seconds: float, tick: Callable[[int], None] = lambda n: None) -> None:
        deadline = time.monotonic() + seconds
        while self.count < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {self.count} of {count} replies within {seconds:.0f}s; is a processor running?"
                )
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 1.0)
            tick(self.count)


# --- load ----------------------------------------------------------------------------------------


def commands_for(run: str, promises: range, timeout: int) -> tuple[list[Command], list[Command]]:
    """Creates and resolves for a range of promise numbers, with request ids and idempotency keys."""
    ids = [f"bench/{run}/{n}" for n in promises]
    creates: list[Command] = [
        Create(i, request_id=f"c{n}-{run}", idempotency_key=f"c{n}", timeout=timeout, param=Value(data=b"{}"))
        for n, i in zip(promises, ids, strict=True)
    ]
    resolves: list[Command] = [
        Resolve(i, request_id=f"r{n}-{run}", idempotency_key=f"r{n}", value=Value(data=b'"ok"'))
        for n, i in zip(promises, ids, strict=True)
    ]
    return creates, resolves


@contextlib.asynccontextmanager
async def producer(kafka: Kafka) -> AsyncIterator[AIOKafkaProducer]:
    # A load generator: batched and not idempotent, as the benchmark has always measured.
    client = clients.producer(kafka, enable_idempotence=False, linger_ms=5, max_batch_size=256 * 1024)
    async with clients.started(kafka, client):
        yield client


async def send_all(client: AIOKafkaProducer, topic: str, commands: list[Command]) -> None:
    futures = [await client.send(topic, encode(command), key=command.id.encode()) for command in commands]
    await asyncio.gather(*futures)


async def flat_out(
    options: BenchOptions, topics: Topics, replies: Replies, run: str, promises: int, label: str = "throughput"
) -> tuple[int, float]:
    """2N commands from `producers` tasks as fast as the pipeline takes them; (commands, seconds)."""
    timeout = int(time.time() * 1000) + 3_600_000
    shards = [range(k, promises, options.producers) for k in range(options.producers)]
    expected = replies.count + 2 * promises
    bar = Progress(label, 2 * promises, options.progress, replies.count)

    async def shard(numbers: range) -> None:
        creates, resolves = commands_for(run, numbers, timeout)
        async with producer(options.kafka) as client:
            await send_all(client, topics.commands, creates)
            await send_all(client, topics.commands, resolves)

    began = time.perf_counter()
    senders = asyncio.gather(*(shard(numbers) for numbers in shards))
    await replies.until(expected, DRAIN_SECONDS, bar.show)
    await senders
    seconds = time.perf_counter() - began
    bar.done()
    return 2 * promises, seconds


async def open_loop(options: BenchOptions, topics: Topics, replies: Replies, run: str) -> int:
    """Commands at `rate` per second, on schedule whatever the replies do; returns how many were sent."""
    total = int(options.rate * options.latency_seconds)
    creates, resolves = commands_for(run, range(total // 2), int(time.time() * 1000) + 3_600_000)
    schedule = [command for pair in zip(creates, resolves, strict=True) for command in pair]
    expected = replies.count + len(schedule)
    bar = Progress("latency", len(schedule), options.progress, replies.count)
    async with producer(options.kafka) as client:
        began = time.perf_counter()
        for n, command in enumerate(schedule):
            delay = began + n / options.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            replies.sent_at[command.request_id or ""] = time.perf_counter()
            await client.send(topics.commands, encode(command), key=command.id.encode())
        await replies.until(expected, DRAIN_SECONDS, bar.show)
    bar.done()
    return len(schedule)


async def wait_until_serving(options: BenchOptions, topics: Topics, replies: Replies, partitions: int) -> None:
    """A get for every partition answered: each has an owner that finished restoring."""
    probes: dict[int, Command] = {}
    n = 0
    while len(probes) < partitions:
        probe_id = f"bench/probe/{uuid.uuid4().hex[:8]}/{n}"
        probes.setdefault(partition_for(probe_id.encode(), partitions), Get(probe_id, request_id=probe_id))
        n += 1
    expected = replies.count + len(probes)
    async with producer(options.kafka) as client:
        await send_all(client, topics.commands, list(probes.values()))
    await replies.until(expected, READY_SECONDS)


# --- processes -----------------------------------------------------------------------------------


class Spawned:
    """Child processes of the benchmark, always stopped (SIGTERM, then SIGKILL) and cleaned up."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        self.scratch = Path(tempfile.mkdtemp(prefix="dp-bench-"))

    def start(self, *args: str) -> None:
        log = (self.scratch / f"{len(self.processes)}.log").open("wb")
        self.processes.append(subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT))

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def restored_records(self) -> int:
        """Records the last started processor replayed from the changelog, from its log."""
        log = (self.scratch / f"{len(self.processes) - 1}.log").read_text()
        return sum(int(n) for n in re.findall(r"restored (\d+) records", log))

    def close(self) -> None:
        self.stop_all()
        shutil.rmtree(self.scratch, ignore_errors=True)


async def delete_topics(kafka: Kafka, topics: Topics) -> None:
    async with clients.started(kafka, clients.admin(kafka)) as admin:
        await admin.delete_topics(list(all_topics(topics)))


# --- the run -------------------------------------------------------------------------------------


@dataclass
class Measured:
    """What the processor phases found."""

    commands: int
    seconds: float
    latency_commands: int
    histogram: HdrHistogram
    ok: int
    partitions: int
    restore_seconds: float | None = None
    restored_records: int = 0


async def measure_processor(options: BenchOptions, run: str) -> Measured:
    spawned = Spawned()
    topics = Topics(f"dpbench-{run}") if options.spawn else options.topics

    def serve(name: str) -> None:
        spawned.start("-m", "dp.cli", "serve", "--bootstrap-servers", options.kafka.bootstrap_servers,
                      "--topic-prefix", topics.prefix, "--group", f"dpbench-{run}",
                      "--data-dir", str(spawned.scratch / f"data-{name}"), "--log-level", "INFO")  # fmt: skip

    try:
        if options.spawn:
            await create_topics(options.kafka, topics, options.partitions)
            for n in range(options.spawn):
                serve(str(n))
        partitions = await check_topics(options.kafka, topics)
        async with Replies(options.kafka, topics.replies, decode=True) as replies:
            await wait_until_serving(options, topics, replies, partitions)
            if options.preload:
                await flat_out(options, topics, replies, f"{run}-pre", options.preload, "preload")
            commands, seconds = await flat_out(options, topics, replies, run, options.promises)
            latency_commands = await open_loop(options, topics, replies, f"{run}-lat")
            measured = Measured(commands, seconds, latency_commands, replies.histogram, replies.ok, partitions)
            if options.restore and options.spawn:
                spawned.stop_all()
                began = time.perf_counter()
                serve("restore")
                await wait_until_serving(options, topics, replies, partitions)
                measured.restore_seconds = time.perf_counter() - began
                measured.restored_records = spawned.restored_records()
            return measured
    finally:
        spawned.close()
        if options.spawn:
            await delete_topics(options.kafka, topics)


async def measure_baseline(options: BenchOptions, run: str, partitions: int) -> float:
    spawned = Spawned()
    topics = Topics(f"dpbench-{run}-base")
    try:
        await create_topics(options.kafka, topics, partitions)
        spawned.start("-m", "consumers.baseline", "--bootstrap-servers", options.kafka.bootstrap_servers,
                      "--topic-prefix", topics.prefix, "--group", f"dpbench-{run}-base")  # fmt: skip
        async with Replies(options.kafka, topics.replies, decode=False) as replies:
            await wait_until_serving(options, topics, replies, partitions)
            commands, seconds = await flat_out(options, topics, replies, f"{run}-base", options.promises)
        return float(commands / seconds)
    finally:
        spawned.close()
        await delete_topics(options.kafka, topics)


async def run_bench(options: BenchOptions) -> Report:
    run = uuid.uuid4().hex[:8]
    measured = await measure_processor(options, run)
    baseline = await measure_baseline(options, run, measured.partitions)
    throughput = measured.commands / measured.seconds
    histogram = measured.histogram

    def ms(percentile: float) -> float:
        return round(float(histogram.get_value_at_percentile(percentile)) / 1000, 3)

    return Report(
        commands=measured.commands,
        seconds=round(measured.seconds, 3),
        throughput=round(throughput, 1),
        baseline_throughput=round(baseline, 1),
        ratio=round(throughput / baseline, 3),
        p50_ms=ms(50),
        p90_ms=ms(90),
        p99_ms=ms(99),
        p999_ms=ms(99.9),
        max_ms=round(histogram.get_max_value() / 1000, 3),
        partitions=measured.partitions,
        processors=options.spawn or 0,
        offered_rate=options.rate,
        latency_commands=measured.latency_commands,
        ok=measured.ok,
        preloaded_promises=options.preload,
        restore_seconds=None if measured.restore_seconds is None else round(measured.restore_seconds, 3),
        restored_records=measured.restored_records,
    )


class Progress:
    """A one-line progress bar on stderr, for runs long enough to wonder about."""

    def __init__(self, label: str, total: int, enabled: bool, start: int) -> None:
        self.label, self.total, self.enabled, self.start = label, total, enabled and sys.stderr.isatty(), start

    def show(self, count: int) -> None:
        if self.enabled:
            done = min(self.total, count - self.start)
            filled = int(30 * done / self.total)
            print(f"\r{self.label:>10} [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total}", end="",
                  file=sys.stderr, flush=True)  # fmt: skip

    def done(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def summary(report: Report) -> str:
    rows = [
        ("commands", f"{report.commands}"),
        ("throughput", f"{report.throughput:,.0f} commands/s"),
        ("baseline", f"{report.baseline_throughput:,.0f} commands/s (raw Kafka pipe, same shape)"),
        ("ratio", f"{report.ratio:.2f}"),
        (
            "latency",
            f"p50 {report.p50_ms} ms  p90 {report.p90_ms} ms  p99 {report.p99_ms} ms  "
            f"p99.9 {report.p999_ms} ms  max {report.max_ms} ms at {report.offered_rate}/s offered",
        ),
        (
            "shape",
            f"{report.partitions} partitions, {report.processors or 'running'} processor(s), "
            f"{report.preloaded_promises} promises preloaded",
        ),
    ]
    if report.restore_seconds is not None:
        rows.append(("restore", f"{report.restored_records} changelog records in {report.restore_seconds} s "
                                "(start of a new processor with an empty data dir to serving)"))  # fmt: skip
    return "\n".join(f"{name:>11}  {value}" for name, value in rows)


def render(report: Report, as_json: bool) -> str:
    return json.dumps(asdict(report)) if as_json else summary(report)
