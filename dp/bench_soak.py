"""`dp bench --soak`: endless load with a short retention; disk, changelog and restore time must stay flat.

The benchmark starts one processor with `--retention` on fresh topics whose changelog compacts
within a minute (short segments, a low dirty ratio and a short `delete.retention.ms`, so that what
production spreads over days happens in minutes). It creates and resolves promises at a steady
rate for `seconds`; every `interval` it records the processor's RocksDB size on disk and times a
full restore of the changelog into empty stores (`python -m consumers.restore_probe`), which also
says how many records the changelog holds. Without retention all three grow linearly with the
promises made; with it they level off once the first promises are purged and compacted away.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from dp import kafka as clients
from dp.bench import Spawned, delete_topics
from dp.client import Promises
from dp.settings import Kafka, Topics
from dp.topics import DEFAULT_PARTITIONS, config_of, create_topics

FAST_COMPACTION: Final = {
    "segment.ms": "20000",
    "min.cleanable.dirty.ratio": "0.01",
    "delete.retention.ms": "20000",
    "min.compaction.lag.ms": "0",
}
"""Changelog settings that let compaction keep up within a soak of minutes (production keeps dp's own)."""
PROMISE_LIFETIME_S: Final = 3_600.0
IN_FLIGHT: Final = 1_000


@dataclass(frozen=True)
class SoakOptions:
    kafka: Kafka
    rate: int = 500
    """Promises created (and resolved) per second: twice as many commands."""
    seconds: float = 600.0
    interval: float = 30.0
    retention_s: float = 10.0
    partitions: int = DEFAULT_PARTITIONS
    progress: bool = True


@dataclass
class Sample:
    at_s: float
    promises: int
    rocksdb_bytes: int
    changelog_records: int
    restore_seconds: float


@dataclass
class SoakReport:
    rate: int
    retention_s: float
    partitions: int
    samples: list[Sample] = field(default_factory=list)

    def growth(self) -> dict[str, float]:
        """Each figure's peak over the last `window` of the run over its peak in the `window` after the first
        minute (flat: under 2; linear growth: about the run's length over the window). Peaks, not single
        samples: RocksDB's size is a sawtooth (memtables flush, level-0 files pile up and compact away), and
        a sample lands anywhere on it."""
        settled = [s for s in self.samples if s.at_s >= 60]
        if len(settled) < 2:
            return {}
        window = max((settled[-1].at_s - settled[0].at_s) / 3, 1.0)
        first = [s for s in settled if s.at_s < settled[0].at_s + window]
        last = [s for s in settled if s.at_s > settled[-1].at_s - window]
        return {
            name: round(max(getattr(s, name) for s in last) / max(max(getattr(s, name) for s in first), 1e-9), 2)
            for name in ("rocksdb_bytes", "changelog_records", "restore_seconds")
        }


async def run_soak(options: SoakOptions) -> SoakReport:
    run = uuid.uuid4().hex[:8]
    topics = Topics(f"dpbench-soak-{run}")
    spawned = Spawned()
    connection = ("--bootstrap-servers", options.kafka.bootstrap_servers, "--topic-prefix", topics.prefix)
    data = spawned.scratch / "data"
    report = SoakReport(options.rate, options.retention_s, options.partitions)
    try:
        await create_topics(options.kafka, topics, options.partitions)
        await compact_fast(options.kafka, topics)
        spawned.start(
            "-m", "dp.cli", "serve", *connection, "--group", f"dpbench-soak-{run}", "--data-dir", str(data),
            "--retention", f"{options.retention_s}s",
        )  # fmt: skip
        async with Promises(kafka=options.kafka, topics=topics, reply_timeout=120.0) as promises:
            await promises.get("warm-up")  # answered once the processor serves every partition it owns
            made = [0]
            load = asyncio.create_task(steady_load(promises, options.rate, f"{run}/", made))
            began = time.monotonic()
            try:
                while (elapsed := time.monotonic() - began) < options.seconds:
                    await asyncio.sleep(min(options.interval, options.seconds - elapsed))
                    probe = await restore_probe(connection)
                    sample = Sample(
                        round(time.monotonic() - began, 1),
                        made[0],
                        disk_bytes(data),
                        int(probe["records"]),
                        float(probe["seconds"]),
                    )
                    report.samples.append(sample)
                    if options.progress:
                        print(f"dp bench: soak {describe(sample)}", file=sys.stderr, flush=True)
            finally:
                load.cancel()
                await asyncio.gather(load, return_exceptions=True)
        return report
    finally:
        spawned.close()
        await delete_topics(options.kafka, topics)


async def compact_fast(kafka: Kafka, topics: Topics) -> None:
    """The changelog as dp creates it, with `FAST_COMPACTION` (AlterConfigs replaces the whole config)."""
    configs = {**config_of(topics, topics.changelog), **FAST_COMPACTION}
    async with clients.started(kafka, clients.admin(kafka)) as admin:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topics.changelog, configs)])


async def steady_load(promises: Promises, rate: int, prefix: str, made: list[int]) -> None:
    """Create then resolve `rate` promises a second, paced per tenth of a second, at most `IN_FLIGHT` at once."""
    slots = asyncio.Semaphore(IN_FLIGHT)
    tasks: set[asyncio.Task[None]] = set()

    async def one(promise_id: str) -> None:
        try:
            await promises.create(promise_id, timeout=PROMISE_LIFETIME_S)
            await promises.resolve(promise_id)
        finally:
            slots.release()

    tick, started = 0, time.monotonic()
    try:
        while True:
            tick += 1
            for _ in range(rate // 10):
                await slots.acquire()
                task = asyncio.create_task(one(f"{prefix}{made[0]}"))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                made[0] += 1
            await asyncio.sleep(max(0.0, started + tick / 10 - time.monotonic()))
    finally:  # the soak is over: the promises under way are abandoned with it
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def restore_probe(connection: tuple[str, ...]) -> dict[str, float]:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumers.restore_probe", *connection, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await child.communicate()
    result: dict[str, float] = json.loads(out)
    return result


def disk_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) if path.exists() else 0


def describe(sample: Sample) -> str:
    return (
        f"t={sample.at_s:.0f}s promises={sample.promises:,} rocksdb={sample.rocksdb_bytes / 2**20:.1f} MiB "
        f"changelog={sample.changelog_records:,} records restore={sample.restore_seconds:.2f}s"
    )


def summary(report: SoakReport) -> str:
    lines = [
        f"soak: {report.rate} promises/s created and resolved, retention {report.retention_s:g}s, "
        f"{report.partitions} partitions",
        *(f"  {describe(sample)}" for sample in report.samples),
    ]
    if growth := report.growth():
        lines.append("  peak of the last third over peak of the first (after a minute): "
                     + ", ".join(f"{k} x{v}" for k, v in growth.items()))  # fmt: skip
    return "\n".join(lines)


def render(report: SoakReport, as_json: bool) -> str:
    return json.dumps({**asdict(report), "growth": report.growth()}) if as_json else summary(report)


def plot(report: SoakReport, path: Path) -> None:
    """RocksDB size, changelog records and restore time against time, from the run's own samples."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 7), layout="constrained")
    FigureCanvasAgg(figure)
    minutes = [sample.at_s / 60 for sample in report.samples]
    rows: tuple[tuple[str, list[float]], ...] = (
        ("RocksDB on disk (MiB)", [s.rocksdb_bytes / 2**20 for s in report.samples]),
        ("changelog records", [float(s.changelog_records) for s in report.samples]),
        ("full restore (s)", [s.restore_seconds for s in report.samples]),
    )
    for index, (label, values) in enumerate(rows, start=1):
        axes = figure.add_subplot(3, 1, index)
        axes.plot(minutes, values, marker="o")
        axes.set_ylabel(label)
        axes.set_ylim(bottom=0)
        axes.grid(True, alpha=0.3)
    axes.set_xlabel("minutes")
    figure.suptitle(f"dp soak: {report.rate} promises/s created and resolved, retention {report.retention_s:g} s")
    figure.savefig(path, format="png", dpi=110)
