"""The verdict, from Kafka itself (read_committed), the processors' stores and a fresh restore.

The oracle is the replay (`tests/chaos/replayer.py`): each partition's committed command records, in
log order, judged against their replies; the checks here compare everything else Kafka holds with it.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from consumers.restore import restore
from consumers.store import PartitionStore
from dp.kafka import options as kafka_options
from dp.settings import Kafka, Topics
from dp.subscriptions import NONE, Subscribers
from dp.wire import (
    Command,
    Event,
    Limits,
    Promise,
    decode_event,
    decode_reply,
)
from tests.chaos.accept import classify, home_partition, recoverable_request_id, salvaged_request_id
from tests.chaos.cluster import Cluster
from tests.chaos.notifications import check_subscriptions, is_notification, latest_subscribers
from tests.chaos.purges import Purge, check_uncompacted, find_purges, kept_too_long, latest
from tests.chaos.replayer import GRACE_MS, Replayer, describe
from tests.chaos.workload import Ledger
from tests.wire_client import read_topic

COMPLETIONS = frozenset(("resolved", "rejected", "canceled", "timedout"))
SAMPLES = 5


@dataclass
class Verdict:
    """Counts of what was lost, duplicated or wrong, each with a few samples, and the figures."""

    lost: Counter[str] = field(default_factory=Counter)
    duplicated: Counter[str] = field(default_factory=Counter)
    violations: Counter[str] = field(default_factory=Counter)
    samples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    figures: list[tuple[str, object]] = field(default_factory=list)
    commands: int = 0
    replies: int = 0

    def _note(self, counter: Counter[str], kind: str, detail: str, count: int) -> None:
        counter[kind] += count
        if len(self.samples[kind]) < SAMPLES:
            self.samples[kind].append(detail)

    def lose(self, kind: str, detail: str, count: int = 1) -> None:
        self._note(self.lost, kind, detail, count)

    def duplicate(self, kind: str, detail: str, count: int = 1) -> None:
        self._note(self.duplicated, kind, detail, count)

    def violate(self, kind: str, detail: str, count: int = 1) -> None:
        self._note(self.violations, kind, detail, count)

    def figure(self, name: str, value: object) -> None:
        self.figures.append((name, value))

    def report(self) -> list[str]:
        lines = [f"  {name}: {value}" for name, value in self.figures]
        for title, counter in (("LOST", self.lost), ("DUPLICATED", self.duplicated), ("VIOLATION", self.violations)):
            for kind, count in sorted(counter.items()):
                lines.append(f"  {title} {kind}: {count}")
                lines.extend(f"      e.g. {sample}" for sample in self.samples[kind])
        return lines


@dataclass
class Logs:
    """The five topics as they are now, read_committed, with the cluster's topic partition counts."""

    commands: list[ConsumerRecord]
    replies: list[ConsumerRecord]
    events: list[ConsumerRecord]
    changelog: list[ConsumerRecord]
    dlq: list[ConsumerRecord]
    topic_sizes: dict[str, int]


async def read_logs(kafka: Kafka, topics: Topics) -> Logs:
    reads = [read_topic(kafka, name, seconds=300) for name in (topics.commands, topics.replies, topics.events,
                                                               topics.changelog, topics.dlq)]  # fmt: skip
    commands, replies, events, changelog, dlq = await asyncio.gather(*reads)
    return Logs(commands, replies, events, changelog, dlq, await topic_sizes(kafka))


async def topic_sizes(kafka: Kafka) -> dict[str, int]:
    consumer = AIOKafkaConsumer(**kafka_options(kafka))
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        cluster = consumer._client.cluster
        return {topic: len(cluster.partitions_for_topic(topic) or ()) for topic in cluster.topics()}
    finally:
        await consumer.stop()


async def overdue_pending(kafka: Kafka, topics: Topics, at_ms: int) -> list[str]:
    """Promises the changelog still shows PENDING although their timeout passed more than 2 s before `at_ms`."""
    records = latest(await read_topic(kafka, topics.changelog, seconds=300))
    return sorted(i for i, (_, p) in records.items() if p.state == "PENDING" and p.timeout + GRACE_MS <= at_ms)


@dataclass
class Context:
    """What the verifier needs besides the logs."""

    kafka: Kafka
    topics: Topics
    partitions: int
    limits: Limits
    group: str
    ledger: Ledger
    cluster: Cluster
    final_gets: set[str]
    stopped_ms: int
    broker_log: Path
    retention_ms: int | None = None
    """The processors' retention (None: they keep completed promises forever)."""


async def verify(context: Context, verdict: Verdict) -> None:
    """Every check of the issue, each adding figures and counting what is lost, duplicated or wrong."""
    logs = await read_logs(context.kafka, context.topics)
    valid, bad = split_commands(context, logs)
    replies = index_replies(logs.replies)
    dead = dead_letters(logs.dlq)
    twice = find_reapplied(verdict, context, valid, bad, replies, dead)
    check_replies(verdict, logs, valid, bad, replies, twice)
    check_ledger(verdict, context.ledger, logs.commands)
    changelog = latest(logs.changelog)
    purges = find_purges(verdict, logs.changelog, context.partitions)
    check_uncompacted(verdict, context.broker_log.parent / "logs", context.topics.changelog)
    replayed = replay(verdict, valid, replies, context, changelog, twice, purges)
    check_events(verdict, logs.events, replayed, context.partitions)
    check_final(verdict, replayed.state, changelog, context)
    kept_too_long(verdict, changelog, context.retention_ms, context.stopped_ms)
    await check_subscriptions(
        verdict, context.kafka, context.topics, logs.topic_sizes,
        (replayed.notices, replayed.subscribers, replayed.subscribes), logs.changelog, logs.dlq,
    )  # fmt: skip
    await check_stores(verdict, context, changelog, latest_subscribers(logs.changelog))
    check_hostile(verdict, bad, logs, dead, twice, replayed.refused)


# --- a known broker bug -------------------------------------------------------------------------

SKIPPED_MARKERS = re.compile(
    r"Couldn't find leader endpoint for partitions Set\(([^)]*)\) while trying to send transaction markers for "
    r"(\S+), these partitions are likely deleted"
)
# Windows of command offsets (first, last) that the processor applied twice, per partition.
Twice = dict[int, tuple[int, int]]


def broker_skipped_markers(server_log: Path) -> list[tuple[str, str]]:
    """(partitions, transactional id) of every transaction the broker completed without its markers."""
    text = server_log.read_text(errors="replace") if server_log.exists() else ""
    return [(partitions, txn) for partitions, txn in SKIPPED_MARKERS.findall(text)]


def find_reapplied(
    verdict: Verdict,
    context: Context,
    valid: Mapping[int, list[tuple[ConsumerRecord, Command]]],
    bad: list[ConsumerRecord],
    replies: Mapping[str, list[ConsumerRecord]],
    dead: Mapping[tuple[int, int], list[ConsumerRecord]],
) -> Twice:
    """Command windows applied twice after the broker dropped a committed transaction's offset commit.

    Kafka 4.4.0, restarted after kill -9 on a single node, can complete a transaction that was in
    PrepareCommit without writing its markers: its transaction coordinator finds no partition leader
    yet, logs "Couldn't find leader endpoint for partitions Set(...) ... likely deleted already and
    hence can be skipped", and writes CompleteCommit. When `__consumer_offsets` is among those
    partitions, the replies, events and changelog of that batch are committed but the consumer
    offset never is; a processor that trusts the group's committed offset applies the batch again.

    That is still a duplicate (the processor can defend itself: docs/reliability.md), and counted as
    one, but a diagnosed one: when the exact signature is there (the broker log line for a processor's
    transactional id naming `__consumer_offsets` and the partition's changelog, a contiguous window of
    records each answered or dead-lettered exactly twice, and a processor reopening the partition at
    the window's first offset), the window is replayed twice, so that every other check stays exact instead of
    failing in cascade, and the duplicates are reported under that name with the broker's words.
    """
    prefix = f"{context.group}-"  # a processor's transactional id: the group and its data dir's name
    logs = b"".join(p.log.read_bytes() for p in context.cluster.processors if p.log.exists()).decode(errors="replace")
    bad_by_partition: dict[int, list[ConsumerRecord]] = defaultdict(list)
    for record in bad:
        bad_by_partition[record.partition].append(record)
    twice: Twice = {}
    for partitions, txn in broker_skipped_markers(context.broker_log):
        if not txn.startswith(prefix) or "__consumer_offsets-" not in partitions:
            continue
        changelog = re.escape(context.topics.changelog)
        for partition in sorted({int(n) for n in re.findall(rf"{changelog}-(\d+)", partitions)}):
            counts = {r.offset: len(replies.get(c.request_id or "", [])) for r, c in valid.get(partition, [])}
            counts.update({r.offset: len(dead.get((partition, r.offset), [])) for r in bad_by_partition[partition]})
            doubled = [offset for offset, count in counts.items() if count == 2]
            if not doubled:
                continue
            first, last = min(doubled), max(doubled)
            window = [counts[offset] for offset in counts if first <= offset <= last]
            reopened = re.search(
                rf"partition {partition}: open \(restored \d+ records in [\d.]+s, commands from offset {first}\)", logs
            )
            if all(count == 2 for count in window) and reopened:
                twice[partition] = (first, last)
                verdict.duplicate(
                    "batch applied twice after the broker skipped its transaction markers",
                    f"partition {partition}, offsets {first}-{last} ({len(window)} records): broker log "
                    f"'Couldn't find leader endpoint for partitions Set({partitions}) ... for {txn} ... skipped'",
                    len(window),
                )
    return twice


def applications(
    records: list[tuple[ConsumerRecord, Command]], window: tuple[int, int] | None
) -> list[tuple[ConsumerRecord, Command]]:
    """The order in which the processor applied a partition's commands: log order, the window twice."""
    if window is None:
        return records
    first, last = window
    done = [item for item in records if item[0].offset <= last]
    again = [item for item in records if first <= item[0].offset <= last]
    return done + again + [item for item in records if item[0].offset > last]


def in_window(record: ConsumerRecord, twice: Twice) -> bool:
    window = twice.get(record.partition)
    return window is not None and window[0] <= record.offset <= window[1]


def dead_letters(dlq: list[ConsumerRecord]) -> dict[tuple[int, int], list[ConsumerRecord]]:
    """DLQ copies by the (partition, offset) of the command record they copy."""
    dead: dict[tuple[int, int], list[ConsumerRecord]] = defaultdict(list)
    for record in dlq:
        if is_notification(record):
            continue  # a notification whose target is gone: checked with the notifications
        headers = {name: value.decode() for name, value in record.headers}
        dead[(int(headers.get("dp.partition", -1)), int(headers.get("dp.offset", -1)))].append(record)
    return dead


def split_commands(
    context: Context, logs: Logs
) -> tuple[dict[int, list[tuple[ConsumerRecord, Command]]], list[ConsumerRecord]]:
    """Valid commands per partition in log order, and the records the processor must refuse."""
    valid: dict[int, list[tuple[ConsumerRecord, Command]]] = defaultdict(list)
    bad: list[ConsumerRecord] = []
    for record in logs.commands:
        verdict = classify(record.key, record.value, record.partition, context.partitions, context.limits,
                           logs.topic_sizes, context.topics.replies)  # fmt: skip
        if isinstance(verdict, str):
            bad.append(record)
        else:
            valid[record.partition].append((record, verdict))
    return valid, bad


def index_replies(replies: list[ConsumerRecord]) -> dict[str, list[ConsumerRecord]]:
    """Reply records per requestId (anonymous ones under ""), oldest first."""
    by_request: dict[str, list[ConsumerRecord]] = defaultdict(list)
    for record in sorted(replies, key=lambda r: (r.timestamp, r.partition, r.offset)):
        by_request[decode_reply(record.value).request_id or ""].append(record)
    return by_request


def check_replies(
    verdict: Verdict,
    logs: Logs,
    valid: Mapping[int, list[tuple[ConsumerRecord, Command]]],
    bad: list[ConsumerRecord],
    replies: Mapping[str, list[ConsumerRecord]],
    twice: Twice,
) -> None:
    """Each command record in the log gets exactly one reply, matched by requestId."""
    answered = {request_id: len(records) for request_id, records in replies.items()}
    expected: Counter[str] = Counter()
    for records in valid.values():
        for record, command in records:
            expected[command.request_id or ""] += 2 if in_window(record, twice) else 1
    for record in bad:
        expected[refusal_address(record, answered)] += 2 if in_window(record, twice) else 1
    for request_id, count in expected.items():
        got = answered.get(request_id, 0)
        label = request_id or "anonymous refusals"
        if got < count:
            verdict.lose("command in the log without a reply", label, count - got)
        elif got > count:
            verdict.duplicate("reply to the same request more than once", f"{label}: {got} replies", got - count)
    for request_id, count in answered.items():
        if request_id not in expected:
            verdict.violate("reply to a request that is not in the log", f"{request_id}: {count}")
    repeated = sum(
        1
        for request_id, count in Counter(c.request_id for records in valid.values() for _, c in records).items()
        if request_id and count > 1
    )
    statuses = Counter(decode_reply(r.value).status for r in logs.replies)
    verdict.commands, verdict.replies = len(logs.commands), len(logs.replies)
    verdict.figure("command records in the log", f"{len(logs.commands)} ({sum(map(len, valid.values()))} valid, "
                   f"{len(bad)} refused; {repeated} requestIds written twice by a producer)")  # fmt: skip
    verdict.figure("reply records", f"{len(logs.replies)} ({', '.join(f'{s} {n}' for s, n in statuses.most_common())})")


def refusal_address(record: ConsumerRecord, answered: Mapping[str, int]) -> str:
    """The requestId a refused record is answered under ("" for an anonymous reply).

    A valid JSON object's string requestId must be used; one salvaged from a record that is not
    valid JSON throughout may be used or not (WIRE.md: "when it can recover a requestId").
    """
    request_id = recoverable_request_id(record.value)
    if request_id:
        return request_id
    salvaged = salvaged_request_id(record.value)
    return salvaged if salvaged and answered.get(salvaged) else ""


def check_ledger(verdict: Verdict, ledger: Ledger, commands: list[ConsumerRecord]) -> None:
    """What the clients sent against what the log holds: an acknowledged send must be there, where Kafka said."""
    at: dict[tuple[int, int], str | None] = {}
    in_log: set[str] = set()
    for record in commands:
        request_id = recoverable_request_id(record.value)
        at[(record.partition, record.offset)] = request_id
        if request_id:
            in_log.add(request_id)
    unacknowledged = unresolved = 0
    for attempt in ledger.attempts.values():
        if attempt.acked and attempt.position is not None and at.get(attempt.position) != attempt.request_id:
            verdict.lose("acknowledged send missing from the log", f"{attempt.request_id} at {attempt.position}")
        elif attempt.request_id not in in_log:
            if attempt.acked is False:
                unacknowledged += 1
            else:
                unresolved += 1
                verdict.violate("send neither acknowledged nor failed, and not in the log", attempt.request_id)
    failed_in_log = sum(1 for a in ledger.failed() if a.request_id in in_log)
    verdict.figure(
        "client sends",
        f"{ledger.sent} ({ledger.retries} retries after a reply timeout or a failed send, {ledger.gave_up} gave up)",
    )
    verdict.figure(
        "requests without a reply, explained",
        f"{unacknowledged} (send failed, never acknowledged by Kafka; another {failed_in_log} failed sends did "
        "reach the log and were answered)",
    )


def replay(
    verdict: Verdict,
    valid: Mapping[int, list[tuple[ConsumerRecord, Command]]],
    replies: dict[str, list[ConsumerRecord]],
    context: Context,
    changelog: Mapping[str, tuple[int, Promise]],
    twice: Twice,
    purges: Mapping[int, list[Purge]],
) -> Replayer:
    """Replay every partition, each purge before the first command of its step; one Replayer suffices
    because a promise lives on one partition."""
    replayer = Replayer(
        verdict, {k: list(v) for k, v in replies.items()}, context.limits.max_subscriptions, context.retention_ms
    )
    for partition in sorted(set(valid) | set(purges)):
        waiting = list(reversed(purges.get(partition, [])))
        for record, command in applications(valid.get(partition, []), twice.get(partition)):
            while waiting and waiting[-1].before <= record.offset:
                replayer.purge(waiting.pop())
            replayer.apply(record, command)
        while waiting:  # steps after the partition's last valid command
            replayer.purge(waiting.pop())
    replayer.finish(context.stopped_ms, changelog)
    verdict.figure("commands replayed", replayer.judged)
    verdict.figure(
        "judged at either bound (a timeout fell between command and reply)",
        f"{replayer.ambiguous['judged']} (matched the command's time {replayer.ambiguous['low']}, "
        f"the reply's {replayer.ambiguous['high']})",
    )
    if context.retention_ms is not None or replayer.purged:
        late = sorted(replayer.lateness)
        median = late[len(late) // 2] if late else 0
        verdict.figure(
            "purges (changelog tombstones, replayed)",
            f"{replayer.purged.total()} of {len(replayer.purged)} ids (retention {context.retention_ms} ms; "
            f"step after the retention ran out: median {median} ms, max {late[-1] if late else 0} ms); "
            f"{replayer.recreated} ids created anew after a purge",
        )
    return replayer


def check_events(verdict: Verdict, events: list[ConsumerRecord], replayer: Replayer, partitions: int) -> None:
    """Per promise: a valid history, no duplicate, and exactly the events the replay produced."""
    actual: dict[str, list[Event]] = defaultdict(list)
    for record in events:
        event = decode_event(record.value)
        actual[event.promise.id].append(event)
        if record.partition != home_partition(event.promise.id.encode(), partitions):
            verdict.violate("event on the wrong partition", f"{event.promise.id} on {record.partition}")
    kinds: Counter[str] = Counter()
    for promise_id in sorted(set(actual) | set(replayer.events)):
        history = actual.get(promise_id, [])
        kinds.update(e.type for e in history)
        check_history(verdict, promise_id, history, replayer.purged[promise_id])
        expected = replayer.events.get(promise_id, [])
        if [e.type for e in history] != [e.type for e in expected]:
            verdict.violate(
                "events differ from the replay",
                f"{promise_id}: {[e.type for e in history]} vs replay {[e.type for e in expected]}",
            )
            continue
        for got, want in zip(history, expected, strict=True):
            same_request = got.request_id == want.request_id or (got.type == "timedout" and got.request_id is None)
            if got.promise != want.promise or not same_request:
                detail = (
                    f"{describe(got.promise)} rid={got.request_id} vs {describe(want.promise)} rid={want.request_id}"
                )
                verdict.violate("event record differs from the replay", f"{promise_id} {got.type}: {detail}")
    verdict.figure("events", f"{len(events)} ({', '.join(f'{k} {n}' for k, n in kinds.most_common())})")


def split_lives(history: list[Event]) -> list[list[Event]]:
    """A history cut where a `created` follows a completion: a purge frees the id, and a later create
    starts a new life (whether a purge came between is checked against the replay)."""
    lives: list[list[Event]] = [[]]
    for event in history:
        if event.type == "created" and any(e.type in COMPLETIONS for e in lives[-1]):
            lives.append([])
        lives[-1].append(event)
    return lives if history else []


def check_history(verdict: Verdict, promise_id: str, history: list[Event], purges: int = 0) -> None:
    """No event twice; each life of the id (`split_lives`: at most `purges` + 1) created first, with at most
    one completion and nothing after it."""
    types = [e.type for e in history]
    seen: set[bytes] = set()
    for event in history:
        fingerprint = repr((event.type, event.promise, event.request_id)).encode()
        if fingerprint in seen:
            verdict.duplicate("event emitted twice", f"{promise_id}: {types}")
        seen.add(fingerprint)
    lives = split_lives(history)
    if len(lives) > purges + 1:
        verdict.violate("created again without a purge", f"{promise_id}: {types}, {purges} purges")
    for life in lives:
        kinds = [e.type for e in life]
        if kinds[0] != "created":
            verdict.violate("history does not start with created", f"{promise_id}: {types}")
        completions = [i for i, t in enumerate(kinds) if t in COMPLETIONS]
        if len(completions) > 1 or kinds.count("created") > 1:
            verdict.violate("more than one creation or completion", f"{promise_id}: {types}")
        elif completions and completions[0] != len(kinds) - 1:
            verdict.violate("event after the completion", f"{promise_id}: {types}")


def check_final(
    verdict: Verdict, expected: Mapping[str, Promise], changelog: Mapping[str, tuple[int, Promise]], context: Context
) -> None:
    """Final states: the replay equals the compacted changelog; nothing is left pending past its timeout."""
    for promise_id in sorted(set(expected) | set(changelog)):
        want = expected.get(promise_id)
        partition, got = changelog.get(promise_id, (None, None))
        if got != want:
            verdict.violate("final state differs from the replay", f"{promise_id}: changelog {describe(got)}; "
                            f"replay {describe(want)}")  # fmt: skip
        if partition is not None and partition != home_partition(promise_id.encode(), context.partitions):
            verdict.violate("changelog record on the wrong partition", f"{promise_id} on {partition}")
        if got is not None and got.state == "PENDING" and got.timeout + GRACE_MS <= context.stopped_ms:
            verdict.violate("pending past its timeout plus 2 s at the end", f"{promise_id}: {describe(got)}")
    states = Counter(p.state for _, p in changelog.values())
    verdict.figure("promises", f"{len(changelog)} ({', '.join(f'{s} {n}' for s, n in states.most_common())})")


async def check_stores(
    verdict: Verdict,
    context: Context,
    changelog: Mapping[str, tuple[int, Promise]],
    subscribers: Mapping[str, Subscribers],
) -> None:
    """The compacted changelog, a fresh restore into an empty dir and the live stores agree record by record,
    subscriptions included."""
    per_partition: dict[int, dict[str, Promise]] = defaultdict(dict)
    for promise_id, (partition, promise) in changelog.items():
        per_partition[partition][promise_id] = promise
    owners = context.cluster.owners()
    scratch = Path(tempfile.mkdtemp(prefix="dp-chaos-restore-"))
    compared = 0
    try:
        for partition in range(context.partitions):
            want = per_partition.get(partition, {})
            fresh = PartitionStore(scratch / f"partition-{partition}")
            try:
                await restore(context.kafka, TopicPartition(context.topics.changelog, partition), fresh)
                compare_store(verdict, "fresh restore", partition, fresh, want, subscribers)
            finally:
                fresh.close()
            owner = owners.get(partition)
            if owner is None:
                verdict.violate("partition never opened", str(partition))
                continue
            path = owner.data_dir / context.group / f"partition-{partition}"
            if not path.exists():
                verdict.violate("live store missing", f"partition {partition}: {path}")
                continue
            live = PartitionStore(path)
            try:
                compare_store(verdict, f"live store of {owner.name}", partition, live, want, subscribers)
            finally:
                live.close()
            compared += len(want)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    verdict.figure("records compared (changelog = fresh restore = live store)", compared)


def compare_store(
    verdict: Verdict,
    what: str,
    partition: int,
    store: PartitionStore,
    want: dict[str, Promise],
    subscribers: Mapping[str, Subscribers],
) -> None:
    got = store.records()
    for promise_id in sorted(set(got) | set(want)):
        if promise_id in want and store.subscribers(promise_id) != subscribers.get(promise_id, NONE):
            verdict.violate(f"{what}: subscriptions differ from the changelog", f"partition {partition} {promise_id}")
        if got.get(promise_id) != want.get(promise_id):
            detail = f"{describe(got.get(promise_id))} vs changelog {describe(want.get(promise_id))}"
            verdict.violate(f"{what} differs from the changelog", f"partition {partition} {promise_id}: {detail}")


def check_hostile(
    verdict: Verdict,
    bad: list[ConsumerRecord],
    logs: Logs,
    dead: Mapping[tuple[int, int], list[ConsumerRecord]],
    twice: Twice,
    refused_by_rule: list[ConsumerRecord],
) -> None:
    """Each refused record: answered `invalid` when it carries a requestId, and dead-lettered once, intact;
    so too a valid subscribe the rule refused (a promise's subscriptions are at the limit)."""
    by_request = {decode_reply(r.value).request_id: decode_reply(r.value) for r in logs.replies}
    answered = Counter(request_id or "" for request_id in by_request)
    refused = set()
    for record in (*bad, *refused_by_rule):
        position = (record.partition, record.offset)
        refused.add(position)
        request_id = refusal_address(record, answered)
        reply = by_request.get(request_id) if request_id else None
        if request_id and reply is not None and reply.status != "invalid":
            verdict.violate("bad record not answered invalid", f"{request_id}: {reply.status}")
        copies = dead.get(position, [])
        allowed = 2 if in_window(record, twice) else 1
        if not copies:
            verdict.lose("bad record missing from the DLQ", f"{position}")
        elif len(copies) > allowed:
            verdict.duplicate("bad record dead-lettered twice", f"{position}", len(copies) - allowed)
        elif (copies[0].key, copies[0].value or b"") != (record.key, record.value or b""):
            verdict.violate("DLQ copy differs from the record", f"{position}")
    for position in dead:
        if position not in refused:
            verdict.violate("valid command dead-lettered", f"{position}")
    answerable = sum(1 for r in bad if refusal_address(r, answered))
    verdict.figure(
        "hostile records refused", f"{len(bad)} (DLQ records {len(logs.dlq)}, {answerable} with a requestId)"
    )
