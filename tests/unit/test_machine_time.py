"""Time (SPEC.md rule 5): lazy timeouts before every command, the active `expire` path, timer promises."""

from __future__ import annotations

import pytest

from dp.machine import TIMEDOUT, Outcome, expire, transition
from dp.wire import Cancel, Command, Create, Get, Promise, Reject, Resolve, Value

T0 = 1_767_225_600_000
TIMEOUT = T0 + 1_000
LATE = TIMEOUT + 5
TIMER_TAGS = {"resonate:timeout": "true"}

COMPLETIONS: dict[str, type[Resolve] | type[Reject] | type[Cancel]] = {
    "resolve": Resolve,
    "reject": Reject,
    "cancel": Cancel,
}


def pending(tags: dict[str, str] | None = None, timeout: int = TIMEOUT) -> Promise:
    created = transition(None, Create("p", idempotency_key="ikc", timeout=timeout, tags=tags or {}), T0)
    assert created.promise is not None and created.promise.state == "PENDING"
    return created.promise


def command(action: str, strict: bool, key: str | None = "ikc") -> Command:
    """A command carrying the promise's own create key (or a completion key) so only time decides."""
    if action == "create":
        return Create("p", request_id="req", idempotency_key=key, strict=strict, timeout=LATE + 1_000)
    kind = COMPLETIONS[action]
    return kind("p", request_id="req", idempotency_key="iku", strict=strict, value=Value({}, b"late"))


def assert_timed_out(outcome: Outcome, state: str = "REJECTED_TIMEDOUT") -> Promise:
    """The record changed to its final state at its timeout, and exactly one `timedout` event says so."""
    after = outcome.promise
    assert after is not None
    assert (after.state, after.completed_on, after.idempotency_key_for_complete, after.value) == (
        state,
        TIMEOUT,
        None,
        Value(),
    )
    assert after.idempotency_key_for_create == "ikc"
    assert len(outcome.events) == 1 and outcome.event is not None
    assert (outcome.event.type, outcome.event.promise) == ("timedout", after)
    return after


@pytest.mark.parametrize(
    ("action", "strict", "status"),
    [
        ("create", False, "deduplicated"),
        ("create", True, "already_timedout"),
        ("resolve", False, "deduplicated"),
        ("resolve", True, "already_timedout"),
        ("reject", False, "deduplicated"),
        ("reject", True, "already_timedout"),
        ("cancel", False, "deduplicated"),
        ("cancel", True, "already_timedout"),
    ],
)
def test_an_action_on_a_pending_promise_past_its_timeout_is_judged_as_timedout(
    action: str, strict: bool, status: str
) -> None:
    outcome = transition(pending(), command(action, strict), LATE)
    assert outcome.status == status
    assert_timed_out(outcome)
    assert outcome.event is not None and outcome.event.request_id == "req"


def test_a_create_with_another_key_past_the_timeout_is_refused_as_timedout() -> None:
    outcome = transition(pending(), command("create", False, key="other"), LATE)
    assert outcome.status == "already_timedout"
    assert_timed_out(outcome)


def test_a_refused_command_still_carries_the_timed_out_record_to_persist() -> None:
    outcome = transition(pending(), command("resolve", True), LATE)
    assert not outcome.ok
    assert outcome.event is not None and outcome.promise is outcome.event.promise


def test_get_past_the_timeout_finds_the_promise_timed_out() -> None:
    outcome = transition(pending(), Get("p", request_id="g"), LATE)
    assert outcome.status == "found"
    assert_timed_out(outcome)
    assert outcome.event is not None and outcome.event.request_id == "g"


def test_the_timeout_instant_itself_counts_as_timed_out() -> None:
    outcome = transition(pending(), command("resolve", False), TIMEOUT)
    assert outcome.status == "deduplicated"
    assert_timed_out(outcome)


def test_one_millisecond_before_the_timeout_the_promise_is_still_pending() -> None:
    outcome = transition(pending(), command("resolve", False), TIMEOUT - 1)
    assert outcome.status == "resolved"
    assert outcome.promise is not None and outcome.promise.completed_on == TIMEOUT - 1
    assert outcome.event is not None and outcome.event.type == "resolved"


def test_a_timer_promise_resolves_at_its_timeout() -> None:
    outcome = transition(pending(TIMER_TAGS), Get("p"), LATE)
    assert outcome.status == "found"
    assert_timed_out(outcome, state="RESOLVED")


@pytest.mark.parametrize(
    ("action", "strict", "status"),
    [
        ("create", False, "deduplicated"),
        ("create", True, "already_resolved"),
        ("resolve", False, "already_resolved"),  # its iku is ⊥: no completion key can match
        ("reject", True, "already_resolved"),
        ("cancel", False, "already_resolved"),
    ],
)
def test_a_timer_promise_past_its_timeout_is_judged_as_resolved(action: str, strict: bool, status: str) -> None:
    outcome = transition(pending(TIMER_TAGS), command(action, strict), LATE)
    assert outcome.status == status
    assert_timed_out(outcome, state="RESOLVED")


def test_a_completed_promise_is_not_touched_by_its_old_timeout() -> None:
    resolved = transition(pending(), command("resolve", False), T0 + 1).promise
    assert resolved is not None
    outcome = transition(resolved, Get("p"), LATE)
    assert (outcome.status, outcome.promise, outcome.events) == ("found", resolved, ())
    assert expire(resolved, LATE) is None


@pytest.mark.parametrize(
    ("timeout", "tags", "state"), [(T0 - 1, {}, "REJECTED_TIMEDOUT"), (T0, TIMER_TAGS, "RESOLVED")]
)
def test_a_create_whose_timeout_is_already_past_creates_then_times_out(
    timeout: int, tags: dict[str, str], state: str
) -> None:
    outcome = transition(None, Create("p", request_id="c", idempotency_key="k", timeout=timeout, tags=tags), T0)
    assert outcome.status == "created" and outcome.ok
    after = outcome.promise
    assert after is not None
    assert (after.state, after.created_on, after.completed_on, after.idempotency_key_for_create) == (
        state,
        T0,
        timeout,
        "k",
    )
    created, timedout = outcome.events
    assert (created.type, created.promise.state, created.request_id) == ("created", "PENDING", "c")
    assert (timedout.type, timedout.promise, timedout.request_id) == ("timedout", after, "c")
    assert outcome.event is timedout


def test_a_repeated_create_after_a_past_timeout_create_is_deduplicated() -> None:
    first = transition(None, Create("p", idempotency_key="k", timeout=T0 - 1), T0)
    again = transition(first.promise, Create("p", idempotency_key="k", timeout=T0 - 1), T0 + 1)
    assert (again.status, again.promise, again.events) == ("deduplicated", first.promise, ())


def test_expire_times_out_a_due_promise_with_an_event_and_no_request() -> None:
    outcome = expire(pending(), TIMEOUT)
    assert outcome is not None and outcome.status == TIMEDOUT
    assert_timed_out(outcome)
    assert outcome.event is not None and outcome.event.request_id is None


def test_expire_resolves_a_due_timer_promise() -> None:
    outcome = expire(pending(TIMER_TAGS), LATE)
    assert outcome is not None
    assert_timed_out(outcome, state="RESOLVED")


def test_expire_leaves_a_promise_that_is_not_due_alone() -> None:
    assert expire(pending(), TIMEOUT - 1) is None


def test_expire_and_a_lazy_timeout_produce_the_same_record() -> None:
    active = expire(pending(), LATE)
    lazy = transition(pending(), Get("p"), LATE)
    assert active is not None and active.promise == lazy.promise


def test_a_command_after_expire_sees_the_final_record_and_changes_nothing() -> None:
    active = expire(pending(), LATE)
    assert active is not None and active.promise is not None
    outcome = transition(active.promise, command("resolve", False), LATE + 1)
    assert (outcome.status, outcome.promise, outcome.events) == ("deduplicated", active.promise, ())
