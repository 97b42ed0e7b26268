"""Helpers shared by the tests: paths, the test broker, `dp serve`, `dp gateway` and `dp webhooks`
processes and wire-command builders.

Test modules import from here (never from conftest.py or from one another); conftest.py holds only
fixtures and hooks.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dp.settings import Topics
from tests.http_cases import ANY, FUTURE, PAST, SOME, Case, Step

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


class Service:
    """A `dp` service as an OS process: stopped with SIGTERM, or killed with -9, like an operator would."""

    process: subprocess.Popen[bytes] | None

    def stop(self, seconds: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(seconds)

    def kill(self) -> None:
        """kill -9: no chance to finish anything."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class ServeProcess(Service):
    """One `dp serve` OS process, so that tests can kill -9, SIGSTOP and restart it like an operator."""

    def __init__(
        self,
        bootstrap_servers: str,
        topics: Topics,
        group: str,
        data_dir: Path,
        log: Path,
        clock_offset_ms: int = 0,
        options: Sequence[str] = (),
    ) -> None:
        """`clock_offset_ms` runs the processor with its wall clock that far off, as on a badly synced host;
        `options` are more `dp serve` flags."""
        self.command = [
            sys.executable, *launcher(clock_offset_ms), "serve",
            "--bootstrap-servers", bootstrap_servers,
            "--topic-prefix", topics.prefix,
            "--group", group,
            "--data-dir", str(data_dir), *options,
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

    def owned(self) -> set[int]:
        """The partitions this process serves now, from its log ("partition N: open" / "closed")."""
        owned: set[int] = set()
        for number, change in re.findall(r"partition (\d+): (open|closed)", self.log.read_text()):
            (owned.add if change == "open" else owned.discard)(int(number))
        return owned

    def peak_rss_bytes(self) -> int:
        """The process's peak resident memory so far (VmHWM), while it runs."""
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        (kib,) = re.findall(r"VmHWM:\s+(\d+) kB", status)
        return int(kib) * 1024


class GatewayProcess(Service):
    """One `dp gateway` OS process on a free port of 127.0.0.1, started and stopped like an operator would."""

    def __init__(self, bootstrap_servers: str, topics: Topics, log: Path, env: dict[str, str] | None = None) -> None:
        """`env` adds variables (e.g. DP_GATEWAY_TOKENS) to the process's environment."""
        self.port = free_port()
        self.command = [
            sys.executable, "-m", "dp.cli", "gateway",
            "--bootstrap-servers", bootstrap_servers,
            "--topic-prefix", topics.prefix,
            "--listen", f"127.0.0.1:{self.port}",
        ]  # fmt: skip
        self.env = env or {}
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_within: float = 60.0, wait: bool = True) -> GatewayProcess:
        """Start it and, unless `wait` is False, return once `/readyz` answers 200 (connected to Kafka)."""
        assert self.process is None or self.process.poll() is not None, "already running"
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **self.env}
            )
        deadline = time.monotonic() + ready_within
        while wait and not self.ready():
            if self.process.poll() is not None:
                pytest.fail(f"dp gateway exited with {self.process.returncode}:\n{self.log.read_text()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"dp gateway was not ready within {ready_within:g}s:\n{self.log.read_text()}")
            time.sleep(0.05)  # polling a condition: the next look at /readyz
        return self

    def answers(self, path: str) -> int | None:
        """The status of `GET path`, None when nothing answers (not listening yet, or gone)."""
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=2) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as error:
            return int(error.code)
        except (urllib.error.URLError, OSError):
            return None

    def ready(self) -> bool:
        return self.answers("/readyz") == 200


class WebhooksProcess(Service):
    """One `dp webhooks` OS process, started, stopped and killed like an operator would."""

    def __init__(self, bootstrap_servers: str, topics: Topics, log: Path, env: dict[str, str] | None = None) -> None:
        """`env` adds variables (e.g. DP_WEBHOOK_HOSTS) to the process's environment."""
        self.command = [
            sys.executable, "-m", "dp.cli", "webhooks",
            "--bootstrap-servers", bootstrap_servers,
            "--topic-prefix", topics.prefix,
        ]  # fmt: skip
        self.env = env or {}
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready_within: float = 60.0, wait: bool = True) -> WebhooksProcess:
        """Start it and, unless `wait` is False, return once this run was assigned its partitions."""
        assert self.process is None or self.process.poll() is not None, "already running"
        runs = self.assignments()
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **self.env}
            )
        deadline = time.monotonic() + ready_within
        while wait and self.assignments() == runs:
            if self.process.poll() is not None:
                pytest.fail(f"dp webhooks exited with {self.process.returncode}:\n{self.log.read_text()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"dp webhooks joined no group within {ready_within:g}s:\n{self.log.read_text()}")
            time.sleep(0.05)  # polling a condition: the next look at the log
        return self

    def assignments(self) -> int:
        """How many times its runs were assigned partitions so far, from the log."""
        return self.log.read_text().count("assigned partitions") if self.log.exists() else 0


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
    """A fresh id: 64 random bits, so that a test making thousands never draws one twice (with 32 bits,
    2,000 creates collided about once in 2,000 runs, and a create came back `deduplicated`)."""
    return f"{name}-{uuid.uuid4().hex[:16]}"


def create(promise_id: str, key: str | None = "ik", timeout: int | None = None, **extra: Any) -> dict[str, Any]:
    """A create command as wire JSON; the timeout defaults to an hour from now."""
    return {"op": "create", "id": promise_id, "idempotencyKey": key,
            "timeout": timeout if timeout is not None else now_ms() + LONG, **extra}  # fmt: skip


def complete(op: str, promise_id: str, key: str | None = "iku", strict: bool = False) -> dict[str, Any]:
    """A resolve, reject or cancel command as wire JSON, with a small value."""
    value = {"headers": {"k": "v"}, "data": base64.b64encode(b'"done"').decode()}
    return {"op": op, "id": promise_id, "idempotencyKey": key, "strict": strict, "value": value}


# --- the HTTP case table (tests/http_cases.py): its templates and its checks -------------------------


@dataclass
class Scene:
    """What a row's templates refer to: its id, the time it started, the last cursor seen."""

    id: str
    now_ms: int
    cursor: str = ""

    def text(self, template: str) -> str:
        for name, size in (("{id256}", 256), ("{id257}", 257)):
            template = template.replace(name, self.id + "x" * (size - len(self.id)))
        return template.replace("{id}", self.id).replace("{cursor}", self.cursor)

    def value(self, template: Any) -> Any:
        if template == FUTURE:
            return self.now_ms + 3_600_000
        if template == PAST:
            return self.now_ms - 1_000
        if isinstance(template, str):
            return self.text(template)
        if isinstance(template, dict):
            return {self.text(key): self.value(item) for key, item in template.items()}
        if isinstance(template, list):
            return [self.value(item) for item in template]
        return template

    def headers(self, step: Step) -> dict[str, str]:
        return {name: self.text(value) for name, value in step.headers.items()}


def mismatches(case: Case, scene: Scene, status: int, document: Any) -> list[str]:
    """Every way an answer (status, decoded JSON body) differs from the row; empty when it fits."""
    problems: list[str] = []
    if status != case.status:
        problems.append(f"status {status}, expected {case.status}: {document}")
    if case.code is not None:
        error = document.get("error") if isinstance(document, dict) else None
        if not isinstance(error, dict) or error.get("code") != case.code:
            problems.append(f"error code: expected {case.code}, got {document}")
        elif not isinstance(error.get("message"), str) or not isinstance(error.get("details"), list):
            problems.append(f"error body without a message or a details list: {document}")
        elif case.details is not None:
            named = tuple(detail.get("field") for detail in error["details"])
            if named != tuple(scene.text(name) for name in case.details):
                problems.append(f"details name {named}, expected {case.details}")
    if case.expect is not None:
        problems.extend(_differences(scene.value(case.expect), document, "$"))
    for dotted in case.absent:
        if _has(document, dotted.split(".")):
            problems.append(f"{dotted} should be omitted: {document}")
    return problems


def _differences(expected: Any, got: Any, path: str) -> Iterator[str]:
    if expected == ANY:
        return
    if expected == SOME:
        if got is None:
            yield f"{path}: expected a value, got null"
        return
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            yield f"{path}: expected an object, got {got!r}"
            return
        if not expected and got:
            yield f"{path}: expected {{}}, got {got!r}"
        for key, item in expected.items():
            if key not in got:
                yield f"{path}.{key}: missing"
            else:
                yield from _differences(item, got[key], f"{path}.{key}")
        return
    if isinstance(expected, list):
        if not isinstance(got, list) or len(got) != len(expected):
            yield f"{path}: expected {len(expected)} items, got {got!r}"
            return
        for index, (item, found) in enumerate(zip(expected, got, strict=True)):
            yield from _differences(item, found, f"{path}[{index}]")
        return
    if expected != got:
        yield f"{path}: expected {expected!r}, got {got!r}"


def _has(document: Any, keys: list[str]) -> bool:
    for key in keys:
        if not isinstance(document, dict) or key not in document:
            return False
        document = document[key]
    return True
