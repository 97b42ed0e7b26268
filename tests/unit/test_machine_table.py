# ruff: noqa: RUF001, RUF002 -- the user's table is quoted verbatim, with its primes
"""The whole transition table of the specification, generated from the rules of SPEC.md.

Every combination of current state, stored keys, action, given key and strict (324 cases) is checked
against a small oracle written from the rules in the spec's own terms (state names, ⊥, "matches"),
deliberately shaped unlike dp.machine. A few rows are also pinned by hand, and the user's own 44-row
table (issue 3) is kept as literal cases.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from dp.machine import transition
from dp.wire import Cancel, Command, Create, Promise, Reject, Resolve, Value

NOW = 1_000_000
STORED_VALUE = Value({"stored": "yes"}, b"stored")
PARAM = Value({}, b"param")

WIRE_STATE = {
    "Pending": "PENDING",
    "Resolved": "RESOLVED",
    "Rejected": "REJECTED",
    "Canceled": "REJECTED_CANCELED",
    "Timedout": "REJECTED_TIMEDOUT",
}
ACTION_TARGET = {"Resolve": "Resolved", "Reject": "Rejected", "Cancel": "Canceled"}
ACTION_TYPE: dict[str, type[Create] | type[Resolve] | type[Reject] | type[Cancel]] = {
    "Create": Create,
    "Resolve": Resolve,
    "Reject": Reject,
    "Cancel": Cancel,
}
OK_WORD = {"Create": "created", "Resolve": "resolved", "Reject": "rejected", "Cancel": "canceled"}


@dataclass(frozen=True)
class Case:
    """One row: a symbolic state `state(ikc, iku)` and an action `action(key, strict)`."""

    state: str
    ikc: str | None
    iku: str | None
    action: str
    key: str | None
    strict: bool

    def __str__(self) -> str:
        shown = "" if self.state == "Init" else f"({_k(self.ikc)},{_k(self.iku)})"
        return f"{self.state}{shown}-{self.action}({_k(self.key)},{'T' if self.strict else 'F'})"


@dataclass(frozen=True)
class Expected:
    status: str
    state: str  # "Init" when no promise exists afterwards
    ikc: str | None
    iku: str | None
    value: Value | None  # None when no promise exists


def _k(key: str | None) -> str:
    return "_" if key is None else key  # ASCII, so that pytest ids stay readable


# ---------------------------------------------------------------------------------------------------
# Enumeration: stored keys exist only where the state has them; a given key is ⊥, the stored key or a
# different one, and where the stored key is ⊥ the first two collapse into "⊥ or some key".


def stored_keys(state: str) -> list[tuple[str | None, str | None]]:
    if state == "Init":
        return [(None, None)]
    if state in ("Pending", "Timedout"):
        return [(None, None), ("ikc", None)]
    return list(itertools.product([None, "ikc"], [None, "iku"]))


def given_keys(stored: str | None, name: str) -> list[str | None]:
    return [None, name] if stored is None else [None, stored, stored + "*"]


def all_cases() -> list[Case]:
    cases = []
    for state in ("Init", "Pending", "Resolved", "Rejected", "Canceled", "Timedout"):
        for ikc, iku in stored_keys(state):
            for action in ("Create", "Resolve", "Reject", "Cancel"):
                keys = given_keys(ikc, "ikc") if action == "Create" else given_keys(iku, "iku")
                for key, strict in itertools.product(keys, (True, False)):
                    cases.append(Case(state, ikc, iku, action, key, strict))
    return cases


CASES = all_cases()


def test_the_enumeration_yields_the_324_cases_of_the_specification() -> None:
    assert len(CASES) == 324
    assert len({str(case) for case in CASES}) == 324


# ---------------------------------------------------------------------------------------------------
# The oracle: SPEC.md rules 1-4, read literally.


def oracle(case: Case) -> Expected:
    def matches(given: str | None, stored: str | None) -> bool:
        return given is not None and stored is not None and given == stored

    unchanged_value = Value() if case.state in ("Pending", "Timedout") else STORED_VALUE
    same = Expected("", case.state, case.ikc, case.iku, unchanged_value)
    already = f"already_{case.state.lower()}"
    dedup = "deduplicated"

    if case.state == "Init":
        if case.action == "Create":
            return Expected("created", "Pending", case.key, None, Value())
        return Expected("not_found", "Init", None, None, None)

    if case.state == "Pending":
        if case.action == "Create":
            return _with(same, dedup if matches(case.key, case.ikc) else already)
        completed_value = Value({"by": case.action}, case.action.encode())
        return Expected(OK_WORD[case.action], ACTION_TARGET[case.action], case.ikc, case.key, completed_value)

    if case.action == "Create":
        return _with(same, dedup if not case.strict and matches(case.key, case.ikc) else already)
    if case.state == "Timedout":
        return _with(same, already if case.strict else dedup)
    repeat = matches(case.key, case.iku) and (not case.strict or ACTION_TARGET[case.action] == case.state)
    return _with(same, dedup if repeat else already)


def _with(expected: Expected, status: str) -> Expected:
    return Expected(status, expected.state, expected.ikc, expected.iku, expected.value)


# ---------------------------------------------------------------------------------------------------
# Running a case through dp.machine.


def stored_promise(state: str, ikc: str | None, iku: str | None) -> Promise | None:
    if state == "Init":
        return None
    completed = state != "Pending"
    return Promise(
        id="p",
        state=WIRE_STATE[state],  # type: ignore[arg-type]
        param=PARAM,
        value=STORED_VALUE if completed and state != "Timedout" else Value(),
        timeout=NOW + 60_000 if not completed else NOW - 10,
        idempotency_key_for_create=ikc,
        idempotency_key_for_complete=iku,
        tags={},
        created_on=NOW - 100,
        completed_on=NOW - 10 if completed else None,
    )


def command_for(action: str, key: str | None, strict: bool) -> Command:
    if action == "Create":
        return Create("p", idempotency_key=key, strict=strict, param=PARAM, timeout=NOW + 60_000)
    kind = ACTION_TYPE[action]
    assert kind is not Create
    return kind("p", idempotency_key=key, strict=strict, value=Value({"by": action}, action.encode()))


def observed(case: Case) -> Expected:
    before = stored_promise(case.state, case.ikc, case.iku)
    outcome = transition(before, command_for(case.action, case.key, case.strict), NOW)
    changed = outcome.status in ("created", "resolved", "rejected", "canceled")
    assert (outcome.event is not None) == changed, "an event exactly when the record changed"
    if not changed:
        assert outcome.promise is before, "a refused or repeated command leaves the record untouched"
    after = outcome.promise
    if after is None:
        return Expected(outcome.status, "Init", None, None, None)
    state = next(name for name, wire in WIRE_STATE.items() if wire == after.state)
    return Expected(
        outcome.status,
        state,
        after.idempotency_key_for_create,
        after.idempotency_key_for_complete,
        after.value,
    )


def test_every_case_of_the_specification_gives_the_rules_status_and_record() -> None:
    # One test over all cases (not 324 parametrized ones) keeps the table in milliseconds; a failure
    # still lists every wrong case.
    wrong = [
        f"{case}: expected {oracle(case)}, got {observed(case)}" for case in CASES if observed(case) != oracle(case)
    ]
    assert not wrong, "\n".join(wrong)


# A few rows pinned by hand (row numbers of the specification's table).
@pytest.mark.parametrize(
    ("case", "status", "state", "ikc", "iku"),
    [
        (Case("Init", None, None, "Resolve", "iku", False), "not_found", "Init", None, None),  # 8
        (Case("Pending", None, None, "Create", None, False), "already_pending", "Pending", None, None),  # 18
        (Case("Pending", "ikc", None, "Create", "ikc", True), "deduplicated", "Pending", "ikc", None),  # 35
        (Case("Pending", None, None, "Cancel", "iku", True), "canceled", "Canceled", None, "iku"),  # 31
        (
            Case("Resolved", None, "iku", "Resolve", "iku", True),
            "deduplicated",
            "Resolved",
            None,
            "iku",
        ),  # 73
        (
            Case("Resolved", None, "iku", "Resolve", "iku*", False),
            "already_resolved",
            "Resolved",
            None,
            "iku",
        ),  # 76
        (
            Case("Resolved", None, None, "Resolve", None, False),
            "already_resolved",
            "Resolved",
            None,
            None,
        ),  # 56
        (
            Case("Canceled", "ikc", "iku", "Create", "ikc", False),
            "deduplicated",
            "Canceled",
            "ikc",
            "iku",
        ),  # 270
        (
            Case("Canceled", "ikc", "iku", "Reject", "iku", True),
            "already_canceled",
            "Canceled",
            "ikc",
            "iku",
        ),  # 281
        (
            Case("Canceled", "ikc", "iku", "Cancel", "iku", True),
            "deduplicated",
            "Canceled",
            "ikc",
            "iku",
        ),  # 287
        (Case("Timedout", None, None, "Resolve", None, False), "deduplicated", "Timedout", None, None),  # 296
        (
            Case("Timedout", None, None, "Resolve", "iku", True),
            "already_timedout",
            "Timedout",
            None,
            None,
        ),  # 297
        (
            Case("Timedout", "ikc", None, "Create", "ikc", False),
            "deduplicated",
            "Timedout",
            "ikc",
            None,
        ),  # 310
        (
            Case("Timedout", "ikc", None, "Create", "ikc", True),
            "already_timedout",
            "Timedout",
            "ikc",
            None,
        ),  # 309
    ],
    ids=str,
)
def test_hand_checked_rows_agree_with_the_specification(
    case: Case, status: str, state: str, ikc: str | None, iku: str | None
) -> None:
    result = observed(case)
    assert (result.status, result.state, result.ikc, result.iku) == (status, state, ikc, iku)


# ---------------------------------------------------------------------------------------------------
# The user's table (issue 3), verbatim. `Rejected` after `Cancel` is REJECTED_CANCELED under the rules.

USER_TABLE = """
Init | Create(id, ikᶜ, T) | Pending(id, ikᶜ, ⊥) | OK
Init | Create(id, ikᶜ, F) | Pending(id, ikᶜ, ⊥) | OK
Pending(id, ikᶜ, ⊥) | Create(id, ikᶜ, T) | Pending(id, ikᶜ, ⊥) | OK, Deduplicated
Pending(id, ikᶜ, ⊥) | Create(id, ikᶜ, F) | Pending(id, ikᶜ, ⊥) | OK, Deduplicated
Pending(id, ikᶜ, ⊥) | Create(id, ikᶜ’, T) | Pending(id, ikᶜ, ⊥) | KO, Already Pending
Pending(id, ikᶜ, ⊥) | Create(id, ikᶜ’, F) | Pending(id, ikᶜ, ⊥) | KO, Already Pending
Pending(id, ikᶜ, ⊥) | Resolve(id, ikᵘ, T) | Resolved(id, ikᶜ, ikᵘ) | OK
Pending(id, ikᶜ, ⊥) | Resolve(id, ikᵘ, F) | Resolved(id, ikᶜ, ikᵘ) | OK
Pending(id, ikᶜ, ⊥) | Reject(id, ikᵘ, T) | Rejected(id, ikᶜ, ikᵘ) | OK
Pending(id, ikᶜ, ⊥) | Reject(id, ikᵘ, F) | Rejected(id, ikᶜ, ikᵘ) | OK
Pending(id, ikᶜ, ⊥) | Cancel(id, ikᵘ, T) | Rejected(id, ikᶜ, ikᵘ) | OK
Pending(id, ikᶜ, ⊥) | Cancel(id, ikᵘ, F) | Rejected(id, ikᶜ, ikᵘ) | OK
Resolved(id, ikᶜ, ikᵘ) | Create(id, ikᶜ, T) | Resolved(id, ikᶜ, ikᵘ) | KO, Already Resolved
Resolved(id, ikᶜ, ikᵘ) | Create(id, ikᶜ’, T) | Resolved(id, ikᶜ, ikᵘ) | KO, Already Resolved
Resolved(id, ikᶜ, ikᵘ) | Create(id, ikᶜ, F) | Resolved(id, ikᶜ, ikᵘ) | OK, Deduplicated
Resolved(id, ikᶜ, ikᵘ) | Create(id, ikᶜ’, F) | Resolved(id, ikᶜ, ikᵘ) | KO, Already Resolved
Resolved(id, ikᶜ, ikᵘ) | Resolve(id, ikᵘ, T) | Resolved(id, ikᶜ, ikᵘ) | OK, Deduplicated
Resolved(id, ikᶜ, ikᵘ) | Resolve(id, ikᵘ’, T) | Resolved(id, ikᶜ, ikᵘ) | KO, Already Resolved
Resolved(id, ikᶜ, ikᵘ) | Resolve(id, ikᵘ, F) | Resolved(id, ikᶜ, ikᵘ) | OK, Deduplicated
Resolved(id, ikᶜ, ikᵘ) | Resolve(id, ikᵘ’, F) | Resolved(id, ikᶜ, ikᵘ) | KO, Already Resolved
Resolved(id, ikᶜ, ikᵘ) | Reject(id, ikᵘ, T) | Resolved(id, ikᶜ, ikᵘ) | KO, Already Resolved
Resolved(id, ikᶜ, ikᵘ) | Reject(id, ikᵘ’, T) | Resolved(id, ikᶜ, ikᵘ) | KO, Already Resolved
Resolved(id, ikᶜ, ikᵘ) | Reject(id, ikᵘ, F) | Resolved(id, ikᶜ, ikᵘ) | OK, Deduplicated
Resolved(id, ikᶜ, ikᵘ) | Reject(id, ikᵘ’, F) | Resolved(id, ikᶜ, ikᵘ) | KO, Already Resolved
Resolved(id, ikᶜ, ikᵘ) | Cancel(id, ikᵘ, T) | Resolved(id, ikᶜ, ikᵘ) | KO, Already Resolved
Resolved(id, ikᶜ, ikᵘ) | Cancel(id, ikᵘ’, T) | Resolved(id, ikᶜ, ikᵘ) | KO, Already Resolved
Resolved(id, ikᶜ, ikᵘ) | Cancel(id, ikᵘ, F) | Resolved(id, ikᶜ, ikᵘ) | OK, Deduplicated
Resolved(id, ikᶜ, ikᵘ) | Cancel(id, ikᵘ’, F) | Resolved(id, ikᶜ, ikᵘ) | KO, Already Resolved
Rejected(id, ikᶜ, ikᵘ) | Create(id, ikᶜ, T) | Rejected(id, ikᶜ, ikᵘ) | KO, Already Rejected
Rejected(id, ikᶜ, ikᵘ) | Create(id, ikᶜ’, T) | Rejected(id, ikᶜ, ikᵘ) | KO, Already Rejected
Rejected(id, ikᶜ, ikᵘ) | Create(id, ikᶜ, F) | Rejected(id, ikᶜ, ikᵘ) | OK, Deduplicated
Rejected(id, ikᶜ, ikᵘ) | Create(id, ikᶜ’, F) | Rejected(id, ikᶜ, ikᵘ) | KO, Already Rejected
Rejected(id, ikᶜ, ikᵘ) | Resolve(id, ikᵘ, T) | Rejected(id, ikᶜ, ikᵘ) | KO, Already Rejected
Rejected(id, ikᶜ, ikᵘ) | Resolve(id, ikᵘ’, T) | Rejected(id, ikᶜ, ikᵘ) | KO, Already Rejected
Rejected(id, ikᶜ, ikᵘ) | Resolve(id, ikᵘ, F) | Rejected(id, ikᶜ, ikᵘ) | OK, Deduplicated
Rejected(id, ikᶜ, ikᵘ) | Resolve(id, ikᵘ’, F) | Rejected(id, ikᶜ, ikᵘ) | KO, Already Rejected
Rejected(id, ikᶜ, ikᵘ) | Reject(id, ikᵘ, T) | Rejected(id, ikᶜ, ikᵘ) | OK, Deduplicated
Rejected(id, ikᶜ, ikᵘ) | Reject(id, ikᵘ’, T) | Rejected(id, ikᶜ, ikᵘ) | KO, Already Rejected
Rejected(id, ikᶜ, ikᵘ) | Reject(id, ikᵘ, F) | Rejected(id, ikᶜ, ikᵘ) | OK, Deduplicated
Rejected(id, ikᶜ, ikᵘ) | Reject(id, ikᵘ’, F) | Rejected(id, ikᶜ, ikᵘ) | KO, Already Rejected
Rejected(id, ikᶜ, ikᵘ) | Cancel(id, ikᵘ, T) | Rejected(id, ikᶜ, ikᵘ) | KO, Already Rejected
Rejected(id, ikᶜ, ikᵘ) | Cancel(id, ikᵘ’, T) | Rejected(id, ikᶜ, ikᵘ) | KO, Already Rejected
Rejected(id, ikᶜ, ikᵘ) | Cancel(id, ikᵘ, F) | Rejected(id, ikᶜ, ikᵘ) | OK, Deduplicated
Rejected(id, ikᶜ, ikᵘ) | Cancel(id, ikᵘ’, F) | Rejected(id, ikᶜ, ikᵘ) | KO, Already Rejected
"""
USER_ROWS = [tuple(cell.strip() for cell in line.split("|")) for line in USER_TABLE.strip().splitlines()]
KEY_NAMES = {"⊥": None, "ikᶜ": "ikc", "ikᶜ’": "ikc'", "ikᵘ": "iku", "ikᵘ’": "iku'"}


def parse_state(text: str) -> tuple[str, str | None, str | None]:
    """`Resolved(id, ikᶜ, ikᵘ)` → ("Resolved", "ikc", "iku"); `Init` → ("Init", None, None)."""
    name, _, args = text.partition("(")
    if not args:
        return name, None, None
    _, ikc, iku = (arg.strip() for arg in args.rstrip(")").split(","))
    return name, KEY_NAMES[ikc], KEY_NAMES[iku]


def parse_action(text: str) -> tuple[str, str | None, bool]:
    """`Create(id, ikᶜ’, T)` → ("Create", "ikc'", True)."""
    name, _, args = text.partition("(")
    _, key, strict = (arg.strip() for arg in args.rstrip(")").split(","))
    return name, KEY_NAMES[key], strict == "T"


def expected_status(output: str, action: str) -> str:
    if output == "OK":
        return OK_WORD[action]
    if output == "OK, Deduplicated":
        return "deduplicated"
    return output.removeprefix("KO, Already ").lower().join(("already_", ""))


def test_the_user_table_has_its_44_rows() -> None:
    assert len(USER_ROWS) == 44


@pytest.mark.parametrize(("current", "action", "after", "output"), USER_ROWS, ids=" | ".join)
def test_each_row_of_the_user_table_holds(current: str, action: str, after: str, output: str) -> None:
    state, ikc, iku = parse_state(current)
    name, key, strict = parse_action(action)
    next_state, next_ikc, next_iku = parse_state(after)
    if name == "Cancel" and state == "Pending":
        next_state = "Canceled"  # the short table folds Canceled into Rejected
    result = observed(Case(state, ikc, iku, name, key, strict))
    assert (result.status, result.state, result.ikc, result.iku) == (
        expected_status(output, name),
        next_state,
        next_ikc,
        next_iku,
    )
