"""The HTTP contract's query parameters, pure: a search (`GET /promises`), a long-poll's `wait` and the
event stream's filters, from the query as (name, value) pairs in the order they came.

Names not listed here are ignored, as unknown body fields are. A malformed value raises
`dp.http.BadRequest` naming the parameter and what it takes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Final, get_args

from dp.http import BadRequest, Detail
from dp.search import Query
from dp.wire import DEFAULT_LIMITS, MAX_SEARCH_LIMIT, EventType, Limits, SearchState

# --- query parameters --------------------------------------------------------------------------------

Params = Sequence[tuple[str, str]]
_SEARCH_STATES: Final[frozenset[str]] = frozenset(get_args(SearchState))
_EVENT_TYPES: Final[tuple[str, ...]] = get_args(EventType)
_TAG: Final = re.compile(r"tags\[(.*)\]", re.DOTALL)
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)?")


def _first(params: Params, name: str) -> str | None:
    return next((value for key, value in params if key == name), None)


def search_request(params: Params, limits: Limits = DEFAULT_LIMITS) -> Query | str:
    """`GET /promises?id=&state=&tags[k]=v&limit=&cursor=`: a new search, or the cursor of a page (which
    carries its own search, so it wins over every other parameter)."""
    cursor = _first(params, "cursor")
    if cursor:
        return cursor
    pattern = _first(params, "id")
    if not pattern:
        raise BadRequest(
            "a search needs `id`, a pattern where `*` matches any run of characters (e.g. id=order/*), or a cursor.",
            [Detail("id", "required unless cursor is given")],
        )
    if len(pattern.encode("utf-8", "surrogatepass")) > limits.max_id_bytes:
        raise BadRequest(
            f"the search pattern is over {limits.max_id_bytes} UTF-8 bytes: use a shorter pattern.",
            [Detail("id", f"must be at most {limits.max_id_bytes} UTF-8 bytes")],
        )
    return Query(pattern, _search_state(_first(params, "state")), _tags(params), _limit(_first(params, "limit")))


def _search_state(raw: str | None) -> SearchState | None:
    if raw is None:
        return None
    state = raw.lower()
    if state not in _SEARCH_STATES:
        raise BadRequest(
            f"`state` is {raw!r}: search for pending, resolved or rejected, or leave it out for every state.",
            [Detail("state", "expected pending, resolved or rejected")],
        )
    return state  # type: ignore[return-value]  # checked against SearchState's values just above


def _tags(params: Params) -> dict[str, str]:
    tags: dict[str, str] = {}
    for name, value in params:
        found = _TAG.fullmatch(name)
        if found is None:
            continue
        if tags.get(found[1], value) != value:
            raise BadRequest(
                f"the tag {found[1]!r} is given twice with different values: no promise can match both.",
                [Detail(name, "given twice")],
            )
        tags[found[1]] = value
    return tags


def _limit(raw: str | None) -> int:
    if raw is None:
        return MAX_SEARCH_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        limit = -1
    if not 0 <= limit <= MAX_SEARCH_LIMIT:
        raise BadRequest(
            f"`limit` is {raw!r}: ask for 1 to {MAX_SEARCH_LIMIT} promises per page (0 or none: {MAX_SEARCH_LIMIT}).",
            [Detail("limit", f"expected an integer from 0 to {MAX_SEARCH_LIMIT}")],
        )
    return limit or MAX_SEARCH_LIMIT


def wait_seconds(params: Params, max_wait: float) -> float | None:
    """`?wait=30s` on a read: how long to long-poll (`500ms`, `30s`, `2m`, `1h` or plain seconds), cut to
    `max_wait`; None for a plain read (absent, empty or zero)."""
    raw = _first(params, "wait")
    if not raw:
        return None
    found = _DURATION.fullmatch(raw.strip())
    if found is None:
        raise BadRequest(
            f"`wait` is {raw!r}: give a duration such as 500ms, 30s or 2m, or plain seconds.",
            [Detail("wait", "expected a duration")],
        )
    seconds = float(found[1]) * _UNITS[found[2] or "s"]
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return min(seconds, max_wait)


def events_filter(params: Params) -> tuple[str | None, tuple[EventType, ...] | None]:
    """`GET /events?prefix=order/&types=resolved,rejected`: the id prefix and the event types (None: all)."""
    prefix = _first(params, "prefix") or None
    raw = _first(params, "types")
    if not raw:
        return prefix, None
    names = tuple(name.strip().lower() for name in raw.split(",") if name.strip())
    unknown = [name for name in names if name not in _EVENT_TYPES]
    if unknown:
        raise BadRequest(
            f"`types` names {', '.join(map(repr, unknown))}: choose among {', '.join(_EVENT_TYPES)}.",
            [Detail("types", f"expected a comma-separated list of {', '.join(_EVENT_TYPES)}")],
        )
    return prefix, names or None  # type: ignore[return-value]  # each checked against EventType above
