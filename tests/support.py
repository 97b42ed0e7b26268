"""Helpers shared by the tests: paths, the test broker, `dp serve` processes and wire-command builders.

Test modules import from here (never from conftest.py or from one another); conftest.py holds only
fixtures and hooks.
"""

from __future__ import annotations

import base64
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dp.settings import Topics

REPO = Path(__file__).resolve().parent.parent
KAFKA_SCRIPT = REPO / "scripts" / "kafka"
UNIT_TESTS = REPO / "tests" / "unit"  # pure tests: no broker, no process that needs one
TEST_PARTITIONS = 4
LONG = 3_600_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def container_broker() -> Iterator[str]:
    try:
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:  # an older testcontainers; the locked one warns (DeprecationWarning) on the old path
        from testcontainers.kafka import KafkaContainer

    with KafkaContainer("apache/kafka:4.1.1").with_kraft() as kafka:
        yield kafka.get_bootstrap_server()


def script_broker() -> Iterator[str]:
    data = Path(tempfile.mkdtemp(prefix="dp-test-kafka-"))
    port = free_port()
    command = [sys.executable, str(KAFKA_SCRIPT)]
    try:
        started = subprocess.run(
            [*command, "start", "--port", str(port), "--data", str(data)], capture_output=True, text=True
        )
        if started.returncode != 0:
            pytest.exit(f"could not start the test broker: {started.stderr.strip()}", returncode=2)
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([*command, "stop", "--data", str(data)], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


class ServeProcess:
    """One `dp serve` OS process, so that tests can kill -9, SIGSTOP and restart it like an operator."""

    def __init__(
        self,
        bootstrap_servers: str,
        topics: Topics,
        group: str,
        data_dir: Path,
        log: Path,
        clock_offset_ms: int = 0,
    ) -> None:
        """`clock_offset_ms` runs the processor with its wall clock that far off, as on a badly synced host."""
        self.command = [
            sys.executable, *launcher(clock_offset_ms), "serve",
            "--bootstrap-servers", bootstrap_servers,
            "--topic-prefix", topics.prefix,
            "--group", group,
            "--data-dir", str(data_dir),
        ]  # fmt: skip
        self.data_dir = data_dir
        self.group = group
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServeProcess:
        assert self.process is None or self.process.poll() is not None, "already running"
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        return self

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill(self) -> None:
        """kill -9: no chance to finish anything."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, seconds: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(seconds)

    def owned(self) -> set[int]:
        """The partitions this process serves now, from its log ("partition N: open" / "closed")."""
        owned: set[int] = set()
        for number, change in re.findall(r"partition (\d+): (open|closed)", self.log.read_text()):
            (owned.add if change == "open" else owned.discard)(int(number))
        return owned

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def peak_rss_bytes(self) -> int:
        """The process's peak resident memory so far (VmHWM), while it runs."""
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        (kib,) = re.findall(r"VmHWM:\s+(\d+) kB", status)
        return int(kib) * 1024


def launcher(clock_offset_ms: int) -> list[str]:
    """`-m dp.cli`, or the same with Python's wall clock shifted: aiokafka's pure-Python record builder
    then stamps records with it too (its C one reads the system clock)."""
    if not clock_offset_ms:
        return ["-m", "dp.cli"]
    shift = clock_offset_ms / 1000
    return [
        "-c",
        "import os, runpy, time\n"
        "os.environ['AIOKAFKA_NO_EXTENSIONS'] = '1'\n"
        f"real_time, real_ns = time.time, time.time_ns\n"
        f"time.time = lambda: real_time() + {shift}\n"
        f"time.time_ns = lambda: real_ns() + {clock_offset_ms * 1_000_000}\n"
        "runpy.run_module('dp.cli', run_name='__main__', alter_sys=True)",
    ]


def now_ms() -> int:
    return int(time.time() * 1000)


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def create(promise_id: str, key: str | None = "ik", timeout: int | None = None, **extra: Any) -> dict[str, Any]:
    """A create command as wire JSON; the timeout defaults to an hour from now."""
    return {"op": "create", "id": promise_id, "idempotencyKey": key,
            "timeout": timeout if timeout is not None else now_ms() + LONG, **extra}  # fmt: skip


def complete(op: str, promise_id: str, key: str | None = "iku", strict: bool = False) -> dict[str, Any]:
    """A resolve, reject or cancel command as wire JSON, with a small value."""
    value = {"headers": {"k": "v"}, "data": base64.b64encode(b'"done"').decode()}
    return {"op": op, "id": promise_id, "idempotencyKey": key, "strict": strict, "value": value}
