"""An in-memory `StoreView` for tests of the processor's core: the committed state as a dict."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import msgspec

from dp.search import before, position
from dp.subscriptions import NONE, Subscribers, decode_subscribers
from dp.wire import Position, Promise


@dataclass
class MemoryStore:
    """Committed records by id, the change version and the ids changed after `known_since`, in order."""

    records: dict[str, Promise] = field(default_factory=dict)
    subscribed: dict[str, Subscribers] = field(default_factory=dict)
    version: int = 0
    history: list[str] = field(default_factory=list)
    known_since: int = 0
    broken: Callable[[str], None] | None = None

    def get(self, promise_id: str) -> Promise | None:
        if self.broken is not None:
            self.broken(promise_id)
        return self.records.get(promise_id)

    def subscribers(self, promise_id: str) -> Subscribers:
        """A copy, as RocksDB decodes one afresh on every read."""
        return msgspec.structs.replace(self.subscribed.get(promise_id, NONE))

    def newest(self, after: Position | None) -> Iterator[tuple[Position, str]]:
        places = sorted((position(p) for p in self.records.values()), key=lambda p: (p.created_on, p.id), reverse=True)
        return ((place, place.id) for place in places if before(place, after))

    def changed_since(self, version: int) -> Sequence[str] | None:
        if version < self.known_since or version > self.version:
            return None
        return self.history[version - self.known_since :]

    def falling_due(self, start: int, end: int) -> Iterator[str]:
        return (p.id for p in self.records.values() if p.state == "PENDING" and start < p.timeout <= end)

    def persist(self, persisted: list[tuple[Promise, bytes]], changed: list[str], purged: Iterable[str] = ()) -> None:
        """What persisting a step does to stored records: purges first, then promises and their subscriptions."""
        for promise_id in purged:
            self.records.pop(promise_id, None)
            self.subscribed.pop(promise_id, None)
        self.commit({promise.id: promise for promise, _ in persisted}, changed)
        self.subscribed.update((promise.id, decode_subscribers(value)) for promise, value in persisted)

    def commit(self, changes: dict[str, Promise], changed: list[str]) -> None:
        """What persisting a step does: the records, the version, the recent changes."""
        self.records.update(changes)
        self.history.extend(changed)
        self.version += len(changed)
