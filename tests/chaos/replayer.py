"""The verdict's oracle: each partition's committed commands, in log order, judged against their replies.

Each command goes through the pure `transition` (and the subscription rule). The one thing the log
does not record is the processor's clock. The processor applied a command at some `now` between the
command record's timestamp (the producer's create time) and its reply record's timestamp, so the
replay judges each command at both bounds:

- a reply that stamps its `now` (createdOn of `created`, completedOn of `resolved`/`rejected`/
  `canceled`) must stamp it inside the window, and is judged exactly at that `now`;
- otherwise, if both bounds give the same outcome, the reply must be exactly that; if they differ
  (a timeout fell inside the window), the reply must be one of the two.

The replay then continues from the record the reply carries, so the state it holds is exact, clock
fields included, and every later comparison is plain equality. Subscriptions are replayed alongside
(`tests/chaos/notifications.py`): a subscribe that leaves its subscription waiting states its `now`
in the reply (the subscription's `createdOn`).

Purges (retention) come from the changelog (`tests/chaos/purges.py`), each with the command offset its
step starts at and the step's `now`: the replay applies it there, before that command, and judges it
(a completed record whose retention is over at that `now`); the id is Init again afterwards.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING

from aiokafka.structs import ConsumerRecord

from dp.machine import expire, retention_over
from dp.subscriptions import NONE, Subscribers
from dp.wire import Command, Event, Promise, Reply, Subscribe, decode_reply, op_name
from tests.chaos.notifications import Judged, Notice, completed, judge
from tests.chaos.purges import Purge

if TYPE_CHECKING:
    from tests.chaos.verify import Verdict

STAMPED = {"created": "created_on", "resolved": "completed_on", "rejected": "completed_on", "canceled": "completed_on"}
GRACE_MS = 2_000


class Replayer:
    """Judges every valid command of one partition in log order against its reply (see module doc)."""

    def __init__(
        self, verdict: Verdict, replies: dict[str, list[ConsumerRecord]], limit: int, retention_ms: int | None = None
    ) -> None:
        self.verdict = verdict
        self.replies = replies
        self.limit = limit
        self.retention_ms = retention_ms
        self.state: dict[str, Promise] = {}
        self.subscribers: dict[str, Subscribers] = {}
        self.events: dict[str, list[Event]] = defaultdict(list)
        self.notices: list[Notice] = []
        self.subscribes: Counter[str] = Counter()
        self.refused: list[ConsumerRecord] = []
        self.ambiguous: Counter[str] = Counter()
        self.judged = 0
        self.purged: Counter[str] = Counter()
        """Purges per id."""
        self.gone: set[str] = set()
        """Ids purged and not created since."""
        self.recreated = 0
        self.lateness: list[int] = []
        """Per purge, how long after its retention ran out its step came (ms)."""

    def apply(self, record: ConsumerRecord, command: Command) -> None:
        pending = self.replies.get(command.request_id or "")
        answer = pending.pop(0) if pending else None
        reply = decode_reply(answer.value) if answer is not None else None
        low = record.timestamp
        high = answer.timestamp if answer is not None else low
        where = f"{command.request_id} {op_name(command)} {command.id!r} at {record.partition}:{record.offset}"
        if high < low:
            self.verdict.violate("reply older than its command", where)
        prior = self.state.get(command.id)
        candidates = self.candidates(prior, command, reply, low, high, where)
        chosen = next((c for c in candidates if reply is not None and matches(reply, c, command)), None)
        if reply is not None and chosen is None:
            self.verdict.violate(
                "reply differs from the replay",
                f"{where}: got {describe_reply(reply)}; replay says "
                + " or ".join(describe_outcome(c) for c in candidates) + f" (before: {describe(prior)})",
            )  # fmt: skip
        judged = chosen or candidates[0]
        after = reply.promise if reply is not None and reply.promise is not None else judged.record
        if after is not None:
            self.state[command.id] = after
        self.subscribers[command.id] = judged.subscribers
        self.events[command.id].extend(judged.outcome.events)
        self.notices.extend(judged.notices)
        if command.id in self.gone and any(event.type == "created" for event in judged.outcome.events):
            self.gone.discard(command.id)
            self.recreated += 1
        if isinstance(command, Subscribe):
            self.count_subscribe(judged, record)
        self.judged += 1

    def count_subscribe(self, judged: Judged, record: ConsumerRecord) -> None:
        """Subscribes by status; a created one either waits for the completion or is notified at once."""
        status = judged.outcome.status
        if status == "created":
            status = "created (waiting)" if judged.waiting is not None else "created (promise completed)"
        self.subscribes[status] += 1
        if judged.refused is not None:
            self.refused.append(record)

    def candidates(
        self, prior: Promise | None, command: Command, reply: Reply | None, low: int, high: int, where: str
    ) -> list[Judged]:
        """The outcomes the processor may have produced: at the stamped `now`, else at both bounds."""
        subscribers = self.subscribers.get(command.id, NONE)
        now = stamp(reply, command)
        if now is not None:
            if not low <= now <= high:
                self.verdict.violate(
                    "stamped time outside the command's window", f"{where}: {now} not in [{low}, {high}]"
                )
            return [judge(prior, subscribers, command, now, self.limit)]
        at_low = judge(prior, subscribers, command, low, self.limit)
        at_high = judge(prior, subscribers, command, high, self.limit)
        if at_low == at_high:
            return [at_low]
        self.ambiguous["judged"] += 1
        if reply is not None:
            self.ambiguous["low" if matches(reply, at_low, command) else "high"] += 1
        return [at_low, at_high]

    def purge(self, purge: Purge) -> None:
        """A tombstone, at the start of its step: legitimate only for a completed record whose retention is
        over at the step's `now`. A pending one due by then was timed out by the processor (actively, in an
        earlier step): it is first timed out here too. Applied whatever the verdict, as the processor did."""
        where = (f"{purge.id!r} tombstone at changelog {purge.partition}:{purge.offset} (step at command offset "
                 f"{purge.before}, now {purge.now})")  # fmt: skip
        prior = self.state.get(purge.id)
        if prior is None:
            self.verdict.violate("purge of a promise the replay does not have", where)
            return
        if prior.state == "PENDING" and prior.timeout <= purge.now:
            self.time_out(purge.id, prior, purge.now)
            prior = self.state[purge.id]
        if prior.state == "PENDING":
            self.verdict.violate("purge of a pending promise", f"{where}: {describe(prior)}")
        elif not retention_over(prior, purge.now, self.retention_ms):
            self.verdict.violate(
                "purge before its retention was over", f"{where}: {describe(prior)}, retention {self.retention_ms}"
            )
        elif self.retention_ms is not None and prior.completed_on is not None:
            self.lateness.append(purge.now - prior.completed_on - self.retention_ms)
        del self.state[purge.id]
        self.subscribers.pop(purge.id, None)
        self.purged[purge.id] += 1
        self.gone.add(purge.id)

    def time_out(self, promise_id: str, promise: Promise, now: int) -> None:
        """The active timeout no command observed: its event and its notifications."""
        outcome = expire(promise, now)
        assert outcome is not None and outcome.promise is not None
        self.state[promise_id] = outcome.promise
        self.events[promise_id].extend(outcome.events)
        notices, self.subscribers[promise_id] = completed(outcome, self.subscribers.get(promise_id, NONE))
        self.notices.extend(notices)

    def finish(self, stopped_ms: int, changelog: Mapping[str, tuple[int, Promise]]) -> None:
        """Active timeouts that no later command observed: due ones must have fired by the end."""
        for promise_id, promise in list(self.state.items()):
            if promise.state != "PENDING" or promise.timeout > stopped_ms:
                continue
            if promise.timeout + GRACE_MS > stopped_ms and changelog.get(promise_id, (0, promise))[1] == promise:
                continue  # due within the grace period before the end: may still be pending
            self.time_out(promise_id, promise, stopped_ms)


def stamp(reply: Reply | None, command: Command) -> int | None:
    """The processor's `now` when the reply states it (a creation or a completion by this command, or
    a subscription that waits: its `createdOn`)."""
    if isinstance(command, Subscribe):
        waiting = reply.subscription if reply is not None and reply.status == "created" else None
        return waiting.created_on if waiting is not None else None
    if reply is None or reply.promise is None or reply.status not in STAMPED:
        return None
    value = getattr(reply.promise, STAMPED[reply.status])
    return int(value) if value is not None else None


def matches(reply: Reply, judged: Judged, command: Command) -> bool:
    if judged.refused is not None:  # refused like a malformed record: `invalid`, no op, id nor promise
        return (reply.status, reply.ok, reply.op, reply.id, reply.promise, reply.subscription) == (
            "invalid", False, None, None, None, None
        ) and reply.request_id == command.request_id and reply.error is not None  # fmt: skip
    outcome = judged.outcome
    return (
        reply.status == outcome.status
        and reply.ok == outcome.ok
        and reply.promise == outcome.promise
        and reply.subscription == judged.waiting
        and reply.op == op_name(command)
        and reply.id == command.id
        and reply.request_id == command.request_id
        and reply.error is None
    )


def describe(promise: Promise | None) -> str:
    if promise is None:
        return "none"
    return (f"{promise.state} ikc={promise.idempotency_key_for_create} iku={promise.idempotency_key_for_complete} "
            f"timeout={promise.timeout} created={promise.created_on} completed={promise.completed_on}")  # fmt: skip


def describe_reply(reply: Reply) -> str:
    waiting = f" waiting {reply.subscription.id}" if reply.subscription is not None else ""
    return f"{reply.status} [{describe(reply.promise)}]{waiting}" + (f" error={reply.error}" if reply.error else "")


def describe_outcome(judged: Judged) -> str:
    waiting = f" waiting {judged.waiting.id}" if judged.waiting is not None else ""
    return f"{judged.outcome.status} [{describe(judged.outcome.promise)}]{waiting}"
