"""Creating and checking the deployment's topics (WIRE.md: commands, events and changelog share P)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

from aiokafka.admin import NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from dp import kafka as clients
from dp.errors import TopicsProblem
from dp.kafka import MAX_MESSAGE_BYTES
from dp.settings import Kafka, Topics
from dp.wire import DEFAULT_LIMITS

DEFAULT_PARTITIONS = 8
UNKNOWN_TOPIC = 3
READY_SECONDS = 30.0
# Every record carries the broker's time, never the writer's: a processor whose clock is off still
# publishes (Kafka refuses CreateTime records more than an hour ahead), and readers see one clock.
TIMESTAMPS = {"message.timestamp.type": "LogAppendTime"}
# What dp writes must fit (MAX_MESSAGE_BYTES); commands get what the processor accepts by default
# plus room for key, headers and batch framing, so the topic refuses what the processor would.
TOPIC_CONFIG = {"max.message.bytes": str(MAX_MESSAGE_BYTES), **TIMESTAMPS}
COMMANDS_CONFIG = {"max.message.bytes": str(DEFAULT_LIMITS.max_record_bytes + 64 * 1024), **TIMESTAMPS}
CHANGELOG_CONFIG = {**TOPIC_CONFIG, "cleanup.policy": "compact"}


def partitioned(topics: Topics) -> tuple[str, str, str]:
    """The topics whose partition numbers must line up: a promise lives on the same number in each."""
    return (topics.commands, topics.events, topics.changelog)


def all_topics(topics: Topics) -> tuple[str, ...]:
    return (*partitioned(topics), topics.replies, topics.dlq, topics.notifications)


def config_of(topics: Topics, name: str) -> dict[str, str]:
    """The configuration dp creates topic `name` with."""
    if name == topics.commands:
        return COMMANDS_CONFIG
    return CHANGELOG_CONFIG if name == topics.changelog else TOPIC_CONFIG


async def partition_counts(admin: Any, names: tuple[str, ...]) -> dict[str, int]:
    """Partition count of each existing topic among `names`; missing topics are left out."""
    described = await admin.describe_topics(list(names))
    return {
        topic["topic"]: len(topic["partitions"])
        for topic in described
        if topic["error_code"] != UNKNOWN_TOPIC and topic["partitions"]
    }


def mismatch(counts: dict[str, int], topics: Topics) -> str | None:
    present = {name: counts[name] for name in partitioned(topics) if name in counts}
    if len(set(present.values())) > 1:
        listing = ", ".join(f"{name} has {count}" for name, count in present.items())
        return (
            f"partition counts disagree ({listing}); commands, events and changelog must have the same "
            "count: delete the odd topics (losing their data) or recreate the deployment with one count."
        )
    return None


async def create_topics(
    kafka: Kafka, topics: Topics, partitions: int | None = None, replication_factor: int = 1
) -> list[str]:
    """Create whatever is missing; idempotent. Returns the names created."""
    async with clients.started(kafka, clients.admin(kafka)) as admin:
        counts = await partition_counts(admin, all_topics(topics))
        problem = mismatch(counts, topics)
        if problem:
            raise TopicsProblem(problem)
        existing = {counts[name] for name in partitioned(topics) if name in counts}
        if partitions is not None and existing and existing != {partitions}:
            raise TopicsProblem(
                f"the topics already exist with {existing.pop()} partitions, not {partitions}; the count is fixed "
                "for the life of a deployment: drop --partitions, or delete the topics to start over."
            )
        count = partitions or (existing.pop() if existing else DEFAULT_PARTITIONS)
        missing = [
            NewTopic(name, count, replication_factor, topic_configs=config_of(topics, name))
            for name in all_topics(topics)
            if name not in counts
        ]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass
            except KafkaError as error:
                raise TopicsProblem(
                    f"Kafka refused to create the topics ({error}); check broker permissions."
                ) from None
            await wait_until_ready(admin, all_topics(topics))
        return [topic.name for topic in missing]


async def wait_until_ready(admin: Any, names: tuple[str, ...]) -> None:
    """Creation is asynchronous in Kafka: return once every topic is described with its leaders."""
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        described = await admin.describe_topics(list(names))
        if all(
            topic["error_code"] == 0
            and topic["partitions"]
            and all(partition["leader"] >= 0 for partition in topic["partitions"])
            for topic in described
        ):
            return
        await asyncio.sleep(0.1)
    raise TopicsProblem(
        f"the topics were created but have no leaders after {READY_SECONDS:.0f}s; check the broker log."
    )


def required_topics(topics: Topics) -> tuple[str, ...]:
    """The topics a processor or client cannot start without. The notifications topic came later: a
    deployment without it runs, refusing webhook subscriptions until `dp topics create` adds it."""
    return tuple(name for name in all_topics(topics) if name != topics.notifications)


async def check_topics(kafka: Kafka, topics: Topics, *, every: bool = False) -> int:
    """The deployment's partition count, or TopicsProblem saying how to fix the topics (the required ones,
    or `every` one)."""
    names = all_topics(topics) if every else required_topics(topics)
    async with clients.started(kafka, clients.admin(kafka)) as admin:
        counts = await partition_counts(admin, names)
    absent = [name for name in names if name not in counts]
    if absent:
        raise TopicsProblem(f"missing topics {', '.join(absent)}: create them with `dp topics create`.")
    problem = mismatch(counts, topics)
    if problem:
        raise TopicsProblem(problem)
    return counts[topics.commands]


async def topic_configs(admin: Any, names: Iterable[str], keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """The asked configuration `keys` of each topic among `names` that exists, in one request."""
    wanted = dict.fromkeys(keys)
    resources = [ConfigResource(ConfigResourceType.TOPIC, name, dict(wanted)) for name in names]
    if not resources:
        return {}
    return {
        resource["resource_name"]: {
            entry["config_names"]: entry["config_value"] for entry in resource["config_entries"]
        }
        for response in await admin.describe_configs(resources)
        for resource in response.to_object()["resources"]
        if resource["error_code"] == 0
    }


async def check_configs(kafka: Kafka, topics: Topics) -> None:
    """TopicsProblem unless every topic is configured as the processor needs: broker timestamps, room for
    the largest record dp writes, and a compacted changelog. The sentence names the command that fixes it."""
    names = all_topics(topics)
    async with clients.started(kafka, clients.admin(kafka)) as admin:
        actual = await topic_configs(admin, names, ("max.message.bytes", "message.timestamp.type", "cleanup.policy"))
    problems = [problem for name in names for problem in _config_problems(topics, name, actual.get(name, {}))]
    if problems:
        raise TopicsProblem(
            f"topic configuration {'; '.join(problems)}: fix it with Kafka's tool, e.g. `kafka-configs.sh "
            "--bootstrap-server HOST:PORT --alter --entity-type topics --entity-name TOPIC --add-config "
            "message.timestamp.type=LogAppendTime`, or recreate the topics with `dp topics create`."
        )


def _config_problems(topics: Topics, name: str, actual: dict[str, str]) -> list[str]:
    wanted = config_of(topics, name)
    problems = []
    if actual.get("message.timestamp.type") != "LogAppendTime":
        problems.append(f"{name} has message.timestamp.type={actual.get('message.timestamp.type')}, not LogAppendTime")
    if name != topics.commands and int(actual.get("max.message.bytes") or 0) < int(wanted["max.message.bytes"]):
        problems.append(
            f"{name} has max.message.bytes={actual.get('max.message.bytes')}, below {wanted['max.message.bytes']}"
        )
    if name == topics.changelog and "compact" not in (actual.get("cleanup.policy") or ""):
        problems.append(f"{name} has cleanup.policy={actual.get('cleanup.policy')}, not compact")
    return problems
