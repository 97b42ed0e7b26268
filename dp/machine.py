"""The durable promise state machine (SPEC.md): pure, no I/O, no clock, one call per command.

`transition(promise, command, now)` returns an `Outcome`: the reply status, the record after the
command and the events to emit. The caller (the processor) persists `outcome.promise` and emits
`outcome.events` exactly when `outcome.events` is non-empty (equivalently `outcome.event is not None`):
an outcome with no events changed nothing.

Time (rule 5) is applied lazily before every command, and actively by `expire`. Both go through
`_time_out`, so a promise times out the same way whichever path sees it first. Two cases yield a
changed record although the command itself changes nothing or is refused:

* A pending promise past its timeout is first timed out (REJECTED_TIMEDOUT, or RESOLVED for a timer
  promise), then the command is judged against the timed-out record (rules 3/4, or `found` for a
  get). The outcome carries that command's status (e.g. `already_timedout`, `deduplicated`), the
  timed-out record and one `timedout` event stamped with the command's requestId. The record must be
  persisted even though the reply is a refusal.
* A create whose own timeout is already past (`timeout <= now`) creates the promise and times it out
  at once: status `created`, the timed-out record, and two events in order, `created` (with the
  pending record) then `timedout`. `Outcome.event` is the last event; emit all of `Outcome.events`.
"""

from __future__ import annotations

from typing import Final

import msgspec

from dp.wire import (
    OK_STATUSES,
    RETENTION_TAG,
    Cancel,
    Completion,
    Create,
    Event,
    EventType,
    Get,
    Promise,
    PromiseCommand,
    Reject,
    Reply,
    Resolve,
    State,
    Status,
    Value,
    op_name,
    tag_retention_ms,
)

TIMER_TAG: Final = "resonate:timeout"
# The status of an `expire` outcome. Not a reply status: an active timeout answers nobody.
TIMEDOUT: Final = "timedout"

_EMPTY: Final = Value()
_NO_EVENTS: Final[tuple[Event, ...]] = ()
_COMPLETIONS: Final[dict[type[Completion], tuple[State, EventType]]] = {
    Resolve: ("RESOLVED", "resolved"),
    Reject: ("REJECTED", "rejected"),
    Cancel: ("REJECTED_CANCELED", "canceled"),
}
_ALREADY: Final[dict[State, Status]] = {
    "PENDING": "already_pending",
    "RESOLVED": "already_resolved",
    "REJECTED": "already_rejected",
    "REJECTED_CANCELED": "already_canceled",
    "REJECTED_TIMEDOUT": "already_timedout",
}


class Outcome(msgspec.Struct, frozen=True, gc=False):
    """What a command did: reply status, record after it (None if none exists), events to emit in order."""

    status: str
    promise: Promise | None = None
    events: tuple[Event, ...] = _NO_EVENTS

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES

    @property
    def event(self) -> Event | None:
        """The last (usually only) event; None when nothing changed and nothing must be persisted."""
        return self.events[-1] if self.events else None


_NOT_FOUND: Final = Outcome("not_found")


def transition(promise: Promise | None, command: PromiseCommand, now: int) -> Outcome:
    """Apply one command to the stored record (None: Init) at `now` (epoch ms)."""
    if promise is None:
        return _from_init(command, now)
    if promise.state != "PENDING":
        return Outcome(_judge_final(promise, command), promise)
    if promise.timeout > now:
        return _from_pending(promise, command, now)
    done = _time_out(promise)
    return Outcome(_judge_final(done, command), done, (Event("timedout", done, command.request_id),))


def expire(promise: Promise, now: int) -> Outcome | None:
    """The active timeout path: a pending promise due at `now` → its final record and `timedout` event."""
    if promise.state != "PENDING" or promise.timeout > now:
        return None
    done = _time_out(promise)
    return Outcome(TIMEDOUT, done, (Event("timedout", done, None),))


def retention_of(promise: Promise, default_ms: int | None) -> int | None:
    """How long a completed promise is kept: its `dp:retention` tag, else the processor's `default_ms`
    (None: forever). A tag this version cannot read (written before tags were checked) counts as absent."""
    given = promise.tags.get(RETENTION_TAG)
    if given is None:
        return default_ms
    try:
        return tag_retention_ms(given)
    except ValueError:
        return default_ms


def purge_at(promise: Promise, default_ms: int | None) -> int | None:
    """When a promise is to be purged: never while pending, else its completion plus its retention."""
    retention = retention_of(promise, default_ms)
    completed_on = promise.completed_on
    return None if retention is None or completed_on is None else completed_on + retention


def retention_over(promise: Promise, now: int, default_ms: int | None) -> bool:
    """Whether a promise is to be purged at `now` (see `purge_at`). After the purge its id is Init again:
    a get finds nothing, a create makes a new promise."""
    at = purge_at(promise, default_ms)
    return at is not None and at <= now


def reply_for(command: PromiseCommand, outcome: Outcome) -> Reply:
    """The reply to `command` given what `transition` made of it."""
    return Reply(command.request_id, op_name(command), command.id, outcome.ok, outcome.status, outcome.promise)


def _time_out(promise: Promise) -> Promise:
    """Rule 5: a due pending promise ends at its timeout, RESOLVED if it is a timer, else timed out."""
    state: State = "RESOLVED" if promise.tags.get(TIMER_TAG) == "true" else "REJECTED_TIMEDOUT"
    return msgspec.structs.replace(
        promise, state=state, value=_EMPTY, idempotency_key_for_complete=None, completed_on=promise.timeout
    )


def _from_init(command: PromiseCommand, now: int) -> Outcome:
    """Rule 1, and a create with a past timeout (created, then timed out at once)."""
    if type(command) is not Create:
        return _NOT_FOUND
    created = Promise(
        id=command.id,
        state="PENDING",
        param=command.param,
        value=_EMPTY,
        timeout=command.timeout,
        idempotency_key_for_create=command.idempotency_key,
        idempotency_key_for_complete=None,
        tags=command.tags,
        created_on=now,
        completed_on=None,
    )
    event = Event("created", created, command.request_id)
    if command.timeout > now:
        return Outcome("created", created, (event,))
    done = _time_out(created)
    return Outcome("created", done, (event, Event("timedout", done, command.request_id)))


def _from_pending(promise: Promise, command: PromiseCommand, now: int) -> Outcome:
    """Rule 2 on a promise that is not yet due."""
    if type(command) is Create:
        repeat = _matches(command.idempotency_key, promise.idempotency_key_for_create)
        return Outcome("deduplicated" if repeat else "already_pending", promise)
    if type(command) is Get:
        return Outcome("found", promise)
    state, kind = _COMPLETIONS[type(command)]
    done = msgspec.structs.replace(
        promise,
        state=state,
        value=command.value,
        idempotency_key_for_complete=command.idempotency_key,
        completed_on=now,
    )
    return Outcome(kind, done, (Event(kind, done, command.request_id),))


def _judge_final(promise: Promise, command: PromiseCommand) -> Status:
    """Rules 3 and 4 (and get → found): a completed promise never changes, only the answer varies."""
    if type(command) is Get:
        return "found"
    if type(command) is Create:
        repeat = not command.strict and _matches(command.idempotency_key, promise.idempotency_key_for_create)
    elif promise.state == "REJECTED_TIMEDOUT":
        repeat = not command.strict
    else:
        repeat = _matches(command.idempotency_key, promise.idempotency_key_for_complete) and (
            not command.strict or _COMPLETIONS[type(command)][0] == promise.state
        )
    return "deduplicated" if repeat else _ALREADY[promise.state]


def _matches(given: str | None, stored: str | None) -> bool:
    """Keys match only when both are present and equal: ⊥ matches nothing, not even ⊥."""
    return given is not None and given == stored
