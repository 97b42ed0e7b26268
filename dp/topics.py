"""Creating and checking the deployment's topics (WIRE.md: commands, events and changelog share P), with
the retention, compaction and record settings chosen in docs/topics.md."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
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
# describe_configs' source of a value set on the topic itself (not a broker default): what alter_configs,
# which replaces a topic's whole configuration, must send again to keep.
TOPIC_OVERRIDE = 1
FOREVER = "-1"
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
# Every record carries the broker's time, never the writer's: a processor whose clock is off still
# publishes (Kafka refuses CreateTime records more than an hour ahead), and readers see one clock.
TIMESTAMPS = {"message.timestamp.type": "LogAppendTime"}
# What dp writes must fit (MAX_MESSAGE_BYTES); commands get what the processor accepts by default
# plus room for key, headers and batch framing, so the topic refuses what the processor would.
COMMANDS_MAX_BYTES = DEFAULT_LIMITS.max_record_bytes + 64 * 1024
# How long each topic keeps its records (docs/topics.md says why). Commands must outlive the longest
# recovery: one still unapplied when its segment is deleted is lost without a reply.
COMMANDS_RETENTION_MS = 7 * DAY_MS
# Events are what downstream consumers replay: one that is down or rebuilding has a week to catch up.
EVENTS_RETENTION_MS = 7 * DAY_MS
# A reply is read within its client's timeout (seconds); a day covers a client that restarts and reads back.
REPLIES_RETENTION_MS = DAY_MS
# The DLQ is read by people: two weeks leaves time to notice, over holidays, and to act.
DLQ_RETENTION_MS = 14 * DAY_MS
# `dp webhooks` must read every notification: a webhook service down longer than this loses them.
NOTIFICATIONS_RETENTION_MS = 7 * DAY_MS
# Compaction never touches the active segment: the changelog's rolls within the hour (or at 64 MiB
# under load), so what purges and updates leave behind becomes cleanable.
CHANGELOG_SEGMENT_MS = HOUR_MS
CHANGELOG_SEGMENT_BYTES = 64 * 1024 * 1024
# Clean once a quarter of the log is superseded records or expired tombstones: the changelog stays
# within about 4/3 of its live records (Kafka's default 0.5 lets it reach twice).
CHANGELOG_DIRTY_RATIO = "0.25"
# How long a tombstone outlives its cleaning: a store that resumes from an older changelog offset (a
# processor's data dir left behind while its partitions ran elsewhere) must still read the purge.
CHANGELOG_TOMBSTONE_MS = 7 * DAY_MS


class Bound(Enum):
    """Which side of dp's value a topic may be on without drifting."""

    EQUAL = "not"
    AT_LEAST = "below"  # a floor: less loses data or refuses records dp writes; more only costs disk
    AT_MOST = "above"  # a ceiling: more lets the topic grow past the bound dp promises


@dataclass(frozen=True)
class Setting:
    """One topic setting dp creates, and which actual values still count as it."""

    value: str
    bound: Bound = Bound.EQUAL


def kept_for(milliseconds: int, bound: Bound = Bound.AT_LEAST) -> dict[str, Setting]:
    """Time retention: records are deleted once their segment is `milliseconds` old."""
    return {"cleanup.policy": Setting("delete"), "retention.ms": Setting(str(milliseconds), bound)}


BROKER_TIME = {key: Setting(value) for key, value in TIMESTAMPS.items()}
OUTPUT = {"max.message.bytes": Setting(str(MAX_MESSAGE_BYTES), Bound.AT_LEAST), **BROKER_TIME}
COMMANDS_SETTINGS = {
    "max.message.bytes": Setting(str(COMMANDS_MAX_BYTES), Bound.AT_LEAST),
    **BROKER_TIME,
    **kept_for(COMMANDS_RETENTION_MS),
}
EVENTS_SETTINGS = {**OUTPUT, **kept_for(EVENTS_RETENTION_MS)}
# The one ceiling among retentions: replies are written for every command and read at once.
REPLIES_SETTINGS = {**OUTPUT, **kept_for(REPLIES_RETENTION_MS, Bound.AT_MOST)}
DLQ_SETTINGS = {**OUTPUT, **kept_for(DLQ_RETENTION_MS)}
NOTIFICATIONS_SETTINGS = {**OUTPUT, **kept_for(NOTIFICATIONS_RETENTION_MS)}
CHANGELOG_SETTINGS = {
    **OUTPUT,
    "cleanup.policy": Setting("compact"),
    "segment.ms": Setting(str(CHANGELOG_SEGMENT_MS), Bound.AT_MOST),
    "segment.bytes": Setting(str(CHANGELOG_SEGMENT_BYTES), Bound.AT_MOST),
    "min.cleanable.dirty.ratio": Setting(CHANGELOG_DIRTY_RATIO, Bound.AT_MOST),
    "min.compaction.lag.ms": Setting("0", Bound.AT_MOST),
    "delete.retention.ms": Setting(str(CHANGELOG_TOMBSTONE_MS), Bound.AT_LEAST),
}


def partitioned(topics: Topics) -> tuple[str, str, str]:
    """The topics whose partition numbers must line up: a promise lives on the same number in each."""
    return (topics.commands, topics.events, topics.changelog)


def all_topics(topics: Topics) -> tuple[str, ...]:
    return (*partitioned(topics), topics.replies, topics.dlq, topics.notifications)


def settings_of(topics: Topics, name: str) -> dict[str, Setting]:
    """The settings dp creates topic `name` with, each with the values `dp topics check` accepts."""
    return {
        topics.commands: COMMANDS_SETTINGS,
        topics.events: EVENTS_SETTINGS,
        topics.changelog: CHANGELOG_SETTINGS,
        topics.replies: REPLIES_SETTINGS,
        topics.dlq: DLQ_SETTINGS,
        topics.notifications: NOTIFICATIONS_SETTINGS,
    }[name]


def config_of(topics: Topics, name: str) -> dict[str, str]:
    """The configuration dp creates topic `name` with."""
    return {key: setting.value for key, setting in settings_of(topics, name).items()}


def processor_needs(topics: Topics, name: str) -> tuple[str, ...]:
    """The settings of topic `name` that `dp serve` cannot run without: broker timestamps everywhere, room
    for the largest record on the topics it writes, a compacted changelog. The rest bound disk use."""
    if name == topics.commands:
        return tuple(TIMESTAMPS)
    if name == topics.changelog:
        return (*TIMESTAMPS, "max.message.bytes", "cleanup.policy")
    return (*TIMESTAMPS, "max.message.bytes")


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


async def topic_overrides(admin: Any, names: Iterable[str]) -> dict[str, dict[str, str]]:
    """The settings made on each topic itself (not inherited from the broker), which alter_configs, replacing
    a topic's whole configuration, must send again to keep."""
    resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
    return {
        resource["resource_name"]: {
            entry["config_names"]: entry["config_value"]
            for entry in resource["config_entries"]
            if entry["config_source"] == TOPIC_OVERRIDE
        }
        for response in await admin.describe_configs(resources)
        for resource in response.to_object()["resources"]
        if resource["error_code"] == 0
    }


def magnitude(value: str) -> float:
    """A numeric setting's size; -1 is Kafka's "no limit", larger than any."""
    return math.inf if value == FOREVER else float(value)


def satisfies(actual: str | None, setting: Setting) -> bool:
    """Whether a topic's `actual` value counts as dp's `setting` (a missing or non-numeric one never does)."""
    if actual is None or setting.bound is Bound.EQUAL:
        return actual == setting.value
    try:
        size = magnitude(actual)
    except ValueError:
        return False
    return size >= magnitude(setting.value) if setting.bound is Bound.AT_LEAST else size <= magnitude(setting.value)


def drifted(wanted: Mapping[str, Setting], actual: Mapping[str, str]) -> dict[str, Setting]:
    """The settings among `wanted` that a topic's `actual` configuration does not satisfy."""
    return {key: setting for key, setting in wanted.items() if not satisfies(actual.get(key), setting)}


def drift_phrases(name: str, wanted: Mapping[str, Setting], actual: Mapping[str, str]) -> list[str]:
    """One phrase per drifted setting of topic `name`: its key, actual value, and dp's bound."""
    return [
        f"{name} has {key}={actual.get(key)}, {setting.bound.value} {setting.value}"
        for key, setting in drifted(wanted, actual).items()
    ]


def wanted_of(topics: Topics, name: str, *, every: bool) -> dict[str, Setting]:
    """Every setting dp creates topic `name` with, or (not `every`) only those the processor needs."""
    settings = settings_of(topics, name)
    return settings if every else {key: settings[key] for key in processor_needs(topics, name)}


async def check_configs(kafka: Kafka, topics: Topics, *, every: bool = False) -> None:
    """TopicsProblem unless the existing topics are configured as the processor needs (`dp serve`), or, with
    `every`, as `dp topics create` makes them within each setting's bound. Missing topics are check_topics'
    to report. The sentence names each drifted setting and the command that fixes them all."""
    names = all_topics(topics)
    wanted = {name: wanted_of(topics, name, every=every) for name in names}
    async with clients.started(kafka, clients.admin(kafka)) as admin:
        actual = await topic_configs(admin, names, {key for settings in wanted.values() for key in settings})
    problems = [problem for name, config in actual.items() for problem in drift_phrases(name, wanted[name], config)]
    if problems:
        raise TopicsProblem(
            f"topic configuration differs from dp's ({'; '.join(problems)}): set dp's values with "
            "`dp topics create --update-configs`, which changes only what `dp topics check` names."
        )


async def update_configs(kafka: Kafka, topics: Topics) -> list[str]:
    """Set each drifted setting of the existing topics to dp's value, keeping every other setting made on
    the topic; returns the changes as `topic key=value`. A value within its bound (a longer retention kept
    on purpose) is left alone."""
    names = all_topics(topics)
    async with clients.started(kafka, clients.admin(kafka)) as admin:
        keys = {key for name in names for key in settings_of(topics, name)}
        actual = await topic_configs(admin, names, keys)
        changes = {
            name: {key: setting.value for key, setting in drifted(settings_of(topics, name), config).items()}
            for name, config in actual.items()
        }
        changes = {name: changed for name, changed in changes.items() if changed}
        if not changes:
            return []
        kept = await topic_overrides(admin, changes)
        resources = [
            ConfigResource(ConfigResourceType.TOPIC, name, {**kept.get(name, {}), **changed})
            for name, changed in changes.items()
        ]
        _raise_refusals(await admin.alter_configs(resources))
    return [f"{name} {key}={value}" for name, changed in changes.items() for key, value in changed.items()]


def _raise_refusals(responses: Iterable[Any]) -> None:
    refused = [
        f"{resource['resource_name']}: {resource['error_message'] or resource['error_code']}"
        for response in responses
        for resource in response.to_object()["resources"]
        if resource["error_code"] != 0
    ]
    if refused:
        raise TopicsProblem(
            f"Kafka refused to change the topic configuration ({'; '.join(refused)}); check the broker's "
            "permissions (AlterConfigs on the topics) and the values it accepts."
        )
