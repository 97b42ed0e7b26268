"""Fixtures and hooks: one real Kafka broker per test session, fresh topics per test, the `kafka` marker.

The broker is, in order of preference: the one named by DP_BOOTSTRAP_SERVERS; a testcontainers
Kafka container where a Docker engine answers; otherwise a throwaway broker started with
`scripts/kafka` on a free port and a temporary data dir, always stopped at the end. It starts only
when a test asks for it: tests/unit/ holds the pure tests, which must not; every other test is
marked `kafka`. Shared helpers live in tests/support.py.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest

from dp.client import Promises
from dp.settings import Kafka, Topics
from dp.topics import create_topics
from tests.support import (
    TEST_PARTITIONS,
    UNIT_TESTS,
    GatewayProcess,
    ServeProcess,
    WebhooksProcess,
    container_broker,
    docker_answers,
    script_broker,
)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test outside tests/unit/ is a broker test: `-m kafka` selects them, `-m "not kafka"` the rest."""
    for item in items:
        if not item.path.is_relative_to(UNIT_TESTS):
            item.add_marker(pytest.mark.kafka)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A pure test that asks for the broker (directly or through another fixture) fails before it starts one."""
    if item.path.is_relative_to(UNIT_TESTS) and "bootstrap_servers" in getattr(item, "fixturenames", ()):
        pytest.fail(
            f"{item.nodeid} asks for the Kafka broker, but tests/unit/ holds only pure tests: "
            "move the test out of tests/unit/ or stop using the broker fixtures.",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def bootstrap_servers() -> Iterator[str]:
    if os.environ.get("DP_BOOTSTRAP_SERVERS"):
        yield os.environ["DP_BOOTSTRAP_SERVERS"]
    elif docker_answers():
        yield from container_broker()
    else:
        yield from script_broker()


@pytest.fixture(scope="session")
def kafka(bootstrap_servers: str) -> Kafka:
    return Kafka(bootstrap_servers=bootstrap_servers)


@pytest.fixture
async def topics(kafka: Kafka) -> AsyncIterator[Topics]:
    """A fresh set of the six topics for one test, so tests never see each other's records."""
    names = Topics(f"t{uuid.uuid4().hex[:10]}")
    await create_topics(kafka, names, TEST_PARTITIONS)
    yield names


@pytest.fixture
def spawn(bootstrap_servers: str, topics: Topics, tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Start `dp serve` processes on this test's topics; every one is killed at teardown."""
    started: list[ServeProcess] = []
    group = f"g-{uuid.uuid4().hex[:8]}"

    def start(
        name: str = "a", clock_offset_ms: int = 0, group: str = group, options: Sequence[str] = ()
    ) -> ServeProcess:
        data, log = tmp_path / f"data-{name}", tmp_path / f"{name}.log"
        process = ServeProcess(bootstrap_servers, topics, group, data, log, clock_offset_ms, options)
        started.append(process.start())
        return process

    yield start
    for process in started:
        if process.process is not None and process.process.poll() is None:
            process.process.send_signal(signal.SIGCONT)
        process.kill()


@pytest.fixture
def gateways(bootstrap_servers: str, topics: Topics, tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Start `dp gateway` processes (on this test's topics unless told otherwise, with extra environment
    variables, ready unless `wait=False`); every one is killed at teardown."""
    started: list[GatewayProcess] = []

    def start(env: dict[str, str] | None = None, *, on: Topics | None = None, wait: bool = True) -> GatewayProcess:
        process = GatewayProcess(bootstrap_servers, on or topics, tmp_path / f"gateway-{len(started)}.log", env)
        started.append(process)
        return process.start(wait=wait)

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def webhooks(bootstrap_servers: str, topics: Topics, tmp_path: Path) -> Iterator[Callable[..., WebhooksProcess]]:
    """Make `dp webhooks` processes on this test's topics with extra environment variables (not started: a
    test starts, stops and restarts them); every one is killed at teardown."""
    made: list[WebhooksProcess] = []

    def make(env: dict[str, str] | None = None) -> WebhooksProcess:
        process = WebhooksProcess(bootstrap_servers, topics, tmp_path / f"webhooks-{len(made)}.log", env)
        made.append(process)
        return process

    yield make
    for process in made:
        process.kill()


@pytest.fixture
def gateway(spawn: Callable[..., ServeProcess], gateways: Callable[..., GatewayProcess]) -> GatewayProcess:
    """A processor (through `spawn`) and a `dp gateway` in front of it, ready; both killed at teardown."""
    spawn()
    return gateways()


@pytest.fixture
async def promises(kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]) -> AsyncIterator[Promises]:
    """A client of a freshly spawned processor (the first reply comes once it has joined its group)."""
    spawn()
    async with Promises(kafka=kafka, topics=topics) as client:
        yield client
