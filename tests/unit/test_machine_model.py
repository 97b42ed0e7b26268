"""Random command sequences against an independent model of SPEC.md (hypothesis stateful testing).

A few ids and keys, random strict flags, timeouts in the past and future, timer promises, a clock that
moves and an active timeout sweep. After every step the machine's status, events and stored record must
equal the model's, and every promise that is final must have had exactly one completion event.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from dp.machine import expire, transition
from dp.wire import Cancel, Command, Create, Event, Get, Promise, Reject, Resolve, Value

START = 1_000_000
IDS = st.sampled_from(["a", "b", "c"])
KEYS = st.sampled_from([None, "k1", "k2"])
DATA = st.sampled_from([None, b"x", b"y"])
FINAL = {"Resolved", "Rejected", "Canceled", "Timedout"}


@dataclass(frozen=True)
class Rec:
    """The model's promise, in the spec's words."""

    state: str
    ikc: str | None
    iku: str | None
    timeout: int
    timer: bool
    data: bytes | None
    created: int
    completed: int | None


COMPLETIONS: dict[str, type[Resolve] | type[Reject] | type[Cancel]] = {
    "resolve": Resolve,
    "reject": Reject,
    "cancel": Cancel,
}


def same_key(a: str | None, b: str | None) -> bool:
    return None not in (a, b) and a == b


def time_passes(rec: Rec, now: int) -> tuple[Rec, list[str]]:
    """Rule 5: a pending promise whose time has come is over (Resolved if a timer, else Timedout)."""
    if rec.state != "Pending" or now < rec.timeout:
        return rec, []
    final = "Resolved" if rec.timer else "Timedout"
    return replace(rec, state=final, iku=None, data=None, completed=rec.timeout), ["timedout"]


@dataclass(frozen=True)
class Action:
    """One command in the model's terms; `timeout`/`timer` matter to a create, `data` to a completion."""

    op: str
    key: str | None = None
    strict: bool = False
    timeout: int = 0
    timer: bool = False
    data: bytes | None = None


TARGETS = {"resolve": "Resolved", "reject": "Rejected", "cancel": "Canceled"}


def model(rec: Rec | None, action: Action, now: int) -> tuple[str, Rec | None, list[str]]:
    """(status, record after, event types) for one command, from rules 1-6."""
    if rec is None:
        if action.op != "create":
            return "not_found", None, []
        rec, late = time_passes(Rec("Pending", action.key, None, action.timeout, action.timer, None, now, None), now)
        return "created", rec, ["created", *late]
    rec, events = time_passes(rec, now)
    if action.op == "get":
        return "found", rec, events
    already = "already_" + rec.state.lower()
    if rec.state == "Pending":
        if action.op == "create":
            return ("deduplicated" if same_key(action.key, rec.ikc) else already), rec, events
        target = TARGETS[action.op]
        done = replace(rec, state=target, iku=action.key, data=action.data, completed=now)
        return target.lower(), done, [target.lower()]
    if action.op == "create":
        repeat = not action.strict and same_key(action.key, rec.ikc)
    elif rec.state == "Timedout":
        repeat = not action.strict
    else:
        repeat = same_key(action.key, rec.iku) and (TARGETS[action.op] == rec.state or not action.strict)
    return ("deduplicated" if repeat else already), rec, events


WIRE_STATES = {
    "PENDING": "Pending",
    "RESOLVED": "Resolved",
    "REJECTED": "Rejected",
    "REJECTED_CANCELED": "Canceled",
    "REJECTED_TIMEDOUT": "Timedout",
}


def as_rec(promise: Promise) -> Rec:
    return Rec(
        WIRE_STATES[promise.state],
        promise.idempotency_key_for_create,
        promise.idempotency_key_for_complete,
        promise.timeout,
        promise.tags.get("resonate:timeout") == "true",
        promise.value.data,
        promise.created_on,
        promise.completed_on,
    )


class Promises(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = START
        self.store: dict[str, Promise] = {}
        self.expected: dict[str, Rec] = {}
        self.completions: dict[str, int] = {}

    def apply(self, command: Command, action: Action) -> None:
        status, rec, events = model(self.expected.get(command.id), action, self.now)
        outcome = transition(self.store.get(command.id), command, self.now)
        assert outcome.status == status
        assert [event.type for event in outcome.events] == events
        assert all(event.request_id == command.request_id for event in outcome.events)
        self.record(command.id, outcome.promise, outcome.events)
        if rec is not None:
            self.expected[command.id] = rec
        assert (None if outcome.promise is None else as_rec(outcome.promise)) == rec

    def record(self, pid: str, promise: Promise | None, events: tuple[Event, ...]) -> None:
        """What the processor does: persist and emit exactly when there are events."""
        if not events:
            assert promise is self.store.get(pid), "no events, yet the record changed"
            return
        assert promise is not None and events[-1].promise is promise
        self.store[pid] = promise
        final = {"resolved", "rejected", "canceled", "timedout"}
        self.completions[pid] = self.completions.get(pid, 0) + sum(e.type in final for e in events)

    @rule(pid=IDS, key=KEYS, strict=st.booleans(), ttl=st.integers(-3, 40), timer=st.booleans(), data=DATA)
    def create(self, pid: str, key: str | None, strict: bool, ttl: int, timer: bool, data: bytes | None) -> None:
        tags = {"resonate:timeout": "true"} if timer else {}
        command = Create(
            pid,
            request_id="r",
            idempotency_key=key,
            strict=strict,
            param=Value({}, data),
            timeout=self.now + ttl,
            tags=tags,
        )
        self.apply(command, Action("create", key, strict, timeout=self.now + ttl, timer=timer))

    @rule(
        pid=IDS,
        op=st.sampled_from(["resolve", "reject", "cancel"]),
        key=KEYS,
        strict=st.booleans(),
        data=DATA,
    )
    def complete(self, pid: str, op: str, key: str | None, strict: bool, data: bytes | None) -> None:
        kind = COMPLETIONS[op]
        command = kind(pid, request_id="r", idempotency_key=key, strict=strict, value=Value({}, data))
        self.apply(command, Action(op, key, strict, data=data))

    @rule(pid=IDS)
    def get(self, pid: str) -> None:
        self.apply(Get(pid, request_id="r"), Action("get"))

    @rule(ms=st.integers(0, 25))
    def advance(self, ms: int) -> None:
        self.now += ms

    @rule()
    def sweep(self) -> None:
        """The active timeout path over every stored promise."""
        for pid, promise in list(self.store.items()):
            outcome = expire(promise, self.now)
            rec, events = time_passes(self.expected[pid], self.now)
            observed = [event.type for event in outcome.events] if outcome else []
            assert observed == events
            if outcome is not None:
                self.record(pid, outcome.promise, outcome.events)
                assert outcome.event is not None and outcome.event.request_id is None
            self.expected[pid] = rec
            assert as_rec(self.store[pid]) == rec

    @invariant()
    def every_final_promise_has_exactly_one_completion_event(self) -> None:
        for pid, promise in self.store.items():
            final = WIRE_STATES[promise.state] in FINAL
            assert self.completions.get(pid, 0) == (1 if final else 0)


Promises.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestPromisesAgainstTheSpecModel = Promises.TestCase
