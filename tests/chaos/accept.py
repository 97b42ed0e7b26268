"""The verifier's own reading of the wire contract: which command records the processor must apply.

Written from WIRE.md rather than imported from consumers/, so that a processor that accepts or
refuses the wrong records disagrees with it. It shares only the contract's decoder (`dp.wire`),
and the partitioner is aiokafka's murmur2, the one the producers used.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import msgspec
from aiokafka.partitioner import murmur2

from dp.wire import Command, InvalidCommand, Limits, Subscribe, TopicTarget, decode_command

_GENERIC = msgspec.json.Decoder()
_REQUEST_ID = re.compile(rb'"requestId"\s*:\s*"((?:[^"\\]|\\.)*)"')


def home_partition(key: bytes, partitions: int) -> int:
    """Where Kafka's default partitioner puts `key` (WIRE.md: murmur2, positive, modulo P)."""
    return int(murmur2(key) & 0x7FFFFFFF) % partitions


def classify(
    key: bytes | None,
    value: bytes | None,
    partition: int,
    partitions: int,
    limits: Limits,
    topics: Mapping[str, int],
    default_replies: str,
) -> Command | str:
    """The command the processor must apply, or why it must refuse the record (`invalid` + DLQ)."""
    if value is None:
        return "tombstone"
    try:
        command = decode_command(value, limits)
    except InvalidCommand as problem:
        return str(problem)
    if key is None or key != command.id.encode():
        return "key is not the id"
    if home_partition(key, partitions) != partition:
        return "misrouted"
    reply_topic = command.reply_to or default_replies
    if reply_topic.startswith("__") or reply_topic in own_topics(default_replies):
        return "reply address is the deployment's own or an internal topic"
    if topics.get(reply_topic, 0) == 0:
        return "no such reply topic"
    if command.reply_partition is not None and command.reply_partition >= topics[reply_topic]:
        return "no such reply partition"
    if isinstance(command, Subscribe):
        return target_problem(command, topics, default_replies) or command
    return command


def target_problem(command: Subscribe, topics: Mapping[str, int], default_replies: str) -> str | None:
    """Why a subscription's target is refused: a topic is checked like a reply address; a webhook needs
    the deployment's notifications topic."""
    target = command.target
    if not isinstance(target, TopicTarget):
        notifications = default_replies.removesuffix(".replies") + ".notifications"
        return None if topics.get(notifications, 0) else "no notifications topic for webhooks"
    if target.topic.startswith("__") or target.topic in own_topics(default_replies):
        return "target is the deployment's own or an internal topic"
    if topics.get(target.topic, 0) == 0:
        return "no such target topic"
    if target.partition is not None and target.partition >= topics[target.topic]:
        return "no such target partition"
    return None


def own_topics(default_replies: str) -> tuple[str, ...]:
    """The deployment's topics a reply or a notification may never go to (all but the replies topic)."""
    prefix = default_replies.removesuffix(".replies")
    return tuple(f"{prefix}.{name}" for name in ("commands", "events", "changelog", "dlq", "notifications"))


def recoverable_request_id(value: bytes | None) -> str | None:
    """The requestId a refused record still carries (a JSON object with a string `requestId`)."""
    if not value:
        return None
    try:
        document: Any = _GENERIC.decode(value)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(document, dict) and isinstance(document.get("requestId"), str):
        return str(document["requestId"])
    return None


def salvaged_request_id(value: bytes | None) -> str | None:
    """A requestId a lenient reader may still find in a record that is not valid JSON throughout.

    The processor reads only the envelope fields, so a record whose `id` holds invalid UTF-8 can
    still be answered by requestId; the contract allows either that or an anonymous `invalid`.
    """
    match = _REQUEST_ID.search(value or b"")
    if match is None:
        return None
    try:
        return match.group(1).decode()
    except UnicodeDecodeError:
        return None
