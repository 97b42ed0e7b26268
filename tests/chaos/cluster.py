"""The broker and the processors as OS processes, so that faults are the real thing: kill -9, SIGSTOP.

Every process started here is also stopped here (`Cluster.close`, called from a `finally`). The
processors additionally die with the chaos run itself (PR_SET_PDEATHSIG), so even a SIGKILL of the
run leaves at most the broker behind, whose data dir the caller knows (`scripts/kafka stop --data`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dp.settings import Topics
from dp.wire import Limits

REPO = Path(__file__).resolve().parent.parent.parent
KAFKA_SCRIPT = REPO / "scripts" / "kafka"
PR_SET_PDEATHSIG = 1
OPEN_OR_CLOSED = re.compile(rb"^(\S+ \S+) .*partition (\d+): (open|closed)", re.MULTILINE)
FENCED = re.compile(rb"ProducerFenced|fenced by the consumer group")
RESTORED = re.compile(rb"partition \d+: open \(restored (\d+) records")


class ClusterError(RuntimeError):
    """The run's own machinery failed (a broker that does not start): no verdict is possible."""


def die_with_parent() -> None:
    """Runs in the child before exec: the kernel SIGKILLs it when the chaos run goes away."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


async def poll_until(condition: Callable[[], bool], seconds: float, interval: float = 0.1) -> bool:
    """Poll a condition that nothing can signal (log files, /proc) until it holds or time is up."""
    deadline = time.monotonic() + seconds
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)


def process_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (the broker is not our child: init reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@dataclass
class Broker:
    """A single-node broker started with scripts/kafka on a free port; killable and restartable."""

    data: Path
    port: int
    outages: list[tuple[float, float]] = field(default_factory=list)

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> float:
        """Start (or restart, on the same data) and wait until it answers; returns the seconds it took.

        Formatting fresh storage is retried: scripts/kafka draws a random cluster id, and one that
        begins with "-" is taken for an option by kafka-storage (about 1 start in 64).
        """
        began = time.monotonic()
        for attempt in range(3):
            process = await asyncio.create_subprocess_exec(
                sys.executable, str(KAFKA_SCRIPT), "start", "--port", str(self.port), "--data", str(self.data),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            out, err = await process.communicate()
            if process.returncode == 0:
                return time.monotonic() - began
            problem = (out + err).decode().strip()
            if "formatting Kafka storage" not in problem or attempt == 2:
                raise ClusterError(f"scripts/kafka start failed: {problem}")
        raise AssertionError("unreachable")

    def pid(self) -> int | None:
        try:
            return int((self.data / "broker.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    async def kill9(self) -> None:
        """kill -9 the broker's process group and wait until it is gone."""
        pid = self.pid()
        if pid is None:
            raise ClusterError("the broker has no pid file: is it running?")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while process_alive(pid):
            if time.monotonic() > deadline:
                raise ClusterError(f"broker pid {pid} survived kill -9 for 30 s")
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        """Synchronous, for `finally` blocks: scripts/kafka stop (SIGTERM, then SIGKILL after 30 s)."""
        subprocess.run(
            [sys.executable, str(KAFKA_SCRIPT), "stop", "--data", str(self.data)], capture_output=True, timeout=90
        )


@dataclass
class Processor:
    """One `dp serve` slot: its data dir and log survive restarts; each start is a new incarnation."""

    name: str
    command: list[str]
    data_dir: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    log_start: int = 0
    starts: int = 0
    expected_exit: bool = False

    def start(self) -> None:
        """A new incarnation; its log lines are the ones after `log_start`."""
        assert not self.alive, f"{self.name} is already running"
        self.log_start = self.log.stat().st_size if self.log.exists() else 0
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, env=env,
                start_new_session=True, preexec_fn=die_with_parent,
            )  # fmt: skip
        self.starts += 1
        self.expected_exit = False

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill9(self) -> None:
        """kill -9 the whole process group, no chance to finish anything; waits for the exit."""
        if self.process is None:
            return
        self.expected_exit = True
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGCONT)
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def freeze(self) -> None:
        os.killpg(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.pid, signal.SIGCONT)

    def terminate(self) -> None:
        """SIGTERM: the processor finishes its batches in flight, closes its stores and exits 0."""
        if self.alive:
            self.expected_exit = True
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)

    def wipe(self) -> None:
        """The lost disk: everything under the data dir goes (the process must be dead)."""
        assert not self.alive
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def incarnation_log(self) -> bytes:
        with self.log.open("rb") as log:
            log.seek(self.log_start)
            return log.read()

    def owned(self) -> set[int]:
        """Partitions this incarnation has open now (its "partition N: open/closed" lines)."""
        owned: set[int] = set()
        for _, number, change in OPEN_OR_CLOSED.findall(self.incarnation_log()):
            (owned.add if change == b"open" else owned.discard)(int(number))
        return owned

    def opens(self) -> list[tuple[str, int]]:
        """(log timestamp, partition) of every open in every incarnation, to find a partition's last owner."""
        text = self.log.read_bytes() if self.log.exists() else b""
        return [(stamp.decode(), int(n)) for stamp, n, change in OPEN_OR_CLOSED.findall(text) if change == b"open"]

    def woke(self, since: int) -> str:
        """What a thawed zombie logged after byte `since`, until it was next restarted."""
        with self.log.open("rb") as log:
            log.seek(since)
            text = log.read().split(b"INFO dp.processor: serving group", 1)[0]
        closed = sorted({int(n) for n in re.findall(rb"partition (\d+): closed", text)})
        fenced = "fencing logged" if FENCED.search(text) else "no fencing logged"
        return f"closed partitions {closed} on waking; {fenced}"

    def restored(self, since: int = 0) -> int:
        """Records restored from the changelog by opens logged after byte `since`."""
        with self.log.open("rb") as log:
            log.seek(since)
            return sum(int(n) for n in RESTORED.findall(log.read()))

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_bytes().decode(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def serve_command(
    bootstrap: str, topics: Topics, group: str, data_dir: Path, limits: Limits, retention: str = ""
) -> list[str]:
    """`dp serve` for one slot; `retention` as `--retention` takes it ("": none)."""
    return [
        sys.executable, "-m", "dp.cli", "serve",
        "--bootstrap-servers", bootstrap,
        "--topic-prefix", topics.prefix,
        "--group", group,
        "--data-dir", str(data_dir),
        "--max-record-bytes", str(limits.max_record_bytes),
        "--max-data-bytes", str(limits.max_data_bytes),
        *(("--retention", retention) if retention else ()),
    ]  # fmt: skip


@dataclass
class Cluster:
    """The broker and the processor slots of one run."""

    broker: Broker
    processors: list[Processor]
    partitions: int

    def live(self) -> list[Processor]:
        return [p for p in self.processors if p.alive]

    def unexpected_exits(self) -> list[Processor]:
        """Processors that exited without being killed or stopped by the run: each is a violation."""
        return [p for p in self.processors if p.process is not None and not p.alive and not p.expected_exit]

    def settled(self) -> bool:
        """Every partition open in exactly one live incarnation (as the processors' logs tell)."""
        owned = [n for p in self.live() for n in p.owned()]
        return sorted(owned) == list(range(self.partitions))

    def owners(self) -> dict[int, Processor]:
        """The processor that opened each partition last, across all incarnations (log timestamps)."""
        last: dict[int, tuple[str, Processor]] = {}
        for processor in self.processors:
            for stamp, number in processor.opens():
                if number not in last or stamp >= last[number][0]:
                    last[number] = (stamp, processor)
        return {number: processor for number, (_, processor) in last.items()}

    def close(self) -> None:
        """Kill every processor and stop the broker; safe to call twice and from `finally`."""
        for processor in self.processors:
            processor.kill9()
        self.broker.stop()
