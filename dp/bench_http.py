"""`dp bench --http`: creates through the HTTP gateway beside the same creates through the client library.

Both faces put the same command on the same log and await the same processor's reply, so the distance
between them, measured in one run, is what the gateway costs (HTTP parsing, its own Kafka client, the
answer), free of the machine's drift. Each phase is a closed loop: C clients, each sending its next
create as soon as its previous answer arrived, for a fixed time after a warm-up, every promise id new.

* HTTP: `POST /promises` from C concurrent tasks over one aiohttp session whose connector keeps at most
  C keep-alive connections (one per client, as C separate programs would hold). Only 201 counts.
* client library: `Promises.create` from C concurrent tasks sharing one `Promises` client (the way one
  program uses it). Only the `created` status counts.

Every other answer is an error, counted by its HTTP status (`HTTP 504`) or its status (`already_pending`),
and so is a failed request, by its exception's name (`ServerDisconnectedError`, `ReplyTimeout`), during the
warm-up too; only the successes that arrive inside the measured window are counted and timed (send to
answer, HdrHistogram). The load generator is this process; the gateway and the processors are their own
processes, so it competes with them for the cores but never for an event loop. The CPU each of them used
during the window is reported beside the figures (from /proc, where there is one): on a small machine it
says which one was the bottleneck.

Without --spawn it targets a running gateway (`--gateway URL`) and the deployment's topics; with --spawn K
it creates fresh topics, starts K `dp serve` processes and one `dp gateway` on a free loopback port, and
removes them all afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field

import aiohttp
import msgspec
from hdrh.histogram import HdrHistogram

from dp.bench import (
    READY_SECONDS,
    BenchOptions,
    Replies,
    Spawned,
    delete_topics,
    epoch_ms,
    new_histogram,
    wait_until_serving,
)
from dp.client import Promises
from dp.errors import DpError
from dp.settings import Kafka, Topics
from dp.topics import DEFAULT_PARTITIONS, check_topics, create_topics

DEFAULT_GATEWAY = "http://127.0.0.1:8001"  # GatewaySettings' default --listen
GATEWAY_READY_SECONDS = 60.0  # a gateway we started: its Python start and its Kafka client's
RUNNING_GATEWAY_SECONDS = 10.0  # a gateway said to be running: a wrong URL need not wait a minute to say so
# Longer than the gateway's default reply timeout (30 s), so that its 504 arrives before our own give-up.
REQUEST_SECONDS = 60.0
PROMISE_LIFETIME_MS = 3_600_000
PARAM_DATA = b"{}"  # the same param through both faces: `{}`, base64 `e30=` in HTTP

HTTP, CLIENT = "http", "client"

Attempt = Callable[[str], Awaitable[str | None]]
"""One create of a fresh promise id: None when it was created, else the error's label."""


@dataclass(frozen=True)
class HttpBenchOptions:
    kafka: Kafka
    topics: Topics
    clients: tuple[int, ...] = (10, 100)
    seconds: float = 15.0
    warmup_seconds: float = 3.0
    gateway: str = DEFAULT_GATEWAY
    spawn: int = 0
    partitions: int = DEFAULT_PARTITIONS
    progress: bool = True


@dataclass
class PhaseReport:
    """One closed-loop phase: `clients` concurrent creators through one face (`http` or `client`)."""

    face: str
    clients: int
    seconds: float
    created: int
    creates_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    errors: dict[str, int]
    # Percent of one core during the window, by CPU_SOURCES; None where unknown (no /proc, or not started by us).
    cpu_percent: dict[str, float | None]


@dataclass
class HttpReport:
    """A run's figures: per concurrency, the HTTP phase then the client-library phase."""

    gateway: str
    processors: int
    partitions: int
    seconds: float
    warmup_seconds: float
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    phases: list[PhaseReport] = field(default_factory=list)
    errors: int = 0


class GatewayUnreachable(DpError):
    """No gateway became ready at the URL the benchmark targets; `reason` says what happened instead."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(
            f"the dp gateway at {url} is not serving ({reason}): start one with `dp gateway`, point --gateway "
            "at yours, or pass --spawn K to let the benchmark start one."
        )


class NotServing(DpError):
    """No processor answered on every partition: the figures would measure timeouts."""

    def __init__(self, topics: Topics, seconds: float) -> None:
        super().__init__(
            f"no processor answered on every partition of {topics.commands} within {seconds:.0f}s: start "
            "`dp serve` on those topics, or pass --spawn K to let the benchmark start K processors."
        )


# --- the closed loop -----------------------------------------------------------------------------


@dataclass
class Tally:
    """What one phase's clients found; successes count only inside the window, errors always."""

    created: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    histogram: HdrHistogram = field(default_factory=new_histogram)


async def closed_loop(
    attempt: Attempt, clients: int, warmup: float, seconds: float, ids: Callable[[int, int], str]
) -> Tally:
    """`clients` tasks, each creating `ids(client, n)` for n = 0, 1, ... back to back until the window ends.

    A success counts (and is timed) when its answer arrives inside [warm-up end, window end]; the phase
    returns once every client's last request has been answered, so the next phase starts on a quiet system.
    """
    tally = Tally()
    histogram = tally.histogram
    opens = time.perf_counter() + warmup
    closes = opens + seconds

    async def client(k: int) -> None:
        n = 0
        while (sent := time.perf_counter()) < closes:
            error = await attempt(ids(k, n))
            n += 1
            if error is not None:
                tally.errors[error] += 1
                continue
            arrived = time.perf_counter()
            if opens <= arrived <= closes:
                tally.created += 1
                histogram.record_value(max(1, int((arrived - sent) * 1_000_000)))

    async with asyncio.TaskGroup() as clients_running:  # a client that fails (a bug) stops the others
        for k in range(clients):
            clients_running.create_task(client(k))
    return tally


CPU_SOURCES = ("machine", "bench", "gateway", "processors")


class CpuClock:
    """CPU seconds used by the whole machine, this process, the gateway and the processors (`CPU_SOURCES`).

    The machine's figure includes the broker and anything else running: on a shared or small machine it
    says whether the cores were saturated, which the processes' own figures cannot.
    """

    def __init__(self, gateway: int | None, processors: list[int]) -> None:
        self.gateway, self.processors = gateway, processors

    def read(self) -> tuple[float | None, ...]:
        gateway = None if self.gateway is None else process_cpu_seconds(self.gateway)
        processors = [process_cpu_seconds(pid) for pid in self.processors]
        known = [seconds for seconds in processors if seconds is not None]
        together = sum(known) if processors and len(known) == len(processors) else None
        return machine_cpu_seconds(), time.process_time(), gateway, together


def process_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of a process, from /proc/PID/stat (None without /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> float | None:
    """CPU seconds every core spent busy (neither idle nor waiting for I/O), from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(n) for n in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # 8: up to steal; guests are in user


async def cpu_during(clock: CpuClock, warmup: float, seconds: float) -> dict[str, float | None]:
    """Percent of one core each of `CPU_SOURCES` used between the warm-up's end and the window's end.

    It sleeps because the window is a span of time, the same one `closed_loop` measures, not a condition.
    """
    await asyncio.sleep(warmup)
    before, began = clock.read(), time.perf_counter()
    await asyncio.sleep(seconds)
    after, elapsed = clock.read(), time.perf_counter() - began
    return {
        name: None if a is None or b is None else round(100 * (a - b) / elapsed, 1)
        for name, a, b in zip(CPU_SOURCES, after, before, strict=True)
    }


async def phase(
    face: str, attempt: Attempt, clients: int, options: HttpBenchOptions, clock: CpuClock, run: str
) -> PhaseReport:
    """One face at one concurrency: warm-up, window, and the figures of the window."""
    progress = Ticker(f"{face} x{clients}", options.warmup_seconds + options.seconds, options.progress)
    cpu = asyncio.create_task(cpu_during(clock, options.warmup_seconds, options.seconds))
    try:
        with progress:
            tally = await closed_loop(
                attempt, clients, options.warmup_seconds, options.seconds, lambda k, n: f"bench/{run}/{k}/{n}"
            )
        cpu_percent = await cpu
    finally:
        cpu.cancel()
    histogram = tally.histogram

    def ms(percentile: float) -> float:
        return round(float(histogram.get_value_at_percentile(percentile)) / 1000, 3)

    return PhaseReport(
        face=face,
        clients=clients,
        seconds=options.seconds,
        created=tally.created,
        creates_per_s=round(tally.created / options.seconds, 1),
        p50_ms=ms(50),
        p90_ms=ms(90),
        p99_ms=ms(99),
        p999_ms=ms(99.9),
        max_ms=round(float(histogram.get_max_value()) / 1000, 3),
        errors=dict(sorted(tally.errors.items())),
        cpu_percent=cpu_percent,
    )


# --- the two faces -------------------------------------------------------------------------------


class CreateBody(msgspec.Struct, frozen=True, gc=False):
    """The body of `POST /promises` (docs/http.md): `param.data` is base64, so bytes encode as it wants."""

    id: str
    timeout: int
    param: dict[str, object]
    tags: dict[str, str]


encode_body = msgspec.json.Encoder().encode


def http_attempt(session: aiohttp.ClientSession, url: str, timeout_ms: int) -> Attempt:
    """`POST {url}/promises` of one fresh id, with its own idempotency key like the client library's creates."""
    endpoint = f"{url}/promises"

    async def attempt(promise_id: str) -> str | None:
        body = encode_body(CreateBody(promise_id, timeout_ms, {"headers": {}, "data": PARAM_DATA}, {}))
        headers = {"Content-Type": "application/json", "Idempotency-Key": promise_id}
        try:
            async with session.post(endpoint, data=body, headers=headers) as response:
                await response.read()
                return None if response.status == 201 else f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError) as error:
            return type(error).__name__

    return attempt


def client_attempt(promises: Promises, timeout_ms: int) -> Attempt:
    """`Promises.create` of one fresh id (a fresh idempotency key, the client's default)."""
    timeout = timeout_ms / 1000 - time.time()  # seconds from now: the client takes a relative deadline

    async def attempt(promise_id: str) -> str | None:
        try:
            result = await promises.create(promise_id, timeout=timeout, param=PARAM_DATA)
        except DpError as error:
            return type(error).__name__
        return None if result.status == "created" else result.status

    return attempt


@contextlib.asynccontextmanager
async def http_session(clients: int) -> AsyncIterator[aiohttp.ClientSession]:
    """One session per phase: at most `clients` keep-alive connections, opened during the warm-up."""
    connector = aiohttp.TCPConnector(limit=clients, limit_per_host=clients)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=REQUEST_SECONDS)
    ) as session:
        yield session


# --- the gateway ---------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port free now, for the spawned gateway (the race with another binder is the OS's to lose)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def until_ready(url: str, process: subprocess.Popen[bytes] | None, log: str | None, seconds: float) -> None:
    """Poll `GET {url}/readyz` until it answers 200, the process we started exits, or `seconds` pass.

    Readiness is the gateway's to announce and it has no other channel, so this polls, every 50 ms.
    """
    deadline = time.monotonic() + seconds
    detail = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise GatewayUnreachable(url, f"it exited with status {process.returncode}; {tail(log)}")
            try:
                async with session.get(f"{url}/readyz") as response:
                    if response.status == 200:
                        return
                    detail = f"the last answer was {response.status}"
            except (aiohttp.ClientError, TimeoutError) as error:
                detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            await asyncio.sleep(0.05)
    raise GatewayUnreachable(url, f"/readyz did not answer 200 within {seconds:.0f}s: {detail}")


def tail(log: str | None) -> str:
    """The last line of a spawned process's log, for an error that must say why it died."""
    if log is None:
        return "no log"
    try:
        with open(log, errors="replace") as text:
            lines = [line.strip() for line in text if line.strip()]
    except OSError:
        return "no log"
    return f"its log ends: {lines[-1]}" if lines else "its log is empty"


# --- the run -------------------------------------------------------------------------------------


async def run_http_bench(options: HttpBenchOptions) -> HttpReport:
    """Each concurrency's HTTP phase then its client-library phase, once the gateway and every partition
    answer; whatever was started (processes, topics) is removed however the run ends."""
    run = uuid.uuid4().hex[:8]
    spawned = Spawned()
    topics = Topics(f"dpbench-{run}") if options.spawn else options.topics
    url = options.gateway.rstrip("/")
    gateway: subprocess.Popen[bytes] | None = None
    log: str | None = None
    processors: list[int] = []
    connection = ("--bootstrap-servers", options.kafka.bootstrap_servers, "--topic-prefix", topics.prefix)
    try:
        if options.spawn:
            await create_topics(options.kafka, topics, options.partitions)
            processors = [serve.pid for serve in spawned.processors(options.spawn, connection, f"dpbench-{run}")]
            address = f"127.0.0.1:{free_port()}"
            url = f"http://{address}"
            gateway = spawned.start("-m", "dp.cli", "gateway", *connection, "--listen", address)
            log = str(spawned.log(gateway))
        partitions = await check_topics(options.kafka, topics)
        await until_ready(url, gateway, log, GATEWAY_READY_SECONDS if gateway else RUNNING_GATEWAY_SECONDS)
        async with Replies(options.kafka, topics.replies, decode=False) as replies:
            try:
                await wait_until_serving(BenchOptions(options.kafka, topics), topics, replies, partitions)
            except TimeoutError:
                raise NotServing(topics, READY_SECONDS) from None
        clock = CpuClock(None if gateway is None else gateway.pid, processors)
        report = HttpReport(url, options.spawn, partitions, options.seconds, options.warmup_seconds)
        async with Promises(kafka=options.kafka, topics=topics) as promises:
            for n, clients in enumerate(options.clients):  # n: every phase's ids are its own, whatever repeats
                timeout_ms = epoch_ms() + PROMISE_LIFETIME_MS
                async with http_session(clients) as session:
                    attempt = http_attempt(session, url, timeout_ms)
                    report.phases.append(await phase(HTTP, attempt, clients, options, clock, f"{run}/{n}h"))
                attempt = client_attempt(promises, timeout_ms)
                report.phases.append(await phase(CLIENT, attempt, clients, options, clock, f"{run}/{n}c"))
        report.errors = sum(sum(p.errors.values()) for p in report.phases)
        return report
    finally:
        spawned.close()
        if options.spawn:
            await delete_topics(options.kafka, topics)


class Ticker:
    """A one-line countdown on stderr while a phase runs, for runs long enough to wonder about."""

    def __init__(self, label: str, seconds: float, enabled: bool) -> None:
        self.label, self.seconds, self.enabled = label, seconds, enabled and sys.stderr.isatty()
        self._task: asyncio.Task[None] | None = None

    def __enter__(self) -> Ticker:
        if self.enabled:
            self._task = asyncio.create_task(self._show())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            print(file=sys.stderr)

    async def _show(self) -> None:
        began = time.monotonic()
        while True:
            done = min(self.seconds, time.monotonic() - began)
            filled = int(30 * done / self.seconds)
            print(f"\r{self.label:>12} [{'#' * filled}{'.' * (30 - filled)}] {done:.0f}/{self.seconds:.0f} s",
                  end="", file=sys.stderr, flush=True)  # fmt: skip
            await asyncio.sleep(0.5)


# --- output --------------------------------------------------------------------------------------


def summary(report: HttpReport) -> str:
    def percent(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    head = (
        f"creates through the HTTP gateway ({report.gateway}) and through the client library, closed loop; "
        f"{report.processors or 'running'} processor(s), {report.partitions} partitions; "
        f"{report.seconds:g} s per phase after {report.warmup_seconds:g} s of warm-up; "
        f"cpu in % of one core of {report.cores}"
    )
    columns = f"{'clients':>7}  {'face':<6} {'creates/s':>10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} " \
              f"{'p99.9 ms':>9} {'max ms':>8} {'errors':>7}   cpu %: " + " / ".join(CPU_SOURCES)  # fmt: skip
    rows = [
        f"{p.clients:>7}  {p.face:<6} {p.creates_per_s:>10,.0f} {p.p50_ms:>8.1f} {p.p90_ms:>8.1f} {p.p99_ms:>8.1f} "
        f"{p.p999_ms:>9.1f} {p.max_ms:>8.1f} {sum(p.errors.values()):>7}   "
        + " / ".join(percent(p.cpu_percent[name]) for name in CPU_SOURCES)
        for p in report.phases
    ]
    lines = [head, "", columns, *rows]
    if report.errors:
        lines.append("")
        lines.append(f"THIS RUN HAD {report.errors} ERRORS (counted from the warm-up on):")
        lines.extend(
            f"  {p.face} at {p.clients} clients: " + ", ".join(f"{label} x{n}" for label, n in p.errors.items())
            for p in report.phases
            if p.errors
        )
    return "\n".join(lines)


def render(report: HttpReport, as_json: bool) -> str:
    return json.dumps({"mode": "http", **asdict(report)}) if as_json else summary(report)
