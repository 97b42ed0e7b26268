"""Shared fixtures: one real Kafka broker per test session, and fresh topics per test.

The broker is, in order of preference: the one named by DP_BOOTSTRAP_SERVERS; a testcontainers
Kafka container where a Docker engine answers; otherwise a throwaway broker started with
`scripts/kafka` on a free port and a temporary data dir, always stopped at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from dp.settings import Kafka, Topics
from dp.topics import create_topics

REPO = Path(__file__).resolve().parent.parent
KAFKA_SCRIPT = REPO / "scripts" / "kafka"
TEST_PARTITIONS = 4


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


@pytest.fixture(scope="session")
def bootstrap_servers() -> Iterator[str]:
    if os.environ.get("DP_BOOTSTRAP_SERVERS"):
        yield os.environ["DP_BOOTSTRAP_SERVERS"]
    elif docker_answers():
        yield from container_broker()
    else:
        yield from script_broker()


def container_broker() -> Iterator[str]:
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


@pytest.fixture(scope="session")
def kafka(bootstrap_servers: str) -> Kafka:
    return Kafka(bootstrap_servers=bootstrap_servers)


@pytest.fixture
async def topics(kafka: Kafka) -> AsyncIterator[Topics]:
    """A fresh set of the five topics for one test, so tests never see each other's records."""
    names = Topics(f"t{uuid.uuid4().hex[:10]}")
    await create_topics(kafka, names, TEST_PARTITIONS)
    yield names


class ServeProcess:
    """One `dp serve` OS process, so that tests can kill -9, SIGSTOP and restart it like an operator."""

    def __init__(self, bootstrap_servers: str, topics: Topics, group: str, data_dir: Path, log: Path) -> None:
        self.command = [
            sys.executable, "-m", "dp.cli", "serve",
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


@pytest.fixture
def spawn(bootstrap_servers: str, topics: Topics, tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Start `dp serve` processes on this test's topics; every one is killed at teardown."""
    started: list[ServeProcess] = []
    group = f"g-{uuid.uuid4().hex[:8]}"

    def start(name: str = "a") -> ServeProcess:
        process = ServeProcess(bootstrap_servers, topics, group, tmp_path / f"data-{name}", tmp_path / f"{name}.log")
        started.append(process.start())
        return process

    yield start
    for process in started:
        if process.process is not None and process.process.poll() is None:
            process.process.send_signal(signal.SIGCONT)
        process.kill()
