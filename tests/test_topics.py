"""`dp topics create` is idempotent, refuses partition counts that disagree, and sets dp's settings, which
`dp topics check` holds the topics to and `dp topics create --update-configs` restores."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka.admin import NewTopic

from dp import kafka as clients
from dp.errors import TopicsProblem
from dp.settings import Kafka, Topics
from dp.topics import (
    all_topics,
    check_configs,
    check_topics,
    config_of,
    create_topics,
    partition_counts,
    topic_configs,
    topic_overrides,
    wait_until_ready,
)
from tests.support import TEST_PARTITIONS
from tests.test_commit_path import set_configs

DAY_MS = 86_400_000


def fresh_topics() -> Topics:
    return Topics(f"t{uuid.uuid4().hex[:10]}")


async def test_create_makes_six_topics_then_does_nothing(kafka: Kafka) -> None:
    names = fresh_topics()
    assert len(await create_topics(kafka, names, 3)) == 6
    assert await create_topics(kafka, names) == []
    assert await check_topics(kafka, names) == 3


async def test_create_sets_every_setting_on_every_topic_and_check_passes(
    kafka: Kafka, capsys: pytest.CaptureFixture[str]
) -> None:
    names = fresh_topics()
    await create_topics(kafka, names, 2)
    async with clients.started(kafka, clients.admin(kafka)) as admin:
        described = await topic_overrides(admin, all_topics(names))
    for name in all_topics(names):
        assert described[name] == config_of(names, name), name  # set on the topic, not left to broker defaults
    retention = {name: described[name].get("retention.ms") for name in all_topics(names)}
    assert retention == {
        names.commands: str(7 * DAY_MS),
        names.events: str(7 * DAY_MS),
        names.changelog: None,  # compacted, never deleted by time
        names.replies: str(DAY_MS),
        names.dlq: str(14 * DAY_MS),
        names.notifications: str(7 * DAY_MS),
    }
    assert {key: described[names.changelog][key] for key in COMPACTION} == {
        "cleanup.policy": "compact",
        "segment.ms": "3600000",
        "segment.bytes": str(64 * 1024 * 1024),
        "min.cleanable.dirty.ratio": "0.25",
        "min.compaction.lag.ms": "0",
        "delete.retention.ms": str(7 * DAY_MS),
    }
    await check_configs(kafka, names, every=True)
    assert await cli(kafka, names, "check") == 0
    assert capsys.readouterr().out.startswith(f"ok: {names.commands}")


async def test_check_names_each_drifted_setting_and_update_configs_restores_only_those(
    kafka: Kafka, capsys: pytest.CaptureFixture[str]
) -> None:
    names = fresh_topics()
    await create_topics(kafka, names, 2)
    changelog = {**config_of(names, names.changelog), "max.compaction.lag.ms": str(DAY_MS)}  # an operator's own
    await set_configs(kafka, names.changelog, **{**changelog, "delete.retention.ms": "3600000"})
    await set_configs(kafka, names.replies, **{**config_of(names, names.replies), "retention.ms": "-1"})
    await set_configs(kafka, names.events, **{**config_of(names, names.events), "retention.ms": str(30 * DAY_MS)})
    await set_configs(kafka, names.dlq, **{**config_of(names, names.dlq), "cleanup.policy": "compact"})

    await check_configs(kafka, names)  # none of it stops `dp serve`
    with pytest.raises(TopicsProblem) as drift:
        await check_configs(kafka, names, every=True)
    message = str(drift.value)
    assert f"{names.changelog} has delete.retention.ms=3600000, below {7 * DAY_MS}" in message
    assert f"{names.replies} has retention.ms=-1, above {DAY_MS}" in message
    assert f"{names.dlq} has cleanup.policy=compact, not delete" in message
    assert names.events not in message  # a longer retention of events is on the safe side
    assert message.count(" has ") == 3 and "dp topics create --update-configs" in message
    assert await cli(kafka, names, "check") == 2
    assert capsys.readouterr().err.count("\n") == 1  # one sentence

    assert await cli(kafka, names, "create", "--update-configs") == 0
    assert capsys.readouterr().out.splitlines() == [
        f"updated {names.changelog} delete.retention.ms={7 * DAY_MS}, {names.replies} retention.ms={DAY_MS}, "
        f"{names.dlq} cleanup.policy=delete"
    ]
    await check_configs(kafka, names, every=True)
    async with clients.started(kafka, clients.admin(kafka)) as admin:
        kept = await topic_configs(admin, (names.changelog, names.events), ("max.compaction.lag.ms", "retention.ms"))
    assert kept[names.changelog]["max.compaction.lag.ms"] == str(DAY_MS)
    assert kept[names.events]["retention.ms"] == str(30 * DAY_MS)
    assert await cli(kafka, names, "create", "--update-configs") == 0
    assert capsys.readouterr().out == "all topics exist; nothing to do\n"


async def test_the_processor_starts_on_topics_of_an_older_dp_that_check_reports(kafka: Kafka) -> None:
    names = fresh_topics()
    async with clients.started(kafka, clients.admin(kafka)) as admin:
        older = {name: {**config_of(names, name)} for name in all_topics(names)}
        for config in older.values():  # before retention: record sizes, broker time, a compacted changelog
            for key in ("retention.ms", *COMPACTION):
                config.pop(key, None)
        older[names.changelog]["cleanup.policy"] = "compact"
        await admin.create_topics([NewTopic(name, 2, 1, topic_configs=older[name]) for name in older])
        await wait_until_ready(admin, all_topics(names))
    await check_configs(kafka, names)
    with pytest.raises(TopicsProblem, match=f"{names.dlq} has retention.ms={7 * DAY_MS}, below {14 * DAY_MS}"):
        await check_configs(kafka, names, every=True)


async def test_create_adds_the_notifications_topic_to_a_deployment_made_before_it(kafka: Kafka) -> None:
    names = fresh_topics()
    async with clients.started(kafka, clients.admin(kafka)) as admin:
        older = tuple(name for name in all_topics(names) if name != names.notifications)
        await admin.create_topics([NewTopic(name, 2, 1) for name in older])
        await wait_until_ready(admin, older)
    assert await check_topics(kafka, names) == 2  # processors and clients of the older deployment still start
    with pytest.raises(TopicsProblem, match="notifications"):
        await check_topics(kafka, names, every=True)  # `dp topics check` names what is missing
    assert await create_topics(kafka, names) == [names.notifications]
    assert await check_topics(kafka, names) == 2


async def test_existing_topics_with_another_count_are_refused(kafka: Kafka, topics: Topics) -> None:
    with pytest.raises(TopicsProblem, match=f"already exist with {TEST_PARTITIONS} partitions"):
        await create_topics(kafka, topics, TEST_PARTITIONS + 1)


async def test_disagreeing_partition_counts_are_refused_with_a_fix(kafka: Kafka) -> None:
    names = fresh_topics()
    async with clients.started(kafka, clients.admin(kafka)) as admin:
        await admin.create_topics([NewTopic(names.commands, 2, 1), NewTopic(names.events, 3, 1)])
        await wait_until_ready(admin, (names.commands, names.events))
        assert await partition_counts(admin, (names.commands, names.events)) == {
            names.commands: 2,
            names.events: 3,
        }
    with pytest.raises(TopicsProblem, match=r"partition counts disagree.*must have the same count"):
        await create_topics(kafka, names)


async def test_check_names_missing_topics_and_the_command_that_creates_them(kafka: Kafka) -> None:
    with pytest.raises(TopicsProblem, match=r"missing topics .*dp topics create"):
        await check_topics(kafka, fresh_topics())


def test_cli_exits_2_with_one_sentence_when_no_broker_answers(capsys: pytest.CaptureFixture[str]) -> None:
    from dp.cli.main import main
    from tests.support import free_port

    assert main(["topics", "create", "--bootstrap-servers", f"127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dp: no Kafka broker answered") and "scripts/kafka start" in err
    assert "Traceback" not in err


COMPACTION = (
    "cleanup.policy",
    "segment.ms",
    "segment.bytes",
    "min.cleanable.dirty.ratio",
    "min.compaction.lag.ms",
    "delete.retention.ms",
)


async def cli(kafka: Kafka, names: Topics, action: str, *flags: str) -> int:
    """`dp topics ACTION` on the test's broker and topics; in a thread, as it runs its own event loop."""
    from dp.cli.main import main

    options = ["--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", names.prefix]
    return await asyncio.to_thread(main, ["topics", action, *options, *flags])
