"""`scripts/chaos`: a bounded chaos run with its own broker, ending in one summary line.

    scripts/chaos [--commands N] [--seconds S] [--processors P] [--seed N] [--retention 5s] [--ci] ...

Phases: start a broker (scripts/kafka, free loopback port, temp data dir), create fresh topics, start
the processors; then, until `--commands` are sent or `--seconds` have passed, the workload, the
hostile records and the faults together;
then settle (every partition open again, every request answered or given up), wait for the short
timeouts to pass, check that none is left pending, `get` every promise, stop the processors with
SIGTERM and verify everything from Kafka (tests/chaos/verify.py). The last line is

    faults=N commands=N replies=N lost=N duplicated=N violations=N

and the exit status is 1 unless lost, duplicated and violations are all 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiokafka.admin import NewTopic

from dp import kafka as clients
from dp.settings import Kafka, Topics, duration_seconds
from dp.topics import TIMESTAMPS, create_topics, wait_until_ready
from dp.wire import Limits
from tests.chaos.cluster import Broker, Cluster, ClusterError, Processor, free_port, poll_until, serve_command
from tests.chaos.faults import FaultLog, Faults
from tests.chaos.hostile import Hostile, HostileSender
from tests.chaos.notifications import INBOX_PARTITIONS, inbox_topic
from tests.chaos.segments import markers
from tests.chaos.verify import Context, Verdict, broker_skipped_markers, overdue_pending, topic_sizes, verify
from tests.chaos.workload import Attempt, Budget, Client, Ledger, Mix, Pacer, Replies, now_ms

# Smaller than the defaults so that oversized hostile records stay cheap; the checks are the same.
LIMITS = Limits(max_record_bytes=128 * 1024, max_data_bytes=32 * 1024)
SETTLE_S = 120.0
# Logged by Kafka 4.4.0's group coordinator when it served committed offsets that went back in time.
OUT_OF_SYNC = "is out of sync with the underlying log"
GRACE_S = 2.5


@dataclass(frozen=True)
class Options:
    commands: int
    seconds: float
    processors: int
    partitions: int
    clients: int
    sessions: int
    ids: int
    renewals: int
    hostile: int
    seed: int
    kill_every: tuple[float, float]
    reply_timeout: float
    short_max: float
    work_dir: Path | None
    keep: bool
    calm: bool
    reverify: Path | None
    retention: str = ""
    """The processors' `--retention` ("": none, completed promises are kept forever)."""


def retention_ms(text: str) -> int | None:
    """A retention in ms; None for none ("" or 0: this run's way of saying forever)."""
    ms = int(duration_seconds(text) * 1000) if text.strip() else 0
    return ms or None


def retention_flag(text: str) -> str:
    """argparse type: a duration `dp serve` takes, or "" / 0 for none."""
    try:
        return text.strip() if retention_ms(text) is not None else ""
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 5s, 1m; 0 or empty: none)") from None


# The reduced run of `scripts/test` (tests/test_chaos.py): about 90 s, every kind of fault once or more.
CI = {"commands": 4_000, "seconds": 60.0, "ids": 300, "renewals": 2, "hostile": 10_000, "kill_min": 6.0,
      "kill_max": 10.0, "reply_timeout": 5.0, "short_max": 5.0, "processors": 3, "sessions": 8}  # fmt: skip


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="scripts/chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--commands", type=int, default=100_000, help="most commands the clients send (default %(default)s)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=1200.0,
        help="longest fault phase; it ends sooner once --commands are sent (default %(default)s)",
    )
    parser.add_argument("--processors", type=int, default=3, help="dp serve processes, 2-3 (default %(default)s)")
    parser.add_argument("--partitions", type=int, default=8, help="partitions of the topics (default %(default)s)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default %(default)s)")
    parser.add_argument("--sessions", type=int, default=16, help="requests in flight per client (default %(default)s)")
    parser.add_argument(
        "--ids",
        type=int,
        default=3_000,
        help="promise ids in use at any time (default %(default)s); the window "
        "slides so that the run uses --renewals + 1 times as many",
    )
    parser.add_argument("--renewals", type=int, default=3, help="times the id window is renewed (default %(default)s)")
    parser.add_argument("--hostile", type=int, default=10_000, help="bad records to send (default %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: drawn and printed)")
    parser.add_argument(
        "--kill-min", type=float, default=12.0, help="least seconds between kills (default %(default)s)"
    )
    parser.add_argument("--kill-max", type=float, default=24.0, help="most seconds between kills (default %(default)s)")
    parser.add_argument(
        "--reply-timeout", type=float, default=8.0, help="seconds before a client retries (default %(default)s)"
    )
    parser.add_argument(
        "--short-max", type=float, default=20.0, help="longest short timeout, seconds (default %(default)s)"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="broker data, processor data and logs (default: temp)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, stores, broker data) afterwards")
    parser.add_argument(
        "--reverify",
        type=Path,
        default=None,
        metavar="WORK_DIR",
        help="judge a kept run again from its work dir (restarts its broker; runs nothing)",
    )
    parser.add_argument(
        "--retention",
        type=retention_flag,
        default="5s",
        help="the processors' --retention, short so that completed promises are purged (and their ids "
        "created anew) all through the run and its faults; 0 or empty: keep them forever (default %(default)s)",
    )
    parser.add_argument("--calm", action="store_true", help="no faults: the same load and checks, as a baseline")
    parser.add_argument("--ci", action="store_true", help="the reduced run of the test suite (about 90 s)")
    args = parser.parse_args(argv)
    if args.ci:
        for name, value in CI.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    if not 2 <= args.processors <= 3:
        parser.error("--processors must be 2 or 3")
    return Options(
        commands=args.commands, seconds=args.seconds, processors=args.processors, partitions=args.partitions,
        clients=args.clients, sessions=args.sessions, ids=args.ids, renewals=args.renewals, hostile=args.hostile,
        seed=args.seed if args.seed is not None else random.randrange(1_000_000),
        kill_every=(args.kill_min, args.kill_max), reply_timeout=args.reply_timeout, short_max=args.short_max,
        work_dir=args.reverify or args.work_dir, keep=args.keep, calm=args.calm, reverify=args.reverify,
        retention=args.retention,
    )  # fmt: skip


def say(text: str) -> None:
    print(text, flush=True)


def promise_ids(count: int) -> tuple[str, ...]:
    """The pool; a few ids are non-ASCII, so keys and partitioning see multi-byte UTF-8 too."""
    return tuple(f"ünï/{n}" if n % 50 == 7 else f"order/{n}" for n in range(count))


async def create_inbox(kafka: Kafka, name: str) -> None:
    """The subscribers' topic, as an application would create it (not one of dp's)."""
    async with clients.started(kafka, clients.admin(kafka)) as admin:
        await admin.create_topics([NewTopic(name, INBOX_PARTITIONS, 1, topic_configs=TIMESTAMPS)])
        await wait_until_ready(admin, (name,))


async def until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    if not await poll_until(condition, seconds):
        raise ClusterError(f"{what} did not happen within {seconds:.0f}s")


class Run:
    """One chaos run: owns the work dir, the cluster, the clients and the verdict."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.rng = random.Random(options.seed)
        self.work = options.work_dir or Path(tempfile.mkdtemp(prefix="dp-chaos-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.verdict = Verdict()
        self.ledger = Ledger()
        self.group = f"chaos-{options.seed}"
        self.topics = Topics(f"chaos{options.seed}")
        self.partitions = options.partitions
        names = "abc"[: options.processors]
        port = free_port()
        self.saved_faults: dict[str, object] = {}
        self.retention = options.retention
        if options.reverify is not None:
            names, port = self.load()
        broker = Broker(self.work / "kafka", port)
        self.kafka = Kafka(bootstrap_servers=broker.bootstrap_servers)
        self.cluster = Cluster(broker, [self.slot(name) for name in names], self.partitions)
        self.faults = Faults(self.cluster, random.Random(self.rng.random()), options.kill_every, say)
        for name, value in self.saved_faults.items():
            setattr(self.faults.log, name, value)
        self.ids = promise_ids(options.ids * (options.renewals + 1))
        self.final_gets: set[str] = set()
        self.hostile: HostileSender | None = None
        self.stopped_ms = 0
        self.began = time.monotonic()

    def slot(self, name: str) -> Processor:
        data = self.work / f"data-{name}"
        command = serve_command(self.kafka.bootstrap_servers, self.topics, self.group, data, LIMITS, self.retention)
        return Processor(name, command, data, self.work / f"{name}.log")

    async def execute(self) -> None:
        options = self.options
        say(f"chaos: seed={options.seed} commands<={options.commands} seconds={options.seconds:.0f} "
            f"processors={options.processors} partitions={options.partitions} clients={options.clients}x"
            f"{options.sessions} ids={options.ids}x{options.renewals + 1} hostile={options.hostile} "
            f"retention={self.retention or 'none'} work={self.work}")  # fmt: skip
        took = await self.cluster.broker.start()
        say(f"broker up on {self.kafka.bootstrap_servers} in {took:.1f}s")
        await create_topics(self.kafka, self.topics, options.partitions)
        await create_inbox(self.kafka, inbox_topic(self.topics))
        for processor in self.cluster.processors:
            processor.start()
        await until(self.cluster.settled, SETTLE_S, "every partition opened by a processor")
        say(f"{options.processors} processors serving {options.partitions} partitions")
        replies = Replies(self.kafka, self.topics)
        await replies.start()

        def window_start() -> int:
            return int(len(self.ids) - options.ids) * self.ledger.sent // max(options.commands, 1)

        mix = Mix(self.ids, options.ids, window_start, options.short_max, options.reply_timeout,
                  inbox_topic(self.topics), INBOX_PARTITIONS)  # fmt: skip
        clients = [Client(f"c{n}", self.kafka, self.topics, replies, self.ledger, mix, self.rng.randrange(2**32))
                   for n in range(options.clients)]  # fmt: skip
        try:
            for client in clients:
                await client.start()
            await self.load_and_faults(clients, replies)
            await self.settle(clients)
        finally:
            for client in clients:
                await client.stop()
            await replies.stop()
        await self.shutdown()
        self.save()
        say("verifying from Kafka (read_committed), the live stores and a fresh restore ...")
        await verify(self.context(), self.verdict)

    async def reverify(self) -> None:
        """Judge a kept run again: its broker restarted on its data, its stores and logs as they are."""
        took = await self.cluster.broker.start()
        say(f"broker of {self.work} up on {self.kafka.bootstrap_servers} in {took:.1f}s; verifying ...")
        await verify(self.context(), self.verdict)

    def load(self) -> tuple[str, int]:
        """The saved run's identity, ledger and final gets (see `save`); returns its slots and port."""
        meta = json.loads((self.work / "run.json").read_text())
        self.group, self.partitions, self.stopped_ms = meta["group"], meta["partitions"], meta["stopped_ms"]
        self.topics = Topics(meta["prefix"])
        self.final_gets = set(meta["final_gets"])
        self.ledger.retries, self.ledger.gave_up = meta["retries"], meta["gave_up"]
        for fields in meta["attempts"]:
            raw = fields.pop("position")
            attempt = Attempt(**fields, position=(raw[0], raw[1]) if raw else None)
            self.ledger.attempts[attempt.request_id] = attempt
        self.saved_faults = meta.get("faults", {})
        self.retention = meta.get("retention", "")
        return "".join(meta["processors"]), int(meta["port"])

    async def load_and_faults(self, clients: list[Client], replies: Replies) -> None:
        """The fault phase: workload, hostile records and faults at once, for `--seconds`."""
        options = self.options
        stop = asyncio.Event()
        budget = Budget(options.commands)
        pacer = Pacer(options.commands / (options.seconds * 0.85))
        sizes = await topic_sizes(self.kafka)
        hostile = Hostile(random.Random(self.rng.random()), self.ids, options.partitions, LIMITS, sizes,
                          self.topics.replies, inbox_topic(self.topics))  # fmt: skip
        self.hostile = HostileSender(self.kafka, self.topics, hostile, options.hostile)
        self.faults.began = time.monotonic()

        def progress() -> float:
            """How far the phase is, by time or by commands sent, whichever is further."""
            elapsed = (time.monotonic() - self.faults.began) / options.seconds
            return max(elapsed, self.ledger.sent / max(options.commands, 1))

        sessions = [
            asyncio.create_task(c.session(budget, stop, pacer)) for c in clients for _ in range(options.sessions)
        ]
        background = [
            asyncio.create_task(self.hostile.run(progress, stop)),
            asyncio.create_task(self.progress(replies, stop)),
        ]
        try:
            if not options.calm:
                await self.faults.run(progress, stop)
            await poll_until(lambda: progress() >= 1.0, options.seconds, interval=0.2)
            stop.set()
            say(f"fault phase over: {self.ledger.sent} commands sent; draining requests in flight")
            await asyncio.wait(sessions, timeout=options.reply_timeout * 6 + 30)
        finally:
            stop.set()
            for task in [*sessions, *background]:
                task.cancel()
            await asyncio.gather(*sessions, *background, return_exceptions=True)

    async def progress(self, replies: Replies, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(10)
            hostile = self.hostile.sent if self.hostile else 0
            live = "".join(p.name for p in self.cluster.live())
            say(f"t={time.monotonic() - self.faults.began:6.1f}s sent={self.ledger.sent} replies={replies.received} "
                f"retries={self.ledger.retries} failed_sends={len(self.ledger.failed())} hostile={hostile} "
                f"live={live} faults={self.faults.log.total}")  # fmt: skip

    async def settle(self, clients: list[Client]) -> None:
        """Calm: all partitions open; short timeouts past; none left pending; then a `get` per promise."""
        self.faults.watch()
        await until(self.cluster.settled, SETTLE_S, "every partition open again after the faults")
        calm = now_ms()
        wait_until = max(calm, self.ledger.latest_short_deadline) + int(GRACE_S * 1000)
        say(f"settled; waiting {max(0, wait_until - now_ms()) / 1000:.1f}s for the short timeouts to pass")
        await asyncio.sleep(max(0, wait_until - now_ms()) / 1000)
        checked_at = now_ms()
        overdue = await overdue_pending(self.kafka, self.topics, checked_at)
        for promise_id in overdue:
            self.verdict.violate("pending past its timeout plus 2 s (changelog snapshot)", promise_id)
        self.verdict.figure("promises pending past timeout + 2 s after the faults (changelog snapshot)", len(overdue))
        await self.get_everything(clients)

    async def get_everything(self, clients: list[Client]) -> None:
        """One `get` per promise id: the final states, through the log like any other command."""
        queue = list(self.ids)
        before = set(self.ledger.attempts)

        async def worker(client: Client) -> None:
            while queue:
                await client.request({"op": "get", "id": queue.pop()})

        await asyncio.gather(*(worker(c) for c in clients for _ in range(self.options.sessions)))
        self.final_gets = set(self.ledger.attempts) - before
        say(f"final gets: {len(self.final_gets)} sent for {len(self.ids)} promises")

    async def shutdown(self) -> None:
        """SIGTERM every processor at once; each must finish its batch and exit 0."""
        self.stopped_ms = now_ms()
        for processor in self.cluster.processors:
            processor.terminate()
        for processor in self.cluster.processors:
            if processor.process is None:
                continue
            try:
                code = await asyncio.to_thread(processor.process.wait, 60)
            except Exception:
                code = None
                processor.kill9()
            if code != 0:
                self.verdict.violate(
                    "processor did not exit 0 on SIGTERM", f"{processor.name}: {code}\n{processor.tail()}"
                )

    def context(self) -> Context:
        return Context(self.kafka, self.topics, self.partitions, LIMITS, self.group, self.ledger, self.cluster,
                       self.final_gets, self.stopped_ms, self.cluster.broker.data / "server.log",
                       retention_ms(self.retention))  # fmt: skip

    def save(self) -> None:
        """What `--reverify` needs to judge this run again from its work dir, without running it."""
        meta = {
            "seed": self.options.seed, "group": self.group, "prefix": self.topics.prefix,
            "port": self.cluster.broker.port, "partitions": self.partitions, "stopped_ms": self.stopped_ms,
            "retention": self.retention,
            "processors": [p.name for p in self.cluster.processors], "final_gets": sorted(self.final_gets),
            "retries": self.ledger.retries, "gave_up": self.ledger.gave_up,
            "attempts": [dataclasses.asdict(a) for a in self.ledger.attempts.values()],
            "faults": {name: getattr(self.faults.log, name)
                       for name in ("kills", "zombies", "lost_disks", "broker_kills", "timeline")},
        }  # fmt: skip
        (self.work / "run.json").write_text(json.dumps(meta))

    def figures(self) -> None:
        log: FaultLog = self.faults.log
        v = self.verdict
        v.figure("duration", f"{time.monotonic() - self.began:.0f}s")
        kinds = f"{log.kills} processor kill -9, {log.zombies} zombie, {log.lost_disks} lost disk"
        v.figure("faults", f"{log.total} ({kinds}, {log.broker_kills} broker kill -9)")
        for victim, since in log.zombie_logs:
            v.figure(f"zombie {victim.name}", victim.woke(since))
        for victim, since in log.wiped_logs:
            v.figure(f"lost disk {victim.name}: records restored from the changelog", victim.restored(since))
        for begin, end in log.broker_outages:
            v.figure("broker outage", f"{(end - begin) / 1000:.1f}s")
        for detail in log.unexpected_exits:
            v.violate("processor exited on its own", detail)
        server_log = self.cluster.broker.data / "server.log"
        for partitions, txn in broker_skipped_markers(server_log):
            v.figure("KAFKA BUG: broker completed a transaction without writing its markers", f"{txn} on {partitions}")
        reloads = server_log.read_text(errors="replace").count(OUT_OF_SYNC) if server_log.exists() else 0
        if reloads:
            v.figure("KAFKA BUG: group coordinator reloads, 'out of sync with the underlying log'", reloads)
        if self.hostile is not None:
            kinds = ", ".join(f"{k} {n}" for k, n in self.hostile.hostile.drawn.most_common())
            v.figure("hostile records sent", f"{self.hostile.sent} (acknowledged {self.hostile.acked}; {kinds})")

    def count_markers(self) -> None:
        """Transactions committed and aborted (fenced or failed), from the stopped broker's segments."""
        logs = self.cluster.broker.data / "logs"
        if self.cluster.broker.pid() is not None or not logs.exists():
            return
        with contextlib.suppress(Exception):
            for topic in (self.topics.changelog, self.topics.replies):
                found = markers(logs, topic)
                self.verdict.figure(
                    f"transaction markers on {topic}", f"{found['commit']} commit, {found['abort']} abort"
                )

    def summary(self) -> str:
        v = self.verdict
        return (f"faults={self.faults.log.total} commands={v.commands} replies={v.replies} lost={sum(v.lost.values())} "
                f"duplicated={sum(v.duplicated.values())} violations={sum(v.violations.values())}")  # fmt: skip

    def cleanup(self) -> None:
        """Stop everything, take the figures (they read the logs), then remove the work dir unless kept."""
        self.cluster.close()
        self.count_markers()
        self.figures()
        if self.options.keep or self.options.work_dir is not None:
            say(f"work dir kept: {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)


async def guarded(run: Run, work: Callable[[], Awaitable[None]]) -> None:
    """Run `work`, turning SIGTERM into cancellation so that the `finally` cleanup always runs."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await work()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    # aiokafka logs every refused connection while the broker is down; the run reports outages itself.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    run = Run(options)
    try:
        asyncio.run(guarded(run, run.reverify if options.reverify else run.execute))
    except (KeyboardInterrupt, asyncio.CancelledError):
        run.verdict.violate("run interrupted", "SIGINT/SIGTERM before the verdict")
    except Exception as error:  # the verdict is incomplete: say why, and fail
        traceback.print_exc()
        run.verdict.violate("run aborted", repr(error))
    finally:
        run.cleanup()
    say("figures:")
    for line in run.verdict.report():
        say(line)
    for line in run.faults.log.timeline:
        say(f"  fault {line}")
    summary = run.summary()
    say(summary)
    verdict = run.verdict
    return 1 if verdict.lost or verdict.duplicated or verdict.violations else 0


if __name__ == "__main__":
    sys.exit(main())
