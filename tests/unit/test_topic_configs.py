"""The pure side of topic settings: which actual values count as dp's, and how drift is named."""

from __future__ import annotations

import pytest

from dp.settings import Topics
from dp.topics import (
    Bound,
    Setting,
    all_topics,
    config_of,
    drift_phrases,
    drifted,
    processor_needs,
    satisfies,
    settings_of,
)

TOPICS = Topics("u")
WEEK = "604800000"


@pytest.mark.parametrize(
    ("actual", "setting", "holds"),
    [
        ("compact", Setting("compact"), True),
        ("compact,delete", Setting("compact"), False),  # would delete live promises by time
        (None, Setting("compact"), False),
        ("1209600000", Setting(WEEK, Bound.AT_LEAST), True),  # kept longer: only disk
        (WEEK, Setting(WEEK, Bound.AT_LEAST), True),
        ("86400000", Setting(WEEK, Bound.AT_LEAST), False),
        ("-1", Setting(WEEK, Bound.AT_LEAST), True),  # forever is at least anything
        ("-1", Setting("86400000", Bound.AT_MOST), False),  # and more than any ceiling
        ("3600000", Setting("86400000", Bound.AT_MOST), True),
        ("0.1", Setting("0.25", Bound.AT_MOST), True),
        ("0.5", Setting("0.25", Bound.AT_MOST), False),
        ("a week", Setting(WEEK, Bound.AT_LEAST), False),
        (None, Setting(WEEK, Bound.AT_LEAST), False),
    ],
)
def test_an_actual_value_counts_as_dps_within_its_bound(actual: str | None, setting: Setting, holds: bool) -> None:
    assert satisfies(actual, setting) is holds


def test_drift_names_topic_key_actual_value_and_dps_bound() -> None:
    wanted = {
        "cleanup.policy": Setting("compact"),
        "delete.retention.ms": Setting(WEEK, Bound.AT_LEAST),
        "segment.ms": Setting("3600000", Bound.AT_MOST),
        "retention.ms": Setting("86400000", Bound.AT_MOST),
    }
    actual = {"cleanup.policy": "delete", "delete.retention.ms": "86400000", "segment.ms": "60000"}
    assert drift_phrases("dp.x", wanted, actual) == [
        "dp.x has cleanup.policy=delete, not compact",
        f"dp.x has delete.retention.ms=86400000, below {WEEK}",
        "dp.x has retention.ms=None, above 86400000",
    ]
    assert list(drifted(wanted, {**actual, "cleanup.policy": "compact", "delete.retention.ms": WEEK})) == [
        "retention.ms"
    ]


def test_every_topic_is_created_with_what_the_processor_needs_and_its_own_retention() -> None:
    for name in all_topics(TOPICS):
        config = config_of(TOPICS, name)
        assert config["message.timestamp.type"] == "LogAppendTime"
        assert set(processor_needs(TOPICS, name)) <= set(config)
        assert drifted(settings_of(TOPICS, name), config) == {}  # dp's own values pass its check
    assert config_of(TOPICS, TOPICS.changelog)["cleanup.policy"] == "compact"
    assert "retention.ms" not in config_of(TOPICS, TOPICS.changelog)
    others = [name for name in all_topics(TOPICS) if name != TOPICS.changelog]
    assert all(config_of(TOPICS, name)["cleanup.policy"] == "delete" for name in others)
    assert "max.message.bytes" not in processor_needs(TOPICS, TOPICS.commands)  # the processor reads, never writes
