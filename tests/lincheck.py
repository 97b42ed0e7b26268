"""A linearizability checker for histories recorded against the HTTP gateway (../shared/HTTP.md).

Its sequential model of durable promises is written from SPEC.md's rules, not from dp.machine: an
oracle that shares the code under test shares its bugs. Time stays out of the model: timeouts are far
in the future (never due in a run) or past at the create (`Operation.past`: timed out at once, rule 5).

The search is Wing & Gong's as Lowe and Porcupine run it: depth first over linearization prefixes,
with a cache of (linearized set as a bitset, model state). Searches are checked as a whole:

1. Locality (Herlihy & Wing; P-compositionality, Horn & Kroening): a history is linearizable iff the
   sub-history of each group of objects that no operation spans across is. A single-promise operation
   spans one id, a search every id its pattern matches; each group of ids that searches tie together
   (with `*`, all of them) is one check whose state is all of its promises.
2. First, every id alone, each search projected onto it as a read of that id: necessary, fast, and it
   names the id and operation of a single-promise anomaly. Not sufficient (two searches may disagree on
   the order of writes to two ids, each id alone being fine), hence 1. Ids alone and then each search
   on its own was not taken: to be sound it must choose one instant per search for all ids at once,
   which is the whole problem again.

Three reductions keep a whole check fast, and none loses a linearization:
- Read-only ops go eagerly. An answered op whose status says it changed nothing (get, search, 200
  deduplicated, 403, 404, 409) is linearized as soon as it may come next and the state explains it:
  moving it forward to there breaks no real-time order (all that must precede it is linearized) and
  changes no later state. So the search branches only on state changes: at most two per promise.
- Unanswered writes go just in time. One (`ret is None`: a 504, a timeout, a crash) may take effect at
  any time after its call or never, its output unconstrained; it can be postponed past any op that does
  not see its promise, so it is tried only right before the next answered op: on that op's promise, or
  for a search on the first promise not yet as shown (writes to different ids commute).
- Dead ends show early. A promise only moves forward (Init, Pending, completed; a completion keeps id,
  param, creation key and tags), so a change that leaves an answered op yet to come with no record it
  could ever see is abandoned at once.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import itertools
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal, NamedTuple, TypeAlias, cast

Kind: TypeAlias = Literal["create", "get", "resolve", "reject", "cancel", "search"]
SearchState: TypeAlias = Literal["pending", "resolved", "rejected"]

PENDING: Final = "PENDING"
TIMEDOUT: Final = "REJECTED_TIMEDOUT"
TARGETS: Final[dict[str, str]] = {"resolve": "RESOLVED", "reject": "REJECTED", "cancel": "REJECTED_CANCELED"}
ALREADY: Final[dict[str, int]] = {"RESOLVED": 40301, "REJECTED": 40302, "REJECTED_CANCELED": 40303, TIMEDOUT: 40304}
FILTERS: Final[dict[SearchState | None, frozenset[str]]] = {
    None: frozenset((PENDING, "RESOLVED", "REJECTED", "REJECTED_CANCELED", TIMEDOUT)),
    "pending": frozenset((PENDING,)),
    "resolved": frozenset(("RESOLVED",)),
    "rejected": frozenset(("REJECTED", "REJECTED_CANCELED", TIMEDOUT)),
}
# The statuses HTTP.md answers each kind with, when the command was judged.
STATUSES: Final[dict[str, frozenset[int]]] = {
    "create": frozenset((200, 201, 409)), "get": frozenset((200, 404)), "search": frozenset((200,)),
    **dict.fromkeys(TARGETS, frozenset((200, 201, 403, 404))),
}  # fmt: skip


@dataclass(frozen=True)
class Operation:
    """One request of a history and what it got back, as a client saw it.

    `call`/`ret` are monotonic seconds around the request; `ret` is None when no answer came (504, a
    client timeout, a crash). `id` is the promise id, or the pattern of a search. Inputs: create has
    `timeout` (ms), `past` (that timeout was already due at the call), `idempotency_key`, `strict`,
    `data` and `tags`; a completion has `idempotency_key`, `strict` and `data`; a search has `state`
    and `tags`. `status` and `body` are the answer: the parsed JSON body (a rendered promise, an error,
    or a search page).
    """

    client: int
    call: float
    ret: float | None
    kind: Kind
    id: str
    status: int | None = None
    body: object = None
    timeout: int = 0
    past: bool = False
    idempotency_key: str | None = None
    strict: bool = False
    data: bytes = b""
    tags: Mapping[str, str] = field(default_factory=dict)
    state: SearchState | None = None


@dataclass(frozen=True)
class Result:
    """The verdict. On failure `op` (at `index` in the history given) is the answer that no
    linearization explains, `id` its promise id or search pattern, and `reason` says why."""

    ok: bool
    reason: str = ""
    id: str | None = None
    op: Operation | None = None
    index: int | None = None
    explored: int = 0
    seconds: float = 0.0


class Rec(NamedTuple):
    """A promise as the model holds it and as a response shows it, on what the check compares (no
    server clock: createdOn/completedOn are not compared, only that completedOn is there iff done)."""

    id: str
    state: str
    param: bytes
    value: bytes
    ikc: str | None
    iku: str | None
    tags: tuple[tuple[str, str], ...]


Payload: TypeAlias = "Rec | int | frozenset[Rec] | None"
Output: TypeAlias = tuple[int, Payload]  # (HTTP status, promise | error code | search page | nothing)


# --- the sequential model (SPEC.md) -------------------------------------------------------------


def same_key(a: str | None, b: str | None) -> bool:
    """Two keys match only when both are present and equal: ⊥ matches nothing, not even ⊥."""
    return a is not None and b is not None and a == b


def step(rec: Rec | None, op: Operation) -> tuple[Output, Rec | None]:
    """One single-promise operation on the promise `rec` (None: Init): the answer and the next record."""
    if op.kind == "get":
        return ((200, rec) if rec is not None else (404, 40400)), rec
    if op.kind == "create":
        if rec is None:  # rule 1; rule 5 for a create whose own timeout is past
            tags = tuple(sorted(op.tags.items()))
            state = PENDING
            if op.past:
                state = "RESOLVED" if op.tags.get("resonate:timeout") == "true" else TIMEDOUT
            new = Rec(op.id, state, op.data, b"", op.idempotency_key, None, tags)
            return (201, new), new
        dedup = same_key(op.idempotency_key, rec.ikc) and (rec.state == PENDING or not op.strict)  # rules 2-4
        return ((200, rec) if dedup else (409, 40900)), rec
    target = TARGETS[op.kind]
    if rec is None:
        return (404, 40400), None  # rule 1
    if rec.state == PENDING:  # rule 2
        new = rec._replace(state=target, value=op.data, iku=op.idempotency_key)
        return (201, new), new
    if rec.state == TIMEDOUT:  # rule 4
        return ((403, ALREADY[TIMEDOUT]) if op.strict else (200, rec)), rec
    dedup = same_key(op.idempotency_key, rec.iku) and (not op.strict or target == rec.state)  # rule 3
    return ((200, rec) if dedup else (403, ALREADY[rec.state])), rec


def pattern_matcher(pattern: str) -> Callable[[str], object]:
    """`*` matches any run of characters (none included); every other character matches itself."""
    return re.compile(".*".join(map(re.escape, pattern.split("*"))), re.DOTALL).fullmatch


def selects(op: Operation, rec: Rec) -> bool:
    """Whether a search's state and tag filters keep `rec` (its id already matched)."""
    return rec.state in FILTERS[op.state] and all(dict(rec.tags).get(k) == v for k, v in op.tags.items())


# --- what a response says, on the same terms ----------------------------------------------------


class Malformed(ValueError):
    """A response that HTTP.md never gives: the history is rejected before any search."""


def _data(part: object) -> bytes:
    """The `data` of a param or value, decoded (absent, null and "" are empty)."""
    if part is not None and not isinstance(part, dict):
        raise Malformed(f"param/value is {part!r}, not an object")
    raw = (part or {}).get("data")
    if raw in (None, ""):
        return b""
    try:
        return base64.b64decode(str(raw), validate=True)
    except binascii.Error:
        raise Malformed(f"data {raw!r} is not padded base64") from None


def rendered(body: object) -> Rec:
    """The promise a response body renders (HTTP.md: null keys omitted, `completedOn` iff completed)."""
    if not isinstance(body, dict) or not isinstance(body.get("id"), str) or body.get("state") not in FILTERS[None]:
        raise Malformed(f"{body!r} is not a rendered promise")
    if (body.get("completedOn") is not None) != (body["state"] != PENDING):
        raise Malformed(f"promise {body['id']!r} is {body['state']} but completedOn is {body.get('completedOn')!r}")
    tags = body.get("tags") or {}
    if not isinstance(tags, dict):
        raise Malformed(f"tags {tags!r} is not an object")
    keys = body.get("idempotencyKeyForCreate"), body.get("idempotencyKeyForComplete")
    data = _data(body.get("param")), _data(body.get("value"))
    return Rec(body["id"], body["state"], *data, *keys, tuple(sorted(tags.items())))


def observed(op: Operation) -> Output:
    """The answer of an answered operation in the model's terms; Malformed if HTTP.md never gives it."""
    status, body = op.status, op.body
    if status is None or status not in STATUSES[op.kind]:
        raise Malformed(f"HTTP.md never answers a {op.kind} with {status} (record a 5xx as unanswered: ret=None)")
    if op.kind == "search":
        promises = body.get("promises") if isinstance(body, dict) else None
        if not isinstance(promises, list):
            raise Malformed(f"search page {body!r} has no promises list")
        page = frozenset(map(rendered, promises))
        if len(page) != len(promises):
            raise Malformed("a search page lists one promise twice")
        return status, page
    if status in (200, 201):
        return status, rendered(body)
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    if not isinstance(code, int):
        raise Malformed(f"error body {body!r} has no integer error.code")
    return status, code


# --- the search ---------------------------------------------------------------------------------

State: TypeAlias = tuple["Rec | None", ...]


class _Op:
    """An operation prepared for one check: its slot in that check's state and how to judge it."""

    __slots__ = ("call", "changes", "expect", "index", "op", "ret", "seen", "slot", "slots")

    def __init__(self, index: int, op: Operation, slot: int, seen: object, expect: dict[int, Rec | None] | None = None):
        """`slot` is the op's promise in the state, or -1 for a search over several; `expect` is then
        what that search shows of each promise its pattern matches, by slot (None: not shown)."""
        self.index, self.op, self.slot, self.seen = index, op, slot, seen  # seen: the answer, in the model's terms
        self.call, self.ret = op.call, math.inf if op.ret is None else op.ret
        self.changes = op.ret is None or (op.kind != "search" and op.status == 201)
        self.expect, self.slots = expect or {}, tuple(expect or ())

    def visible(self, rec: Rec | None) -> Rec | None:
        """How this search shows a promise its pattern matches (None: not at all)."""
        return rec if rec is not None and selects(self.op, rec) else None

    def answer(self, state: State) -> tuple[object, State]:
        """The model's answer here (in the terms of `seen`) and the state after."""
        op = self.op
        if op.kind != "search":
            out, new = step(state[self.slot], op)
            if new is state[self.slot]:
                return out, state
            return out, (*state[: self.slot], new, *state[self.slot + 1 :])
        if self.slot >= 0:  # projected onto one id
            return self.visible(state[self.slot]), state
        return (200, frozenset(rec for slot in self.slots if (rec := self.visible(state[slot])) is not None)), state

    def could(self, rec: Rec | None, slot: int) -> bool:
        """Whether this op, yet to come, can be explained by `rec` at `slot` or by what it may become."""
        op, seen = self.op, self.seen
        if op.kind == "search":
            shown = seen if self.slot >= 0 else self.expect.get(slot)
            if isinstance(shown, Rec):
                return _becomes(rec, shown)
            if rec is None or self.visible(rec) is None:
                return True
            return rec.state == PENDING and op.state is not None  # a filter that its completion may leave
        status, payload = cast(Output, seen)
        if status == 404 or (status == 201 and op.kind == "create"):
            return rec is None
        if status == 403:
            return rec is None or rec.state == PENDING or ALREADY[rec.state] == payload
        if not isinstance(payload, Rec):  # 409: any promise may answer it
            return True
        if status == 201:
            return rec is None or (rec.state == PENDING and _becomes(rec, payload))
        return _becomes(rec, payload)

    def wants(self, state: State) -> Iterable[int]:
        """The slots whose unanswered writes may have to come just before this op, if it is the next
        answered op to linearize: its own, or for a search the first promise it does not see as shown
        (see `_linearize`)."""
        if self.slot >= 0:
            return (self.slot,)
        return next(([slot] for slot, rec in self.expect.items() if self.visible(state[slot]) != rec), [])


def _becomes(rec: Rec | None, want: Rec) -> bool:
    """Whether the promise `rec` (None: Init) is `want` or may become it: a promise moves only forward,
    Init to Pending to completed, and its completion keeps its id, param, creation key and tags."""
    if rec is None or rec == want:
        return True
    same = (rec.id, rec.param, rec.ikc, rec.tags) == (want.id, want.param, want.ikc, want.tags)
    return rec.state == PENDING and want.state != PENDING and same


@dataclass
class _Frame:
    """A configuration of the search after its read-only closure: what is linearized (`done`, with every
    answered op before `first`), the state, the state changes left to try, and the op that must come
    soonest (blamed if nothing works)."""

    done: int
    state: State
    first: int
    options: list[int]
    blocked: _Op


class _Stuck(NamedTuple):
    """The furthest point a failed search reached (`depth` ops before it), for the report."""

    depth: int
    op: _Op
    state: State


def _linearize(ops: list[_Op], size: int) -> tuple[_Stuck | None, int]:
    """Whether `ops` (over a state of `size` promises) linearize: None if so, else where it got stuck;
    and how many configurations were explored."""
    answered = sorted((o for o in ops if o.op.ret is not None), key=lambda o: o.call)
    writes = (o for o in ops if o.op.ret is None and o.op.kind not in ("get", "search"))
    unanswered = sorted(writes, key=lambda o: o.call)
    n = len(answered)
    calls, rets = [o.call for o in answered], [o.ret for o in answered]
    touching: list[list[int]] = [[] for _ in range(size)]
    for i, o in enumerate(answered):
        for slot in o.slots if o.slot < 0 else (o.slot,):
            touching[slot].append(i)

    def doomed(done: int, state: State, first: int, slot: int) -> _Op | None:
        """An answered op yet to come that can no longer be explained, now that `slot` changed."""
        rec, later = state[slot], touching[slot]
        for i in itertools.islice(later, bisect.bisect_left(later, first), None):
            if not done >> i & 1 and not answered[i].could(rec, slot):
                return answered[i]
        return None

    def closure(done: int, state: State, first: int) -> _Frame | None:
        """Linearize every read-only op that may come next and fits (the state does not change), then
        list the state changes that may come next; None once every answered op is linearized."""
        refused: set[int] = set()
        while True:
            while first < n and done >> first & 1:
                first += 1
            if first == n:
                return None
            # The window: ops that may come next, their call before the return of every op not linearized
            # (calls ascend, so no later op can return before an earlier op of the window was called).
            bound, window, i = math.inf, [], first
            while i < n and calls[i] <= bound:
                if not done >> i & 1:
                    window.append(i)
                    bound = min(bound, rets[i])
                i += 1
            progressed = False
            for i in window:
                o = answered[i]
                if o.changes or i in refused:
                    continue
                if o.answer(state)[0] == o.seen:
                    done |= 1 << i
                    progressed = True
                else:
                    refused.add(i)
            if not progressed:
                break
        options = [i for i in sorted(window, key=rets.__getitem__) if answered[i].changes]
        wanted = {slot for i in window for slot in answered[i].wants(state)}
        for j, o in enumerate(unanswered):
            if o.call > bound:
                break
            if o.slot in wanted and not done >> (n + j) & 1 and step(state[o.slot], o.op)[1] is not state[o.slot]:
                options.append(n + j)
        blocked = answered[min(window, key=rets.__getitem__)]
        return _Frame(done, state, first, options, blocked)

    frame = closure(0, (None,) * size, 0)
    if frame is None:
        return None, 1
    stack, cache, stuck = [frame], {(frame.done, frame.state)}, _Stuck(frame.first, frame.blocked, frame.state)
    while stack:
        frame = stack[-1]
        if not frame.options:
            stack.pop()
            continue
        bit = frame.options.pop(0)
        o = answered[bit] if bit < n else unanswered[bit - n]
        out, state = o.answer(frame.state)
        done = frame.done | 1 << bit
        if (bit < n and out != o.seen) or (done, state) in cache:
            continue
        cache.add((done, state))
        if culprit := doomed(done, state, frame.first, o.slot):
            if frame.first >= stuck.depth:
                stuck = _Stuck(frame.first, culprit, state)
            continue
        after = closure(done, state, frame.first)
        if after is None:
            return None, len(cache)
        if after.options:
            stack.append(after)
        elif after.first >= stuck.depth:
            stuck = _Stuck(after.first, after.blocked, after.state)
    return stuck, len(cache)


def show(value: object) -> str:
    """An answer or a record, short enough for a failure message."""
    if isinstance(value, Rec):
        keys = f" ikc={value.ikc!r} iku={value.iku!r}" if value.ikc or value.iku else ""
        return f"{value.state} param={value.param!r} value={value.value!r}{keys}"
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], int):
        return f"{value[0]} {show(value[1])}"
    return "absent" if value is None else str(value)


def _describe(stuck: _Stuck) -> str:
    o, op = stuck.op, stuck.op.op
    when = "unanswered" if op.ret is None else f"called {op.call:.6f}, answered {op.ret:.6f}"
    seen, model = o.seen, o.answer(stuck.state)[0]
    if op.kind == "search" and o.slot < 0:  # only the promises the page and the model disagree on
        shown = {rec.id: rec for rec in cast(Output, seen)[1]}  # type: ignore[union-attr]
        known = {rec.id: rec for rec in cast(Output, model)[1]}  # type: ignore[union-attr]
        differ = sorted(x for x in shown.keys() | known.keys() if shown.get(x) != known.get(x))
        same = len(shown.keys() - set(differ))
        seen = "; ".join(f"{x} {show(shown.get(x))}" for x in differ) + f" (and {same} more as the model has them)"
        model = "; ".join(f"{x} {show(known.get(x))}" for x in differ)
    what = f"sees it {show(seen)}" if op.kind == "search" and o.slot >= 0 else f"got {show(seen)}"
    return (
        f"{op.kind} {op.id!r} by client {op.client} ({when}) {what}, which no linearization explains: "
        f"at the furthest point reached the model has {show(model)}"
    )


# --- the checker --------------------------------------------------------------------------------


def check(history: Iterable[Operation]) -> Result:
    """Whether `history` is linearizable against SPEC.md's model, with the first failure explained."""
    started = time.perf_counter()
    ops = list(history)
    outputs: dict[int, Output] = {}
    for index, op in enumerate(ops):
        if op.ret is not None:
            try:
                outputs[index] = observed(op)
            except Malformed as error:
                return Result(False, f"{op.kind} {op.id!r}: {error}", op.id, op, index)
    pages = {i: {rec.id: rec for rec in out[1]} for i, out in outputs.items() if isinstance(out[1], frozenset)}
    by_id: dict[str, list[int]] = {x: [] for page in pages.values() for x in page}  # ids only a search shows too
    for index, op in enumerate(ops):
        if op.kind != "search":
            by_id.setdefault(op.id, []).append(index)
    ids = sorted(by_id)
    matching = {i: [x for x in ids if pattern_matcher(ops[i].id)(x)] for i in pages}
    explored = 0

    def verdict(stuck: _Stuck | None, where: str) -> Result | None:
        if stuck is None:
            return None
        return Result(False, f"{where}: {_describe(stuck)}", stuck.op.op.id, stuck.op.op, stuck.op.index,
                      explored, time.perf_counter() - started)  # fmt: skip

    projections: dict[str, list[int]] = {x: [] for x in ids}  # 2. of the docstring: every id alone
    for i, names in matching.items():
        for x in names:
            projections[x].append(i)
    for x in ids:
        part = [_Op(i, ops[i], 0, outputs.get(i)) for i in by_id[x]]
        part += [_Op(i, ops[i], 0, pages[i].get(x)) for i in projections[x]]
        stuck, count = _linearize(part, 1)
        explored += count
        if failure := verdict(stuck, f"promise {x!r}"):
            return failure

    for group, found in _groups(matching).items():
        slot = {x: n for n, x in enumerate(group)}
        part = [_Op(i, ops[i], slot[ops[i].id], outputs.get(i)) for x in group for i in by_id[x]]  # 1.: a group
        part += [_Op(i, ops[i], -1, outputs[i], {slot[x]: pages[i].get(x) for x in matching[i]}) for i in found]
        stuck, count = _linearize(part, len(group))
        explored += count
        if failure := verdict(stuck, f"the {len(group)} promises that searches span together"):
            return failure
    return Result(True, "linearizable", explored=explored, seconds=time.perf_counter() - started)


def _groups(matching: Mapping[int, list[str]]) -> dict[tuple[str, ...], list[int]]:
    """The groups of ids that searches tie together, each with the searches over it."""
    group_of: dict[str, set[str]] = {}
    for names in matching.values():
        merged = set(names).union(*(group_of.get(x, ()) for x in names))
        group_of.update(dict.fromkeys(merged, merged))
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, names in matching.items():  # a search that matches no id is a group of none
        groups.setdefault(tuple(sorted(group_of[names[0]])) if names else (), []).append(i)
    return groups
