"""The oracle for fault tests: replay the committed command log through `transition`, in log order."""

from __future__ import annotations

from collections import defaultdict

from aiokafka.structs import ConsumerRecord

from dp.machine import transition
from dp.wire import InvalidCommand, Promise, decode_command, decode_event, decode_promise


def replay(commands: list[ConsumerRecord]) -> tuple[dict[str, str], dict[str, Promise]]:
    """Status per requestId and final record per id, applying each command at its record timestamp.

    Valid for workloads whose timeouts lie far beyond the run, where the clock changes no status.
    """
    statuses: dict[str, str] = {}
    promises: dict[str, Promise] = {}
    for record in commands:
        try:
            command = decode_command(record.value)
        except InvalidCommand:
            continue
        outcome = transition(promises.get(command.id), command, record.timestamp)
        if outcome.promise is not None:
            promises[command.id] = outcome.promise
        if command.request_id is not None:
            statuses[command.request_id] = outcome.status
    return statuses, promises


def events_per_promise(events: list[ConsumerRecord]) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = defaultdict(list)
    for record in events:
        event = decode_event(record.value)
        kinds[event.promise.id].append(event.type)
    return kinds


def latest_changelog(changelog: list[ConsumerRecord]) -> dict[str, Promise]:
    """The latest promise record per id (the progress records under the empty key left out)."""
    return {record.key.decode(): decode_promise(record.value) for record in changelog if record.key}


def essence(promise: Promise) -> tuple[object, ...]:
    """What the rules decide (the clock-stamped fields left out)."""
    return (promise.state, promise.idempotency_key_for_create, promise.idempotency_key_for_complete, promise.value)
