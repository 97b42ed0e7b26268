"""`dp topics create` is idempotent and refuses partition counts that disagree."""

from __future__ import annotations

import uuid

import pytest
from aiokafka.admin import NewTopic

from dp import kafka as clients
from dp.errors import TopicsProblem
from dp.settings import Kafka, Topics
from dp.topics import all_topics, check_topics, create_topics, partition_counts, wait_until_ready
from tests.support import TEST_PARTITIONS


def fresh_topics() -> Topics:
    return Topics(f"t{uuid.uuid4().hex[:10]}")


async def test_create_makes_six_topics_then_does_nothing(kafka: Kafka) -> None:
    names = fresh_topics()
    assert len(await create_topics(kafka, names, 3)) == 6
    assert await create_topics(kafka, names) == []
    assert await check_topics(kafka, names) == 3
    async with clients.started(kafka, clients.admin(kafka)) as admin:
        configs = await admin.describe_configs([_topic_config(names.changelog)])
    entries = {entry[0]: entry[1] for entry in configs[0].resources[0][4]}
    assert entries["cleanup.policy"] == "compact"


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


def _topic_config(name: str) -> object:
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    return ConfigResource(ConfigResourceType.TOPIC, name)
