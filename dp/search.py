"""Search, the pure parts: what matches a query, in what order, one partition's page, the merge of every
partition's page into one, and the opaque cursor that resumes a search.

A search is answered by every partition from its own store (one `search` command per partition, with an
explicit partition and no key), newest first by `createdOn` then `id`. The client merges the pages and
confirms them with a second round (a double collect, see `Promises.search`), so that the merged page
reflects one instant across partitions. Nothing here does I/O.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
from collections.abc import Container, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Final

import msgspec

from dp.errors import DpError
from dp.machine import expire
from dp.wire import MAX_SEARCH_LIMIT, Position, Promise, PromiseId, SearchState

# How many index entries one partition looks at for one search command before it answers with what it
# has (and where to resume): a rare pattern over a large store must not stall the partition's batch.
SCAN_BUDGET: Final = 10_000
# The most promise bytes one page carries, from one partition or merged (replies are also capped by the
# reply topic's max.message.bytes): 100 promises with 512 KiB payloads become several pages.
PAGE_BYTES: Final = 4 * 1024 * 1024
# What a promise costs in a page beyond its own JSON (a comma, list framing), rounded up.
PAGE_ITEM_OVERHEAD: Final = 16

_STATES: Final[dict[SearchState, frozenset[str]]] = {
    "pending": frozenset(("PENDING",)),
    "resolved": frozenset(("RESOLVED",)),
    "rejected": frozenset(("REJECTED", "REJECTED_CANCELED", "REJECTED_TIMEDOUT")),
}


class Query(msgspec.Struct, frozen=True, gc=False):
    """What a search asks for: ids matching `pattern` (`*` is any run of characters), in `state` (every
    state when None), carrying every tag in `tags`; at most `limit` per page."""

    pattern: PromiseId
    state: SearchState | None = None
    tags: dict[str, str] = {}
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_SEARCH_LIMIT)] = MAX_SEARCH_LIMIT


@dataclass(frozen=True)
class Page:
    """One page of a search: its promises newest first, and the cursor of the next page (None: no more)."""

    promises: list[Promise]
    cursor: str | None


class BadCursor(DpError, ValueError):
    """A cursor that is malformed, or was not made by this deployment for this search."""

    def __init__(self, why: str) -> None:
        super().__init__(f"the cursor is not valid ({why}): pass a cursor exactly as a previous search returned it.")


# --- matching and order ------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """`*` matches any run of characters (none included); every other character matches itself."""
    return re.compile(".*".join(map(re.escape, pattern.split("*"))), re.DOTALL)


def literal_prefix(pattern: str) -> str:
    """The part before the first `*`: every match starts with it."""
    return pattern.split("*", 1)[0]


def as_of(promise: Promise, now: int) -> Promise:
    """The promise as a read at `now` sees it: a pending promise past its timeout is timed out, as
    `expire` makes it (a search reports it so before the partition's sweep writes it)."""
    outcome = expire(promise, now)
    return promise if outcome is None or outcome.promise is None else outcome.promise


def selects(query: Query, promise: Promise) -> bool:
    """Whether `promise` (already seen `as_of` the answer's time) is in the query's result, id aside."""
    if query.state is not None and promise.state not in _STATES[query.state]:
        return False
    return has_tags(query, promise)


def has_tags(query: Query, promise: Promise) -> bool:
    return all(promise.tags.get(name) == value for name, value in query.tags.items())


def position(promise: Promise) -> Position:
    return Position(promise.created_on, promise.id)


def rank(place: Position) -> tuple[int, str]:
    """A place as a sort key: search order is this, descending."""
    return (place.created_on, place.id)


def before(item: Position, bound: Position | None) -> bool:
    """Whether `item` comes strictly after `bound` in search order (newest first)."""
    return bound is None or rank(item) < rank(bound)


def order_key(promise: Promise) -> tuple[int, str]:
    return (promise.created_on, promise.id)


def size_in_page(promise: Promise) -> int:
    return len(msgspec.json.encode(promise)) + PAGE_ITEM_OVERHEAD


# --- one partition's page ------------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionPage:
    """What one partition answers: matches newest first, and where to resume if it has more (or stopped
    scanning early: `next` is then the last place it looked, not necessarily a match)."""

    promises: list[Promise]
    next: Position | None


def partition_page(
    query: Query,
    candidates: Iterable[tuple[Position, Promise | None]],
    now: int,
    max_bytes: int,
    scan_budget: int = SCAN_BUDGET,
) -> PartitionPage:
    """The first `query.limit` matches among `candidates` (newest first, each with its record, or None when
    its id cannot match), within `max_bytes` of promises (the first match always goes in) and after looking
    at no more than `scan_budget` candidates."""
    found: list[Promise] = []
    size = 0
    for scanned, (place, record) in enumerate(candidates, start=1):
        if record is not None:
            promise = as_of(record, now)
            if selects(query, promise):
                cost = size_in_page(promise)
                if len(found) == query.limit or (found and size + cost > max_bytes):
                    return PartitionPage(found, position(found[-1]))
                found.append(promise)
                size += cost
        if scanned >= scan_budget:
            return PartitionPage(found, place)
    return PartitionPage(found, None)


# --- the merge of every partition's page ---------------------------------------------------------


def merge(limit: int, pages: Iterable[PartitionPage], max_bytes: int) -> tuple[list[Promise], Position | None]:
    """The first `limit` promises across partitions, newest first, within `max_bytes`, and where the next
    page starts (None when every partition is exhausted and everything was taken).

    A partition that stopped early may hold more matches anywhere after its `next`, so nothing past the
    newest such stop is taken: the next page resumes there and sees them in order.
    """
    pages = list(pages)
    stops = [page.next for page in pages if page.next is not None]
    boundary = max(stops, key=rank) if stops else None
    pool = sorted((p for page in pages for p in page.promises), key=order_key, reverse=True)
    taken: list[Promise] = []
    size = 0
    for promise in pool:
        if boundary is not None and before(position(promise), boundary):
            break
        cost = size_in_page(promise)
        if len(taken) == limit or (taken and size + cost > max_bytes):
            return taken, position(taken[-1])
        taken.append(promise)
        size += cost
    if boundary is not None:
        return taken, boundary
    return taken, (position(taken[-1]) if len(taken) == limit else None)


# --- cursors -------------------------------------------------------------------------------------


class _CursorBody(msgspec.Struct, frozen=True, array_like=True):
    version: int
    query: Query
    after: Position


CURSOR_VERSION: Final = 1
_MAC_BYTES: Final = 16
_BODIES: Final = msgspec.json.Decoder(_CursorBody)


def encode_cursor(query: Query, after: Position, key: bytes) -> str:
    """An opaque cursor: the query and where the next page starts, signed with `key` so that it cannot be
    edited into another query or place."""
    body = msgspec.json.encode(_CursorBody(CURSOR_VERSION, query, after))
    return f"{_b64(body)}.{_b64(_mac(key, body))}"


def decode_cursor(cursor: str, key: bytes) -> tuple[Query, Position]:
    """The query and resume point of a cursor `encode_cursor` made with `key`; BadCursor otherwise."""
    text, _, mac = cursor.partition(".")
    try:
        body, signature = _unb64(text), _unb64(mac)
    except (binascii.Error, ValueError):
        raise BadCursor("not a cursor") from None
    if not hmac.compare_digest(signature, _mac(key, body)):
        raise BadCursor("its signature does not match: edited, or made by a gateway with another cursor key")
    try:
        decoded = _BODIES.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise BadCursor("unreadable") from None
    if decoded.version != CURSOR_VERSION:
        raise BadCursor(f"version {decoded.version}, this version reads {CURSOR_VERSION}")
    return decoded.query, decoded.after


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()[:_MAC_BYTES]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not text.isascii():
        raise ValueError("not ASCII")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def overlay(
    stored: Iterator[tuple[Position, Promise | None]],
    changed: Mapping[str, Promise],
    pattern: str,
    after: Position | None,
    gone: Container[str] = (),
) -> Iterator[tuple[Position, Promise | None]]:
    """`stored` candidates (newest first) with this batch's `changed` records matching `pattern` in their
    places: a record changed in the batch replaces its stored version, one created in it joins in order,
    and one the batch purged (`gone`) is left out."""
    matches = compile_pattern(pattern).fullmatch
    extra = sorted(
        ((position(p), p) for p in changed.values() if matches(p.id) and before(position(p), after)),
        key=lambda pair: rank(pair[0]),
        reverse=True,
    )
    index = 0
    for place, record in stored:
        while index < len(extra) and rank(extra[index][0]) > rank(place):
            yield extra[index]
            index += 1
        if place.id not in changed and place.id not in gone:
            yield place, record
    yield from extra[index:]
