"""`dp bench`: throughput and latency of the whole pipeline, beside a raw Kafka baseline from the same run.

Absolute numbers drift on shared machines; the ratio to the baseline (`consumers/baseline.py`, the
processor's Kafka shape with nothing of ours in it) does not. Three phases, each counted from the
replies received:

* throughput: N promises created then resolved (2N commands) from several producer tasks, flat out;
* latency: open loop at each offered rate in turn, send-to-reply time per command (HdrHistogram), and
  the transactions per second the processors committed meanwhile (from the changelog's progress
  records): group commit trades one for the other, so a rate's latency reads with its transaction rate;
* baseline: the throughput phase again through the raw pipe, on fresh topics.

Without --spawn it targets the processors already serving the deployment's topics; with --spawn K
it creates fresh topics, starts K `dp serve` processes on them, and removes both afterwards.
`dp bench --http` (the HTTP gateway beside the client library) is `dp.bench_http`.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from hdrh.histogram import HdrHistogram

from dp import kafka as clients
from dp.errors import DpError
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
    rates: tuple[int, ...] = (1_000,)
    latency_seconds: float = 20.0
    spawn: int = 0
    partitions: int = DEFAULT_PARTITIONS
    progress: bool = True
    preload: int = 0
    restore: bool = False


@dataclass
class RateReport:
    """The latency phase at one offered rate."""

    offered_rate: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    commands: int
    transactions_per_s: float


@dataclass
class Report:
    """A run's figures; the top-level latency fields are those of the first offered rate (`rates[0]`)."""

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
    rates: list[RateReport] = field(default_factory=list)


# --- replies -------------------------------------------------------------------------------------


async def assign_all(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Assign every partition of `topic` to a started group-less consumer, once its metadata is known."""
    partitions = await consumer._client._wait_on_metadata(topic)
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    return tps


class Replies:
    """Reads the replies topic from its end; counts replies and times those of commands we sent."""

    def __init__(self, kafka: Kafka, topic: str, decode: bool) -> None:
        self.topic = topic
        self.decode = decode
        self.count = 0
        self.ok = 0
        self.sent_at: dict[str, float] = {}
        self.histogram = new_histogram()
        self.changed = asyncio.Event()
        self._consumer = clients.reader(kafka, fetch_max_wait_ms=20)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Replies:
        await self._consumer.start()
        tps = await assign_all(self._consumer, self.topic)
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


def new_histogram() -> HdrHistogram:
    """Send-to-reply times in microseconds, 1 µs to 120 s, 3 significant digits."""
    return HdrHistogram(1, 120_000_000, 3)


def epoch_ms() -> int:
    """The wall clock in the unit of the brokers' LogAppendTime timestamps (same machine or NTP)."""
    return time.time_ns() // 1_000_000


# --- transactions ---------------------------------------------------------------------------------


class ProgressTime(msgspec.Struct, frozen=True, gc=False):
    """The `now` of a changelog progress record (`{"nextCommandOffset": N, "now": ms}` under the empty key,
    written by consumers/store.py; dp/ may not import consumers/, so the one field is declared here)."""

    now: int = 0


decode_progress_time = msgspec.json.Decoder(ProgressTime).decode
PROGRESS_KEY = b""


class Transactions:
    """Counts the transactions the processors committed during a phase, from the changelog's progress records.

    Every transaction writes one progress record per partition it touched, all with the transaction's
    `now` (the processor's clock in ms), so distinct `now` values count transactions per
    process-millisecond: two transactions of one process in the same millisecond, or of two processes
    in the same millisecond, count once. Records are windowed by their LogAppendTime timestamps.
    """

    def __init__(self, kafka: Kafka, topic: str) -> None:
        self.topic = topic
        self._consumer = clients.reader(kafka)
        self._partitions: list[TopicPartition] = []

    async def __aenter__(self) -> Transactions:
        await self._consumer.start()
        self._partitions = await assign_all(self._consumer, self.topic)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def ends(self) -> dict[TopicPartition, int]:
        """The changelog's committed ends now: where a phase's progress records begin."""
        ends: dict[TopicPartition, int] = await self._consumer.end_offsets(self._partitions)
        return ends

    async def per_second(self, starts: dict[TopicPartition, int], began_ms: int, ended_ms: int) -> float:
        """Transactions per second between `began_ms` and `ended_ms`, reading the changelog from `starts`."""
        ends = await self.ends()
        nows: set[int] = set()
        for tp, start in starts.items():
            self._consumer.seek(tp, start)
        # Read until each position reaches its end: transaction markers take offsets but are never returned.
        async with asyncio.timeout(DRAIN_SECONDS):
            while any([await self._consumer.position(tp) < ends[tp] for tp in self._partitions]):
                batches = await self._consumer.getmany(timeout_ms=100, max_records=10_000)
                for records in batches.values():
                    nows.update(
                        decode_progress_time(record.value).now
                        for record in records
                        if record.key == PROGRESS_KEY and began_ms <= record.timestamp <= ended_ms
                    )
        return len(nows) / max((ended_ms - began_ms) / 1000, 0.001)


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
    # A load generator, not idempotent. No linger: an open-loop command leaves when it is due, not up to a
    # linger later (that wait would count as latency); flat out, records batch up behind the request in flight.
    client = clients.producer(kafka, enable_idempotence=False, linger_ms=0, max_batch_size=256 * 1024)
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


async def open_loop(
    options: BenchOptions, topics: Topics, replies: Replies, transactions: Transactions, run: str, rate: int
) -> RateReport:
    """Commands at `rate` per second, on schedule whatever the replies do, for `latency_seconds`."""
    total = int(rate * options.latency_seconds)
    creates, resolves = commands_for(run, range(total // 2), epoch_ms() + 3_600_000)
    schedule = [command for pair in zip(creates, resolves, strict=True) for command in pair]
    expected = replies.count + len(schedule)
    bar = Progress(f"{rate}/s", len(schedule), options.progress, replies.count)
    histogram = replies.histogram = new_histogram()
    changelog_starts = await transactions.ends()
    async with producer(options.kafka) as client:
        began_ms, began = epoch_ms(), time.perf_counter()
        for n, command in enumerate(schedule):
            delay = began + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            replies.sent_at[command.request_id or ""] = time.perf_counter()
            await client.send(topics.commands, encode(command), key=command.id.encode())
        await replies.until(expected, DRAIN_SECONDS, bar.show)
        ended_ms = epoch_ms()
    bar.done()

    def ms(microseconds: float) -> float:
        return round(float(microseconds) / 1000, 3)

    return RateReport(
        offered_rate=rate,
        p50_ms=ms(histogram.get_value_at_percentile(50)),
        p90_ms=ms(histogram.get_value_at_percentile(90)),
        p99_ms=ms(histogram.get_value_at_percentile(99)),
        p999_ms=ms(histogram.get_value_at_percentile(99.9)),
        max_ms=ms(histogram.get_max_value()),
        commands=len(schedule),
        transactions_per_s=round(await transactions.per_second(changelog_starts, began_ms, ended_ms), 1),
    )


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

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        """`python ARGS` with its output in the scratch dir's next log (`N.log`, N its index in `processes`)."""
        log = (self.scratch / f"{len(self.processes)}.log").open("wb")
        self.processes.append(subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT))
        return self.processes[-1]

    def processors(self, count: int, connection: tuple[str, ...], group: str) -> list[subprocess.Popen[bytes]]:
        """`count` `dp serve` processes of `group` (`connection`: their Kafka and topic flags), each with a
        data dir of its own in the scratch dir."""
        return [
            self.start(
                "-m", "dp.cli", "serve", *connection, "--group", group, "--data-dir", str(self.scratch / f"data-{n}")
            )
            for n in range(count)
        ]

    def log(self, process: subprocess.Popen[bytes]) -> Path:
        """Where `process` writes: an error about a process that died can quote it."""
        return self.scratch / f"{self.processes.index(process)}.log"

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
    rates: list[RateReport]
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
        async with (
            Replies(options.kafka, topics.replies, decode=True) as replies,
            Transactions(options.kafka, topics.changelog) as transactions,
        ):
            await wait_until_serving(options, topics, replies, partitions)
            if options.preload:
                await flat_out(options, topics, replies, f"{run}-pre", options.preload, "preload")
            commands, seconds = await flat_out(options, topics, replies, run, options.promises)
            rates = [await open_loop(options, topics, replies, transactions, f"{run}-lat{rate}", rate)
                     for rate in options.rates]  # fmt: skip
            measured = Measured(commands, seconds, rates, replies.ok, partitions)
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
    first = measured.rates[0]
    return Report(
        commands=measured.commands,
        seconds=round(measured.seconds, 3),
        throughput=round(throughput, 1),
        baseline_throughput=round(baseline, 1),
        ratio=round(throughput / baseline, 3),
        p50_ms=first.p50_ms,
        p90_ms=first.p90_ms,
        p99_ms=first.p99_ms,
        p999_ms=first.p999_ms,
        max_ms=first.max_ms,
        partitions=measured.partitions,
        processors=options.spawn or 0,
        offered_rate=first.offered_rate,
        latency_commands=first.commands,
        ok=measured.ok,
        preloaded_promises=options.preload,
        restore_seconds=None if measured.restore_seconds is None else round(measured.restore_seconds, 3),
        restored_records=measured.restored_records,
        rates=measured.rates,
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
        *(
            (
                "latency" if n == 0 else "",
                f"at {rate.offered_rate}/s offered: p50 {rate.p50_ms} ms  p90 {rate.p90_ms} ms  p99 {rate.p99_ms} ms  "
                f"p99.9 {rate.p999_ms} ms  max {rate.max_ms} ms; {rate.transactions_per_s:,.0f} transactions/s",
            )
            for n, rate in enumerate(report.rates)
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


# --- the plot ------------------------------------------------------------------------------------


class PlotUnavailable(DpError):
    """--plot without matplotlib, which only the `plot` extra installs."""

    def __init__(self) -> None:
        super().__init__(
            "--plot needs matplotlib, which dp installs only with its `plot` extra: "
            "run `pip install 'dp[plot]'` (or scripts/setup in a checkout), or leave out --plot."
        )


def require_plotting() -> None:
    """Refuse --plot before the run rather than after minutes of measuring."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable() from None


def plot(report: Report, path: Path) -> None:
    """Latency (p50, p99) against offered rate, as a PNG drawn from the run's own numbers."""
    # Imported here: matplotlib is an optional extra and slow to import. A Figure on an Agg canvas
    # touches no pyplot state and needs no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rates = [rate.offered_rate for rate in report.rates]
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(rates, [rate.p50_ms for rate in report.rates], marker="o", label="p50")
    axes.plot(rates, [rate.p99_ms for rate in report.rates], marker="s", label="p99")
    axes.set_xlabel("offered rate (commands/s)")
    axes.set_ylabel("send-to-reply latency (ms)")
    axes.set_ylim(bottom=0)
    axes.set_xlim(left=0)
    axes.grid(True, alpha=0.3)
    axes.legend()
    processors = {0: "running processors", 1: "1 processor"}.get(report.processors, f"{report.processors} processors")
    axes.set_title(f"dp latency: {processors}, {report.partitions} partitions")
    figure.savefig(path, format="png", dpi=120)
