"""Subscriptions: who hears of a promise's completion, and the rule that each hears exactly once (pure).

A promise's subscriptions live in its stored record (the changelog value): beside the promise's own
fields, `subscriptions` lists those still waiting and `notified` the ids already notified. When the
promise completes, by whatever path, every waiting subscription is notified in the transaction of
the completion and its id moves to `notified`; a later `subscribe` with a known id changes nothing
(`deduplicated`). So a retried subscribe never notifies twice, and a subscriber that lost track can
still read the completed record from the reply.
"""

from __future__ import annotations

from typing import Final, NamedTuple

import msgspec

from dp.wire import InvalidCommand, Promise, Status, Subscribe, Subscription, encode


class Subscribers(msgspec.Struct, frozen=True, gc=False, omit_defaults=True):
    """The subscription fields of a stored record (left out while empty, so most records have none)."""

    subscriptions: tuple[Subscription, ...] = ()
    notified: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.subscriptions) + len(self.notified)

    def knows(self, subscription_id: str) -> Subscription | str | None:
        """The waiting subscription with this id, the id if it was notified, else None."""
        for waiting in self.subscriptions:
            if waiting.id == subscription_id:
                return waiting
        return subscription_id if subscription_id in self.notified else None


NONE: Final = Subscribers()
decode_subscribers: Final = msgspec.json.Decoder(Subscribers).decode


class Subscribed(NamedTuple):
    """What a subscribe did: its reply status, the promise's subscriptions after it, the subscription
    still waiting (for the reply) and the one to notify at once (the promise is completed)."""

    status: Status
    after: Subscribers
    waiting: Subscription | None = None
    notify: Subscription | None = None


def subscribe(
    promise: Promise | None, subscribers: Subscribers, command: Subscribe, now: int, limit: int
) -> Subscribed:
    """Judge a subscribe against the record as it is at `now` (time already applied: a due promise is
    completed first, like before every command)."""
    if promise is None:
        return Subscribed("not_found", subscribers)
    known = subscribers.knows(command.subscription)
    if known is not None:
        return Subscribed("deduplicated", subscribers, known if isinstance(known, Subscription) else None)
    if len(subscribers) >= limit:
        raise InvalidCommand(
            f"`subscription`: promise {promise.id!r} has {len(subscribers)} subscriptions, the most one promise "
            "takes; subscribe again with one of their ids, or await the promise another way"
        )
    subscription = Subscription(command.subscription, command.target, now)
    if promise.state == "PENDING":
        after = msgspec.structs.replace(subscribers, subscriptions=(*subscribers.subscriptions, subscription))
        return Subscribed("created", after, waiting=subscription)
    after = msgspec.structs.replace(subscribers, notified=(*subscribers.notified, subscription.id))
    return Subscribed("created", after, notify=subscription)


def complete(subscribers: Subscribers) -> tuple[tuple[Subscription, ...], Subscribers]:
    """The promise completed: every waiting subscription is notified now, and only its id is kept."""
    waiting = subscribers.subscriptions
    return waiting, Subscribers((), (*subscribers.notified, *(subscription.id for subscription in waiting)))


def stored_value(promise: Promise, subscribers: Subscribers) -> bytes:
    """The stored record: the promise record, with the subscription fields when there are any (readers
    that decode a promise ignore them)."""
    record = encode(promise)
    if not subscribers.subscriptions and not subscribers.notified:
        return record
    return record[:-1] + b"," + encode(subscribers)[1:]
