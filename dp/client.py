"""The Python client: durable promises as an asyncio API over the wire contract (docs/wire.md).

Commands go to the commands topic keyed by promise id with Kafka's default (murmur2) partitioner, as
the processor requires. Each client reads its replies from one partition of the replies topic, from
that partition's end, and matches them to callers by `requestId`; replies for other clients sharing
the partition are ignored. Everything is read with `read_committed`, so a caller only ever sees what
the processor committed.

    async with Promises(bootstrap_servers="127.0.0.1:9092") as promises:
        await promises.create("order/42", timeout=timedelta(hours=1), param='{"item": 7}')
        record = await promises.wait("order/42")
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import AsyncGeneratorType
from typing import Any, Final, TypedDict, Unpack, cast

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from dp import kafka as clients
from dp.errors import (
    ClientClosed,
    CommandInDoubt,
    DpError,
    Refused,
    ReplyTimeout,
    SearchBusy,
    SendFailed,
    WaitTimeout,
)
from dp.search import PAGE_BYTES, Page, PartitionPage, Query, decode_cursor, encode_cursor, merge
from dp.settings import Kafka, Topics
from dp.topics import check_topics
from dp.wire import (
    NOTIFICATION_KIND,
    Cancel,
    Command,
    Completion,
    Create,
    Event,
    EventType,
    Get,
    Position,
    Promise,
    Reject,
    Reply,
    Resolve,
    Search,
    SearchState,
    Snapshot,
    Subscribe,
    TopicTarget,
    Value,
    WebhookTarget,
    decode_event,
    decode_notification,
    decode_reply,
    encode,
    op_name,
)

DEFAULT_REPLY_TIMEOUT: Final = 30.0
POLL_MS: Final = 1_000
# Subscribes a client has in flight at once. More is slower: past a thousand, the producer's full batches
# wake every waiting send at each drain (measured: 20,000 subscribes in 1.5 s at 1,000, 5 s at 5,000).
SUBSCRIBES_IN_FLIGHT: Final = 1_000
RESUBSCRIBE_S: Final = 1.0
# The `dp.kind` header of a record that is a notification, not a reply.
KIND_HEADER: Final = "dp.kind"
# Rounds of a search's double collect before it gives up (SearchBusy): each round asks every partition.
SEARCH_ROUNDS: Final = 8

Deadline = float | timedelta | datetime
"""A promise's timeout: seconds from now, a duration from now, or an absolute timezone-aware time."""
Duration = float | timedelta
Data = bytes | str | None
"""A payload: bytes as they are, text as UTF-8."""


class CompletionOptions(TypedDict, total=False):
    """Keyword arguments of `resolve`, `reject` and `cancel` (see `Promises.complete`)."""

    data: Data
    headers: Mapping[str, str] | None
    idempotency_key: str | None
    strict: bool
    reply_timeout: float | None


@dataclass(frozen=True)
class Result:
    """The processor's reply to one command. A KO status is a result to inspect, not an exception."""

    reply: Reply

    @property
    def status(self) -> str:
        return self.reply.status

    @property
    def ok(self) -> bool:
        return self.reply.ok

    @property
    def promise(self) -> Promise | None:
        """The record after the command, None when no such promise exists."""
        return self.reply.promise

    @property
    def error(self) -> str | None:
        return self.reply.error

    def raise_for_status(self) -> Result:
        """Strict mode for callers who prefer it: raise `Refused` on a KO status, else return self."""
        if not self.ok:
            raise Refused(self.reply)
        return self


class Promises:
    """A connection to a dp deployment: send commands, await replies and completions, follow events.

    Use it as an async context manager; one client serves any number of concurrent calls.
    """

    def __init__(
        self,
        bootstrap_servers: str | None = None,
        *,
        kafka: Kafka | None = None,
        topics: Topics | None = None,
        reply_timeout: float = DEFAULT_REPLY_TIMEOUT,
        reply_partition: int | None = None,
        cursor_key: bytes | None = None,
        search_rounds: int = SEARCH_ROUNDS,
    ) -> None:
        """`reply_partition` picks this client's partition of the replies topic (default: a random one);
        `cursor_key` signs search cursors (default: a random key, so cursors work with this client only)."""
        if bootstrap_servers is not None and kafka is not None:
            raise ValueError("pass bootstrap_servers or kafka, not both")
        self.kafka = kafka or (
            Kafka.from_env(bootstrap_servers=bootstrap_servers) if bootstrap_servers else Kafka.from_env()
        )
        self.topics = topics or Topics.from_env()
        self.reply_timeout = reply_timeout
        self.partitions = 0
        self.reply_partition = reply_partition
        self._producer: AIOKafkaProducer | None = None
        self.cursor_key = cursor_key or os.urandom(32)
        self.search_rounds = search_rounds
        self._waiting: dict[str, list[_Waiter]] = {}
        self._awaiting: dict[str, _Awaited] = {}
        self._unsubscribed: deque[tuple[str, _Awaited]] = deque()
        self._subscribers: set[asyncio.Task[None]] = set()
        self._failure: KafkaError | None = None
        self._stack = AsyncExitStack()
        self._streams: weakref.WeakSet[AsyncGeneratorType[Event, None]] = weakref.WeakSet()

    async def __aenter__(self) -> Promises:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Check the topics, connect, and start reading replies from the end of our reply partition."""
        try:
            self.partitions = await check_topics(self.kafka, self.topics)
            producer = await self._stack.enter_async_context(self._new_producer())
            if self.reply_partition is None:
                self.reply_partition = random.choice(sorted(await producer.partitions_for(self.topics.replies)))
            replies = await self._stack.enter_async_context(self._new_consumer())
            await _assign(replies, [TopicPartition(self.topics.replies, self.reply_partition)], from_beginning=False)
            reader = asyncio.create_task(self._read_replies(replies), name="dp-replies")
            self._stack.push_async_callback(_cancel, reader)
            self._producer = producer
        except BaseException:
            await self.close()
            raise

    @property
    def healthy(self) -> bool:
        """Started, and still reading its replies (a Kafka failure of the reply reader ends that)."""
        return self._producer is not None and self._failure is None

    async def close(self) -> None:
        """Disconnect; event streams parked at a `yield` (their loop ended or raised) are closed too."""
        self._producer = None
        for stream in list(self._streams):
            if stream.ag_await is None:  # else a task is inside it: cancelling that task closes it
                await stream.aclose()
        subscribers = list(self._subscribers)
        for subscriber in subscribers:
            subscriber.cancel()
        await asyncio.gather(*subscribers, return_exceptions=True)
        await self._stack.aclose()
        self._fail_waiting(ClientClosed())
        self._unsubscribed.clear()

    # --- commands -----------------------------------------------------------------------------

    async def create(
        self,
        id: str,
        *,
        timeout: Deadline,  # noqa: ASYNC109 - the promise's deadline, not a bound on this call
        param: Data = None,
        headers: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        strict: bool = False,
        reply_timeout: float | None = None,
    ) -> Result:
        """Create a pending promise that times out at `timeout` (required: there is no safe default).

        The idempotency key defaults to a fresh one; pass your own to make a retry deduplicate.
        """
        command = Create(
            id,
            timeout=deadline_ms(timeout),
            param=_value(param, headers),
            tags=dict(tags or {}),
            idempotency_key=idempotency_key or _new_key(),
            strict=strict,
        )
        return await self.send(command, reply_timeout=reply_timeout)

    async def resolve(self, id: str, **options: Unpack[CompletionOptions]) -> Result:
        """Complete a pending promise as RESOLVED; options as `complete`."""
        return await self.complete(Resolve, id, **options)

    async def reject(self, id: str, **options: Unpack[CompletionOptions]) -> Result:
        """Complete a pending promise as REJECTED; options as `complete`."""
        return await self.complete(Reject, id, **options)

    async def cancel(self, id: str, **options: Unpack[CompletionOptions]) -> Result:
        """Complete a pending promise as REJECTED_CANCELED; options as `complete`."""
        return await self.complete(Cancel, id, **options)

    async def complete(
        self,
        kind: type[Resolve | Reject | Cancel],
        id: str,
        *,
        data: Data = None,
        headers: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        strict: bool = False,
        reply_timeout: float | None = None,
    ) -> Result:
        """Send a Resolve, Reject or Cancel carrying the value (`data`, `headers`).

        The idempotency key defaults to a fresh one; pass your own to make a retry deduplicate.
        """
        command = kind(id, value=_value(data, headers), idempotency_key=idempotency_key or _new_key(), strict=strict)
        return await self.send(command, reply_timeout=reply_timeout)

    async def get(self, id: str, *, reply_timeout: float | None = None) -> Result:
        """Read a promise through the log (status `found` or `not_found`), so the answer is current."""
        return await self.send(Get(id), reply_timeout=reply_timeout)

    async def subscribe(
        self,
        id: str,
        target: TopicTarget | WebhookTarget,
        *,
        subscription: str | None = None,
        reply_timeout: float | None = None,
    ) -> Result:
        """Have the processor notify `target` once when the promise completes (at once if it is completed).

        `subscription` names the subscription (default: `target_id(target)`, so subscribing the same target
        twice is one subscription); a repeat with a known name changes nothing (`deduplicated`).
        """
        name = subscription or target_id(target)
        return await self.send(Subscribe(id, subscription=name, target=target), reply_timeout=reply_timeout)

    async def send(self, command: Command, *, reply_timeout: float | None = None) -> Result:
        """Publish a command as it is and await its reply: its idempotency key and `strict` are kept (a None
        key stays None), its `requestId` too (a fresh one when None); only the reply address is this
        client's. Commands sharing a requestId are told apart by op and id. Searches go through
        `search_page`, which asks every partition."""
        if type(command) is Search:
            raise TypeError("a search is sent to every partition: use search_page() or search()")
        return Result(await self._request(command, command.id.encode(), None, reply_timeout))

    async def _request(
        self, command: Command, key: bytes | None, partition: int | None, reply_timeout: float | None
    ) -> Reply:
        """Publish one command (by key, or to `partition`) and await the reply carrying its requestId."""
        producer = self._producer
        if producer is None:
            raise ClientClosed()
        request_id = command.request_id or uuid.uuid4().hex
        command = msgspec.structs.replace(
            command, request_id=request_id, reply_to=self.topics.replies, reply_partition=self.reply_partition
        )
        seconds = self.reply_timeout if reply_timeout is None else reply_timeout
        idempotency_key = command.idempotency_key if isinstance(command, Create | Completion) else None
        waiter = _Waiter(op_name(command), command.id, asyncio.get_running_loop().create_future())
        waiters = self._waiting.setdefault(request_id, [])
        waiters.append(waiter)
        try:
            if self._failure is not None:
                raise self._failure
            async with asyncio.timeout(seconds):
                await producer.send_and_wait(self.topics.commands, encode(command), key=key, partition=partition)
                return await waiter.arrived
        except TimeoutError:
            raise ReplyTimeout(seconds, op_name(command), command.id, idempotency_key) from None
        except KafkaError as error:
            raise SendFailed(f"Kafka failed ({error})", op_name(command), command.id, idempotency_key) from None
        finally:
            waiters.remove(waiter)
            if not waiters:
                del self._waiting[request_id]

    # --- search -------------------------------------------------------------------------------

    def search(
        self,
        pattern: str,
        *,
        state: SearchState | None = None,
        tags: Mapping[str, str] | None = None,
        limit: int = 100,
        reply_timeout: float | None = None,
    ) -> AsyncIterator[Page]:
        """Pages of the promises whose id matches `pattern` (`*` is any run of characters), newest first.

        Each page is linearizable: it reflects one instant between its request and its answer, across
        every partition (see `search_page`). Pages are not one snapshot together: a promise created
        between two pages is older than the cursor only if it sorts there.
        """
        return self._pages(Query(pattern, state, dict(tags or {}), limit), reply_timeout)

    async def _pages(self, query: Query, reply_timeout: float | None) -> AsyncIterator[Page]:
        page = await self.search_page(query, reply_timeout=reply_timeout)
        yield page
        while page.cursor is not None:
            page = await self.search_page(page.cursor, reply_timeout=reply_timeout)
            yield page

    async def search_page(
        self, query: Query | str, *, request_id: str | None = None, reply_timeout: float | None = None
    ) -> Page:
        """One page of a search (`query`, or the cursor of a previous page), by a double collect.

        Every partition answers from its store with a snapshot (its change version and clock, and the
        transaction that committed the answer). Answers one transaction committed reflect one instant, so
        when a single processor answers in one cycle the first round is the last. Otherwise a second round
        sends each snapshot back, and a partition answers `unchanged` unless something the query could see
        changed since: a round in which every partition is unchanged proves that the pages held together
        during it. Partitions that changed answer afresh and the round repeats, at most `search_rounds`
        times (then SearchBusy).
        """
        after = None
        if isinstance(query, str):
            query, after = decode_cursor(query, self.cursor_key)
        seconds = self.reply_timeout if reply_timeout is None else reply_timeout
        # Unique even when callers reuse a request id: a round's answers must reach the search that asked.
        base = f"{request_id}.{uuid.uuid4().hex[:12]}" if request_id else uuid.uuid4().hex
        try:
            async with asyncio.timeout(seconds):
                while True:
                    pages = await self._collect(query, after, base)
                    promises, resume = merge(query.limit, pages, PAGE_BYTES)
                    if promises or resume is None:
                        break
                    after = resume  # every match so far lay beyond where a partition stopped looking: go on
        except TimeoutError:
            raise ReplyTimeout(seconds, "search", query.pattern, None) from None
        return Page(promises, encode_cursor(query, resume, self.cursor_key) if resume is not None else None)

    async def _collect(self, query: Query, after: Position | None, base: str) -> list[PartitionPage]:
        """Every partition's page, as of one instant (see `search_page`)."""
        pages: dict[int, Reply] = {}
        snapshots: dict[int, Snapshot] = {}
        for round in range(self.search_rounds):
            commands = [
                Search(
                    query.pattern,
                    request_id=f"{base}.{round}.{partition}",
                    state=query.state,
                    tags=query.tags,
                    limit=query.limit,
                    after=after,
                    since=snapshots.get(partition),
                )
                for partition in range(self.partitions)
            ]
            replies = await asyncio.gather(*(self._request(c, None, p, None) for p, c in enumerate(commands)))
            unchanged = True
            for partition, reply in enumerate(replies):
                if reply.status not in ("found", "unchanged") or reply.snapshot is None:
                    raise Refused(reply)
                snapshots[partition] = reply.snapshot
                if reply.status == "found":
                    pages[partition], unchanged = reply, False
            if unchanged or _one_transaction(replies):
                return [PartitionPage(reply.promises or [], reply.next) for reply in pages.values()]
        raise SearchBusy(self.search_rounds)

    async def _read_replies(self, replies: AIOKafkaConsumer) -> None:
        """Deliver each reply to the call waiting for its requestId; other clients' replies fall through."""
        try:
            while True:
                for records in (await replies.getmany(timeout_ms=POLL_MS)).values():
                    for record in records:
                        if (KIND_HEADER, NOTIFICATION_KIND) in record.headers:
                            self._notified(record.value)
                        else:
                            self._deliver(record.value)
        except KafkaError as error:
            self._failure = error
            self._fail_waiting(error)

    def _deliver(self, value: bytes | None) -> None:
        if value is None:
            return
        try:
            reply = decode_reply(value)
        except msgspec.DecodeError:
            return  # not a reply we can read, so not one of ours
        for waiter in self._waiting.get(reply.request_id or "", ()):
            # An `invalid` reply may name no op or id: it answers the first command still waiting.
            if not waiter.arrived.done() and (reply.op is None or (reply.op == waiter.op and reply.id == waiter.id)):
                waiter.arrived.set_result(reply)
                return

    def _notified(self, value: bytes | None) -> None:
        """A notification in the inbox completes the waits for its promise (others' are ignored)."""
        try:
            promise = decode_notification(value or b"").promise
        except msgspec.DecodeError:
            return
        awaited = self._awaiting.get(promise.id)
        if awaited is not None:
            _settle(awaited.completed, promise)

    def _fail_waiting(self, error: Exception) -> None:
        for waiters in self._waiting.values():
            for waiter in waiters:
                if not waiter.arrived.done():
                    waiter.arrived.set_exception(error)
        for awaited in self._awaiting.values():
            _settle(awaited.completed, exception=error)

    # --- completion and events ----------------------------------------------------------------

    async def wait(self, id: str, *, timeout: Duration | None = None) -> Promise:  # noqa: ASYNC109 - part of the API
        """The promise's record once it is completed, however long ago or soon that happens.

        Every wait of this client shares one inbox, its reply partition: the client subscribes to the
        promise there (once per promise, however many wait for it) and the processor sends the
        completion there, in the transaction that completes it; a subscribe's reply already shows a
        completed promise. With no `timeout` it waits until the promise's own timeout at the latest
        (given a running processor). Raises `Refused` if there is no such promise, `WaitTimeout` when
        `timeout` passes first.
        """
        seconds = _seconds(timeout) if timeout is not None else None
        awaited = self._awaited(id)
        awaited.waiters += 1
        try:
            async with asyncio.timeout(seconds):
                return await asyncio.shield(awaited.completed)
        except TimeoutError:
            if seconds is None:
                raise
            raise WaitTimeout(id, seconds) from None
        finally:
            awaited.waiters -= 1
            if not awaited.waiters:
                self._forget(id, awaited)

    async def wait_many(self, ids: Iterable[str], *, timeout: Duration | None = None) -> dict[str, Promise]:  # noqa: ASYNC109
        """Every promise's completed record, by id, once all are completed (see `wait`)."""
        wanted = list(dict.fromkeys(ids))
        completed = {promise.id: promise async for promise in self.as_completed(wanted, timeout=timeout)}
        return {id: completed[id] for id in wanted}

    async def as_completed(
        self,
        ids: Iterable[str],
        *,
        timeout: Duration | None = None,  # noqa: ASYNC109
        subscribed: asyncio.Event | None = None,
    ) -> AsyncIterator[Promise]:
        """The completed records of `ids` in the order they complete, over this client's one inbox.

        Subscribes to at most `SUBSCRIBES_IN_FLIGHT` promises at a time, so that awaiting 100,000
        promises costs memory and Kafka traffic in proportion, never a consumer each. `timeout` bounds
        the whole iteration (`WaitTimeout` names the first promise still pending). `subscribed` is set
        once every promise's subscribe has been answered: any completion after it comes as a notification.
        """
        wanted = list(dict.fromkeys(ids))
        seconds = _seconds(timeout) if timeout is not None else None
        done: asyncio.Queue[asyncio.Future[Promise]] = asyncio.Queue()
        held = [self._awaited(id) for id in wanted]
        for awaited in held:
            awaited.waiters += 1
            awaited.completed.add_done_callback(done.put_nowait)
        watching = asyncio.ensure_future(_all_subscribed(held, subscribed)) if subscribed is not None else None
        deadline = None if seconds is None else asyncio.get_running_loop().time() + seconds
        try:
            for _ in held:
                try:  # the deadline bounds the waiting here, never the caller's loop body at the `yield`
                    async with asyncio.timeout_at(deadline):
                        completed = await done.get()
                except TimeoutError:
                    assert seconds is not None, "only a deadline times out"
                    waiting = (id for id, awaited in zip(wanted, held, strict=True) if not awaited.completed.done())
                    raise WaitTimeout(next(waiting, wanted[0]), seconds) from None
                yield completed.result()
        finally:
            if watching is not None:
                watching.cancel()
            for id, awaited in zip(wanted, held, strict=True):
                awaited.completed.remove_done_callback(done.put_nowait)
                awaited.waiters -= 1
                if not awaited.waiters:
                    self._forget(id, awaited)

    def _awaited(self, id: str) -> _Awaited:
        """The one completion future of `id` in this client; a new one joins the queue of subscribes."""
        awaited = self._awaiting.get(id)
        if awaited is None:
            if self._producer is None:
                raise ClientClosed()
            loop = asyncio.get_running_loop()
            awaited = self._awaiting[id] = _Awaited(loop.create_future(), loop.create_future())
            self._unsubscribed.append((id, awaited))
            if len(self._subscribers) < SUBSCRIBES_IN_FLIGHT:
                self._subscribers.add(asyncio.create_task(self._subscribe_queued(), name="dp-subscribe"))
        return awaited

    def _forget(self, id: str, awaited: _Awaited) -> None:
        """Nobody waits for `id` any more: a subscribe not yet sent is skipped, one under way is not sent
        again (a subscription made stays, and is harmless)."""
        if self._awaiting.get(id) is awaited:
            del self._awaiting[id]
        if not awaited.completed.done():
            awaited.completed.cancel()

    async def _subscribe_queued(self) -> None:
        """One of at most `SUBSCRIBES_IN_FLIGHT` workers: a task per queued promise would cost a coroutine
        frame each, which for 100,000 awaited promises is most of the client's memory. A worker leaves the
        count in the same step as it finds the queue empty, so a promise queued next always finds one."""
        try:
            while self._unsubscribed:
                id, awaited = self._unsubscribed.popleft()
                if not awaited.completed.done():
                    await self._subscribe(id, awaited)
                if not awaited.answered.done():
                    awaited.answered.set_result(None)
        finally:
            self._subscribers.discard(cast(asyncio.Task[None], asyncio.current_task()))

    async def _subscribe(self, id: str, awaited: _Awaited) -> None:
        """Subscribe this client's inbox to `id`, again after a reply timeout (a subscribe is idempotent)."""
        command = Subscribe(id, subscription=self.inbox_subscription, target=self.inbox)
        while True:
            try:
                reply = await self._request(command, id.encode(), None, None)
                break
            except CommandInDoubt:
                if self._failure is not None:
                    _settle(awaited.completed, exception=self._failure)
                    return
                if awaited.completed.done():  # forgotten meanwhile
                    return
                await asyncio.sleep(RESUBSCRIBE_S)  # the processor or Kafka is away: ask again soon
            except DpError as error:
                _settle(awaited.completed, exception=error)
                return
        if not reply.ok or reply.promise is None:
            _settle(awaited.completed, exception=Refused(reply))
        elif reply.promise.state != "PENDING":
            _settle(awaited.completed, reply.promise)

    @property
    def inbox(self) -> TopicTarget:
        """Where this client's notifications arrive: its reply partition, read by its one reply reader."""
        assert self.reply_partition is not None, "the client is not started"
        return TopicTarget(self.topics.replies, self.reply_partition)

    @property
    def inbox_subscription(self) -> str:
        """The subscription id of this inbox: every client reading the same partition shares it (each
        sees the notification), and a restarted client with the same partition re-subscribes as a no-op."""
        return f"dp.inbox:{self.inbox.topic}/{self.inbox.partition}"

    def events(
        self,
        *,
        from_beginning: bool = False,
        prefix: str | None = None,
        types: Iterable[EventType] | None = None,
        group: str | None = None,
        positioned: asyncio.Event | None = None,
    ) -> AsyncGenerator[Event, None]:
        """Follow the events topic: every state change, in order per promise, optionally filtered.

        Without `group` it reads every partition from now (or from the beginning). With `group` it is a
        member of that consumer group: partitions are shared among the members, and each event is
        committed once the loop asks for the next one, so a restarted member resumes after the last
        event it finished (at least once: the event in hand when a member dies comes again).
        `from_beginning` then only decides where a group with no committed position starts.

        The stream takes its place when first iterated; `positioned` is set then (without `group`: every
        event after that moment is in the stream), for a caller that must say when it is following.
        """
        wanted = frozenset(types) if types is not None else None
        stream = self._events(from_beginning, prefix, wanted, group, positioned)
        self._streams.add(cast(AsyncGeneratorType[Event, None], stream))
        return stream

    async def _events(
        self,
        from_beginning: bool,
        prefix: str | None,
        wanted: frozenset[str] | None,
        group: str | None,
        positioned: asyncio.Event | None,
    ) -> AsyncGenerator[Event, None]:
        reset = "earliest" if from_beginning else "latest"
        async with self._new_consumer(group=group, auto_offset_reset=reset) as consumer:
            if group is None:
                tps = [TopicPartition(self.topics.events, p) for p in range(self.partitions)]
                await _assign(consumer, tps, from_beginning)
            else:
                consumer.subscribe([self.topics.events])
            if positioned is not None:
                positioned.set()
            finished: dict[TopicPartition, int] = {}
            while True:
                for tp, records in (await consumer.getmany(timeout_ms=POLL_MS)).items():
                    for record in records:
                        if tp not in consumer.assignment():
                            break  # rebalanced to another member mid-batch: it delivers the rest
                        event = _chosen(record.value, prefix, wanted)
                        if event is not None:
                            yield event
                        finished[tp] = record.offset + 1
                        if event is not None:
                            await _commit(consumer, group, finished)
                await _commit(consumer, group, finished)

    # --- Kafka plumbing -----------------------------------------------------------------------

    def _new_producer(self) -> AbstractAsyncContextManager[AIOKafkaProducer]:
        return clients.started(self.kafka, clients.producer(self.kafka))

    def _new_consumer(self, group: str | None = None, **tuning: Any) -> AbstractAsyncContextManager[AIOKafkaConsumer]:
        return clients.started(self.kafka, clients.reader(self.kafka, group, **tuning))


async def _assign(consumer: AIOKafkaConsumer, tps: list[TopicPartition], from_beginning: bool) -> None:
    """Read `tps` without a group, from the beginning or from the end as of now (fixed before returning)."""
    consumer.assign(tps)
    if from_beginning:
        await consumer.seek_to_beginning(*tps)
        return
    for tp, end in (await consumer.end_offsets(tps)).items():
        consumer.seek(tp, end)


def _one_transaction(replies: Iterable[Reply]) -> bool:
    """Whether one Kafka transaction committed every answer: then no write after one partition's answer
    can have been acknowledged before a write before another's began (none is acknowledged before the
    commit), so the answers reflect one instant, however busy the partitions."""
    labels = {reply.snapshot.transaction if reply.snapshot is not None else None for reply in replies}
    return len(labels) == 1 and None not in labels


@dataclass(slots=True)
class _Awaited:
    """One promise this client awaits: its completion, whether its subscribe was answered, how many calls
    wait for it."""

    completed: asyncio.Future[Promise]
    answered: asyncio.Future[None]
    waiters: int = 0


async def _all_subscribed(held: list[_Awaited], subscribed: asyncio.Event) -> None:
    if held:
        await asyncio.wait([awaited.answered for awaited in held])
    subscribed.set()


def _settle(
    future: asyncio.Future[Promise], result: Promise | None = None, *, exception: Exception | None = None
) -> None:
    """Complete a future once: the first of a subscribe's reply and a notification wins."""
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
        future.exception()  # retrieved: a wait that has gone does not make it an unhandled error
    else:
        assert result is not None
        future.set_result(result)


@dataclass(frozen=True)
class _Waiter:
    """A command awaiting its reply: the reply's requestId, op and id must match."""

    op: str
    id: str
    arrived: asyncio.Future[Reply]


def _decode_event(value: bytes | None) -> Event | None:
    """An event, or None for one this version cannot read (e.g. a type added by a newer processor)."""
    if value is None:
        return None
    try:
        return decode_event(value)
    except msgspec.DecodeError:
        return None


def _chosen(value: bytes | None, prefix: str | None, wanted: frozenset[str] | None) -> Event | None:
    """The event if it is readable and passes the filters."""
    event = _decode_event(value)
    if event is None or not event.promise.id.startswith(prefix or ""):
        return None
    return event if wanted is None or event.type in wanted else None


async def _commit(consumer: AIOKafkaConsumer, group: str | None, finished: dict[TopicPartition, int]) -> None:
    """Commit the positions after the events the loop has finished with (skipped ones included).

    One commit per event handed out keeps a restart from repeating handled events; skipped events are
    committed per batch. A commit refused after a rebalance is dropped: the partition's new owner
    delivers its uncommitted events again, which is at-least-once as promised.
    """
    if group is None or not finished:
        return
    with contextlib.suppress(CommitFailedError, IllegalStateError):
        await consumer.commit(dict(finished))
    finished.clear()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def target_id(target: TopicTarget | WebhookTarget) -> str:
    """A subscription id made from its target: the same target gives the same id (so subscribing it twice is
    one subscription), and a URL's secrets or length never show in the id."""
    return f"dp.target:{hashlib.sha256(encode(target)).hexdigest()[:24]}"


def deadline_ms(timeout: Deadline, now: float | None = None) -> int:
    """A promise timeout as absolute epoch milliseconds, as the wire wants it."""
    if isinstance(timeout, datetime):
        if timeout.tzinfo is None:
            raise ValueError("timeout: a datetime must be timezone-aware, e.g. datetime.now(UTC) + timedelta(hours=1)")
        return int(timeout.timestamp() * 1000)
    seconds = _seconds(timeout)
    if seconds <= 0:
        raise ValueError(f"timeout: {timeout!r} is not in the future; pass an absolute datetime to mean a past one")
    return int(((time.time() if now is None else now) + seconds) * 1000)


def _seconds(duration: Duration) -> float:
    if isinstance(duration, timedelta):
        return duration.total_seconds()
    if isinstance(duration, bool) or not isinstance(duration, int | float):
        raise TypeError(f"expected seconds (int or float) or a timedelta, got {duration!r}")
    return float(duration)


def _value(data: Data, headers: Mapping[str, str] | None) -> Value:
    return Value(headers=dict(headers or {}), data=data.encode() if isinstance(data, str) else data)


def _new_key() -> str:
    return uuid.uuid4().hex
