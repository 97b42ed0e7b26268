"""The linearizability checker (tests/lincheck.py) on hand-made and generated histories, no broker.

Hand-made histories pin the cases the checker exists for: legal reorderings pass, planted anomalies
fail, unanswered operations may or may not have happened, and the idempotency rules of SPEC.md decide
between deduplicated and already_*. Generated histories check the search against a brute force over
every order of a few operations, and time a history of the size the broker test records.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Sequence
from typing import Any, cast

import pytest

from tests.lincheck import (
    ALREADY,
    FILTERS,
    Kind,
    Operation,
    Rec,
    check,
    observed,
    pattern_matcher,
    selects,
    step,
)

Body = dict[str, Any]
KINDS: list[Kind] = ["create", "get", "resolve", "reject", "cancel", "search"]


def promise(
    id: str,
    state: str = "PENDING",
    param: bytes = b"",
    value: bytes = b"",
    ikc: str | None = None,
    iku: str | None = None,
    tags: dict[str, str] | None = None,
) -> Body:
    """A promise rendered as HTTP.md says: null keys, empty tags and empty data omitted."""
    body: Body = {"id": id, "state": state, "param": {}, "value": {}, "timeout": 1, "createdOn": 0}
    if param:
        body["param"]["data"] = base64.b64encode(param).decode()
    if value:
        body["value"]["data"] = base64.b64encode(value).decode()
    if ikc is not None:
        body["idempotencyKeyForCreate"] = ikc
    if iku is not None:
        body["idempotencyKeyForComplete"] = iku
    if tags:
        body["tags"] = tags
    if state != "PENDING":
        body["completedOn"] = 1
    return body


def render(rec: Rec) -> Body:
    return promise(rec.id, rec.state, rec.param, rec.value, rec.ikc, rec.iku, dict(rec.tags))


def error(code: int) -> Body:
    return {"error": {"code": code, "message": "m", "details": []}}


def page(*promises: Body) -> Body:
    return {"promises": list(promises), "cursor": None}


def op(kind: Kind, id: str, call: float, ret: float | None, status: int | None = None, body: object = None,
       client: int = 0, **inputs: Any) -> Operation:  # fmt: skip
    return Operation(client, call, ret, kind, id, status, body, **inputs)


RESOLVED_A = promise("a", "RESOLVED", value=b"v")


# --- legal histories ----------------------------------------------------------------------------


def test_a_sequential_history_passes() -> None:
    history = [
        op("get", "a", 0, 1, 404, error(40400)),
        op("resolve", "a", 2, 3, 404, error(40400), data=b"v"),
        op("create", "a", 4, 5, 201, promise("a", param=b"p"), data=b"p"),
        op("get", "a", 6, 7, 200, promise("a", param=b"p")),
        op("resolve", "a", 8, 9, 201, promise("a", "RESOLVED", b"p", b"v"), data=b"v"),
        op("reject", "a", 10, 11, 403, error(40301)),
        op("get", "a", 12, 13, 200, promise("a", "RESOLVED", b"p", b"v")),
        op("search", "*", 14, 15, 200, page(promise("a", "RESOLVED", b"p", b"v"))),
        op("search", "*", 16, 17, 200, page(), state="pending"),
    ]
    assert check(history).ok


def test_overlapping_operations_may_take_effect_in_either_order() -> None:
    history = [
        op("create", "a", 0, 1, 201, promise("a")),
        # a resolve and a reject race: the reject won, although it was called second and answered first
        op("resolve", "a", 2, 6, 403, error(40302), client=1, data=b"v"),
        op("reject", "a", 3, 4, 201, promise("a", "REJECTED", value=b"w"), client=2, data=b"w"),
        # a read overlapping the race may see either side of it
        op("get", "a", 1.5, 5, 200, promise("a"), client=3),
        op("get", "a", 4.5, 7, 200, promise("a", "REJECTED", value=b"w"), client=4),
        # a search over the race sees the promise once, in one of its states
        op("search", "*", 2.5, 3.5, 200, page(promise("a")), client=5),
        op("search", "*", 3.5, 8, 200, page(promise("a", "REJECTED", value=b"w")), client=6, state="rejected"),
    ]
    assert check(history).ok


def test_a_search_may_see_concurrent_writes_to_two_ids_in_an_order_other_than_their_calls() -> None:
    history = [
        op("create", "a", 0, 1, 201, promise("a")),
        op("create", "b", 0, 1, 201, promise("b"), client=1),
        op("resolve", "a", 2, 6, 201, RESOLVED_A, data=b"v"),
        op("resolve", "b", 3, 4, 201, promise("b", "RESOLVED", value=b"w"), client=1, data=b"w"),
        op("search", "*", 3.5, 5, 200, page(promise("a"), promise("b", "RESOLVED", value=b"w")), client=2),
    ]
    assert check(history).ok


# --- planted anomalies --------------------------------------------------------------------------


def test_a_stale_read_after_an_acknowledged_resolve_fails() -> None:
    history = [
        op("create", "a", 0, 1, 201, promise("a")),
        op("resolve", "a", 2, 3, 201, RESOLVED_A, data=b"v"),
        op("get", "a", 4, 5, 200, promise("a"), client=1),
    ]
    result = check(history)
    assert not result.ok
    assert (result.id, result.index) == ("a", 2)
    assert "PENDING" in result.reason and "RESOLVED" in result.reason


def test_two_creates_both_answered_201_for_one_id_fail() -> None:
    history = [
        op("create", "a", 0, 2, 201, promise("a", ikc="k1"), idempotency_key="k1"),
        op("create", "a", 1, 3, 201, promise("a", ikc="k2"), client=1, idempotency_key="k2"),
    ]
    result = check(history)
    assert not result.ok and result.id == "a"


def test_a_resolve_after_a_completed_cancel_fails() -> None:
    history = [
        op("create", "a", 0, 1, 201, promise("a")),
        op("cancel", "a", 2, 3, 201, promise("a", "REJECTED_CANCELED", value=b"c"), data=b"c"),
        op("resolve", "a", 4, 5, 201, RESOLVED_A, client=1, data=b"v"),
    ]
    result = check(history)
    assert not result.ok and result.index == 2


def test_a_search_that_sees_a_write_without_an_earlier_acknowledged_one_fails() -> None:
    """The cross-partition anomaly: b's resolve began after a's was acknowledged, so a search that sees
    b resolved must see a resolved too; either id alone is fine, which the per-id pass cannot see."""
    history = [
        op("create", "a", 0, 1, 201, promise("a")),
        op("create", "b", 0, 1, 201, promise("b"), client=1),
        op("search", "*", 1.5, 6, 200, page(promise("a"), promise("b", "RESOLVED", value=b"w")), client=2),
        op("resolve", "a", 2, 3, 201, RESOLVED_A, data=b"v"),
        op("resolve", "b", 4, 5, 201, promise("b", "RESOLVED", value=b"w"), client=1, data=b"w"),
    ]
    result = check(history)
    assert not result.ok and result.index == 2
    assert "searches span together" in result.reason


def test_two_searches_that_disagree_on_the_order_of_two_writes_fail() -> None:
    """Independent reads of independent writes: each search alone is fine, both together are not."""
    a, b = RESOLVED_A, promise("b", "RESOLVED", value=b"w")
    history = [
        op("create", "a", 0, 1, 201, promise("a")),
        op("create", "b", 0, 1, 201, promise("b"), client=1),
        op("resolve", "a", 2, 9, 201, a, data=b"v"),
        op("resolve", "b", 2, 9, 201, b, client=1, data=b"w"),
        op("search", "*", 3, 8, 200, page(a, promise("b")), client=2),
        op("search", "*", 3, 8, 200, page(promise("a"), b), client=3),
        op("get", "a", 4, 5, 200, promise("a"), client=4),  # both searches ended after these reads ...
        op("get", "b", 4, 5, 200, promise("b"), client=5),
        op("get", "a", 8.5, 8.8, 200, a, client=4),  # ... and began before these
        op("get", "b", 8.5, 8.8, 200, b, client=5),
    ]
    assert not check(history).ok


def test_a_search_that_misses_a_write_acknowledged_before_it_began_fails() -> None:
    history = [
        op("create", "a", 0, 1, 201, promise("a", tags={"t": "1"}), tags={"t": "1"}),
        op("search", "*", 2, 3, 200, page(), client=1, tags={"t": "1"}),
    ]
    result = check(history)
    assert not result.ok and result.index == 1


def test_a_search_that_shows_what_its_filters_exclude_fails() -> None:
    shown = page(promise("a", tags={"t": "1"}))
    created = op("create", "a", 0, 1, 201, promise("a", tags={"t": "1"}), tags={"t": "1"})
    assert check([created, op("search", "*", 2, 3, 200, shown)]).ok
    assert not check([created, op("search", "*", 2, 3, 200, shown, state="resolved")]).ok
    assert not check([created, op("search", "*", 2, 3, 200, shown, tags={"t": "2"})]).ok
    assert not check([created, op("search", "b*", 2, 3, 200, shown)]).ok


def test_a_response_that_http_md_never_gives_is_refused() -> None:
    pending_with_completed_on = {**promise("a"), "completedOn": 5}
    result = check([op("create", "a", 0, 1, 201, pending_with_completed_on)])
    assert not result.ok and "completedOn" in result.reason
    assert not check([op("create", "a", 0, 1, 500, error(50000))]).ok


# --- unanswered operations ----------------------------------------------------------------------


def test_an_unanswered_write_that_must_have_taken_effect_passes() -> None:
    history = [
        op("create", "a", 0, 1, 201, promise("a")),
        op("resolve", "a", 2, None, data=b"v"),
        op("get", "a", 9, 10, 200, RESOLVED_A, client=1),
        op("create", "b", 2, None, data=b"p", client=2),
        op("get", "b", 9, 10, 200, promise("b", param=b"p"), client=3),
    ]
    assert check(history).ok


def test_an_unanswered_write_that_must_not_have_taken_effect_passes() -> None:
    history = [
        op("create", "a", 0, 1, 201, promise("a")),
        op("resolve", "a", 2, None, data=b"v"),
        op("get", "a", 9, 10, 200, promise("a"), client=1),
        op("search", "*", 11, 12, 200, page(promise("a")), client=1),
        op("create", "b", 2, None, client=2),
        op("get", "b", 9, 10, 404, error(40400), client=3),
    ]
    assert check(history).ok


def test_an_unanswered_write_takes_effect_only_after_its_call_and_only_as_it_was_sent() -> None:
    created = op("create", "a", 0, 1, 201, promise("a"))
    too_early = [created, op("get", "a", 2, 3, 200, RESOLVED_A), op("resolve", "a", 4, None, client=1, data=b"v")]
    other_value = [created, op("resolve", "a", 2, None, data=b"x"), op("get", "a", 4, 5, 200, RESOLVED_A)]
    assert not check(too_early).ok
    assert not check(other_value).ok


def test_an_unanswered_write_may_be_seen_then_stay_seen() -> None:
    history = [
        op("create", "a", 0, 1, 201, promise("a")),
        op("resolve", "a", 2, None, data=b"v"),
        op("get", "a", 3, 4, 200, RESOLVED_A, client=1),
        op("get", "a", 5, 6, 200, promise("a"), client=1),
    ]
    assert not check(history).ok


# --- idempotency keys and strict (SPEC.md rules 2-4) -----------------------------------------------

PAST: dict[str, Any] = {"past": True}
# (what came before, the action and its inputs, the status and error code SPEC.md makes it answer)
CASES: list[tuple[str, list[tuple[Kind, dict[str, Any]]], Kind, dict[str, Any], int, int | None]] = [
    ("create on pending, same key: deduplicated", [("create", {"idempotency_key": "k"})],
     "create", {"idempotency_key": "k", "strict": True}, 200, None),
    ("create on pending, other key: already pending", [("create", {"idempotency_key": "k"})],
     "create", {"idempotency_key": "j"}, 409, 40900),
    ("create on pending, no keys: ⊥ matches nothing", [("create", {})], "create", {}, 409, 40900),
    ("create on resolved, same key, not strict", [("create", {"idempotency_key": "k"}), ("resolve", {})],
     "create", {"idempotency_key": "k"}, 200, None),
    ("create on resolved, same key, strict", [("create", {"idempotency_key": "k"}), ("resolve", {})],
     "create", {"idempotency_key": "k", "strict": True}, 409, 40900),
    ("resolve on pending, strict, any key", [("create", {})], "resolve", {"strict": True}, 201, None),
    ("resolve again, same key", [("create", {}), ("resolve", {"idempotency_key": "u"})],
     "resolve", {"idempotency_key": "u", "strict": True}, 200, None),
    ("reject after resolve, same key, not strict", [("create", {}), ("resolve", {"idempotency_key": "u"})],
     "reject", {"idempotency_key": "u"}, 200, None),
    ("reject after resolve, same key, strict", [("create", {}), ("resolve", {"idempotency_key": "u"})],
     "reject", {"idempotency_key": "u", "strict": True}, 403, ALREADY["RESOLVED"]),
    ("resolve after resolve, other key", [("create", {}), ("resolve", {"idempotency_key": "u"})],
     "resolve", {"idempotency_key": "w"}, 403, ALREADY["RESOLVED"]),
    ("cancel again, no key", [("create", {}), ("cancel", {})], "cancel", {}, 403, ALREADY["REJECTED_CANCELED"]),
    ("resolve after reject, same key", [("create", {}), ("reject", {"idempotency_key": "u"})],
     "resolve", {"idempotency_key": "u", "strict": True}, 403, ALREADY["REJECTED"]),
    ("create with a past timeout times out at once", [], "create", PAST, 201, None),
    ("resolve on timed out, not strict, any key", [("create", PAST)], "resolve", {"idempotency_key": "u"}, 200, None),
    ("cancel on timed out, strict", [("create", PAST)], "cancel", {"strict": True}, 403, ALREADY["REJECTED_TIMEDOUT"]),
    ("create on timed out, same key", [("create", {**PAST, "idempotency_key": "k"})],
     "create", {"idempotency_key": "k"}, 200, None),
    ("create on timed out, same key, strict", [("create", {**PAST, "idempotency_key": "k"})],
     "create", {"idempotency_key": "k", "strict": True}, 409, 40900),
    ("a timer times out resolved", [], "create", {**PAST, "tags": {"resonate:timeout": "true"}}, 201, None),
    ("resolve on init", [], "resolve", {}, 404, 40400),
]  # fmt: skip


def sequential(steps: Sequence[tuple[Kind, dict[str, Any]]]) -> tuple[list[Operation], Rec | None]:
    """The history of `steps` one after the other on id "a", answered as the model answers."""
    history, rec = [], None
    for n, (kind, inputs) in enumerate(steps):
        bare = op(kind, "a", 2 * n, 2 * n + 1, **inputs)
        (status, payload), rec = step(rec, bare)
        body = render(payload) if isinstance(payload, Rec) else error(cast(int, payload))
        history.append(op(kind, "a", 2 * n, 2 * n + 1, status, body, **inputs))
    return history, rec


@pytest.mark.parametrize(("before", "kind", "inputs", "status", "code"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])  # fmt: skip
def test_keys_and_strict_decide_between_deduplicated_and_already(
    before: list[tuple[Kind, dict[str, Any]]], kind: Kind, inputs: dict[str, Any], status: int, code: int | None
) -> None:
    history, rec = sequential([*before, (kind, inputs)])
    last = history[-1]
    assert (last.status, last.body if code is not None else None) == (status, error(code) if code else None)
    assert check(history).ok
    # the other answer of the same action is not linearizable
    assert rec is not None or status == 404
    other: tuple[int, object]
    if status == 200:
        assert rec is not None
        other = (409, error(40900)) if kind == "create" else (403, error(ALREADY[rec.state]))
    else:
        other = (200, last.body if status == 201 else promise("a") if rec is None else render(rec))
    flipped = Operation(**{**last.__dict__, "status": other[0], "body": other[1]})
    assert not check([*history[:-1], flipped]).ok


def test_a_timed_out_promise_renders_rejected_timedout_with_an_empty_value() -> None:
    history, rec = sequential([("create", {**PAST, "idempotency_key": "k", "data": b"p"})])
    assert rec == Rec("a", "REJECTED_TIMEDOUT", b"p", b"", "k", None, ())
    assert check(history).ok


# --- generated histories ------------------------------------------------------------------------


def simulate(clients: int, per_client: int, ids: int, searches: float, seed: int,
             unanswered: float = 0.0, skew: float = 0.0) -> list[Operation]:  # fmt: skip
    """A history as a linearizable service with `clients` closed-loop clients would give it: every op
    takes effect at a random instant of its interval (or, unanswered, maybe later, maybe never).
    `skew` moves that instant up to that many seconds outside the interval: the result may then be
    linearizable or not."""
    rng = random.Random(seed)
    names = [f"p/{n}" for n in range(ids)]
    planned: list[tuple[float, Operation]] = []
    for client in range(clients):
        now = rng.random() * 0.001
        for _ in range(per_client):
            duration = rng.expovariate(1000)
            kind = rng.choices(KINDS, [3, 3, 2, 1, 1, searches * 10 / (1 - searches)])[0]
            inputs: dict[str, Any] = {}
            if kind == "search":
                target = rng.choice(["*", "p/1*", "p/*0", "q*"])
                inputs["state"] = rng.choice([None, "pending", "resolved", "rejected"])
                inputs["tags"] = rng.choice([{}, {"t": "1"}])
            else:
                target = rng.choice(names)
                inputs["idempotency_key"] = rng.choice([None, "k1", "k2"])
                inputs["strict"] = rng.random() < 0.5
                inputs["data"] = f"{client}:{now}".encode()
            if kind == "create":
                inputs["past"] = rng.random() < 0.1
                inputs["tags"] = rng.choice([{}, {"t": "1"}])
            answered = rng.random() >= unanswered
            ret = now + duration if answered else None
            point = now + rng.random() * duration + rng.uniform(-skew, skew)
            if not answered and rng.random() < 0.5:
                point = now + duration + rng.random() if rng.random() < 0.5 else float("inf")
            planned.append((point, op(kind, target, now, ret, client=client, **inputs)))
            now += duration + rng.expovariate(10_000)
    state: dict[str, Rec | None] = dict.fromkeys(names)
    history = []
    for _, bare in sorted(planned, key=lambda item: item[0]):
        if bare.kind == "search":
            match = pattern_matcher(bare.id)
            found = [render(r) for x, r in state.items() if r is not None and match(x) and selects(bare, r)]
            status, body = 200, page(*found)
        else:
            (status, payload), state[bare.id] = step(state[bare.id], bare)
            body = render(payload) if isinstance(payload, Rec) else error(cast(int, payload))
        history.append(bare if bare.ret is None else Operation(**{**bare.__dict__, "status": status, "body": body}))
    rng.shuffle(history)
    return history


@pytest.mark.parametrize("seed", range(20))
def test_generated_linearizable_histories_pass(seed: int) -> None:
    assert check(simulate(clients=5, per_client=40, ids=4, searches=0.1, seed=seed, unanswered=0.1)).ok


def brute_force(history: list[Operation]) -> bool:
    """Linearizability by trying every order that respects real time: slow, and obviously right."""
    ops = [o for o in history if o.ret is not None or o.kind not in ("get", "search")]
    done = [False] * len(ops)

    def answer(state: dict[str, Rec | None], o: Operation) -> tuple[object, dict[str, Rec | None]]:
        if o.kind == "search":
            match = pattern_matcher(o.id)
            seen = frozenset(r for x, r in state.items() if r is not None and match(x) and selects(o, r))
            return (200, seen), state
        out, rec = step(state.get(o.id), o)
        return out, {**state, o.id: rec}

    def search(state: dict[str, Rec | None]) -> bool:
        if all(done[i] or ops[i].ret is None for i in range(len(ops))):
            return True
        for i, o in enumerate(ops):
            if done[i] or any(not done[j] and (ops[j].ret or 1e9) < o.call for j in range(len(ops))):
                continue
            out, after = answer(state, o)
            if o.ret is not None and out != observed(o):
                continue
            done[i] = True
            if search(after):
                return True
            done[i] = False
        return False

    return search({})


@pytest.mark.parametrize("chunk", range(8))
def test_the_checker_agrees_with_a_brute_force_on_small_skewed_histories(chunk: int) -> None:
    """Few clients, ids and operations, some unanswered, some taking effect outside their interval."""
    verdicts = []
    for seed in range(chunk * 100, chunk * 100 + 100):
        rng = random.Random(seed)
        history = simulate(clients=rng.randint(2, 4), per_client=rng.randint(1, 3), ids=rng.randint(1, 3),
                           searches=rng.choice([0.1, 0.3]), seed=seed, unanswered=rng.choice([0, 0.2, 0.4]),
                           skew=rng.choice([0.0005, 0.002, 0.01]))  # fmt: skip
        if len(history) <= 8:
            verdicts.append(check(history).ok)
            assert verdicts[-1] == brute_force(history), history
    assert 0 < sum(verdicts) < len(verdicts), "both verdicts should come up"


def test_a_history_of_ten_clients_by_a_thousand_ops_checks_in_seconds() -> None:
    history = simulate(clients=10, per_client=1000, ids=100, searches=0.05, seed=7)
    result = check(history)
    assert result.ok, result.reason
    assert result.seconds < 30, f"{result.seconds:.1f} s for 10,000 ops"


def test_filters_and_patterns() -> None:
    rec = Rec("order/1", "REJECTED_TIMEDOUT", b"", b"", None, None, (("t", "1"),))
    search = op("search", "order/*", 0, 1, state="rejected", tags={"t": "1"})
    assert pattern_matcher("order/*")("order/1") and pattern_matcher("*/1")("order/1")
    assert not pattern_matcher("order/*")("orders/1") and pattern_matcher("a*b*")("ab")
    assert pattern_matcher("a.b")("a.b") and not pattern_matcher("a.b")("axb")
    assert selects(search, rec)
    assert not selects(op("search", "*", 0, 1, state="resolved"), rec)
    assert not selects(op("search", "*", 0, 1, tags={"t": "2"}), rec)
    assert FILTERS["rejected"] >= {"REJECTED", "REJECTED_CANCELED", "REJECTED_TIMEDOUT"}
