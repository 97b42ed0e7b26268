"""`dp webhooks` end to end: a real processor writes the notifications, a real `dp webhooks` process posts them
to a receiver in this test (127.0.0.1) that fails, hangs or dawdles on purpose, and the DLQ is read back from
the broker. The oracle is what the receiver saw, not the service's own account."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from aiohttp import web
from aiokafka import TopicPartition

from consumers.webhooks import Ledger, allowed, backoff, destination, idempotency_key, judge
from dp import kafka as clients
from dp.client import Promises
from dp.partitioning import partition_for
from dp.settings import Kafka, Topics, WebhookSettings
from dp.wire import Subscribe, WebhookTarget, decode_notification
from tests.support import REPO, TEST_PARTITIONS, ServeProcess, WebhooksProcess, free_port, unique

FAST = {  # short backoffs and timeouts, so that retries and give-ups take a test moments, not minutes
    "DP_WEBHOOK_HOSTS": "127.0.0.1",
    "DP_WEBHOOK_TIMEOUT": "1",
    "DP_WEBHOOK_DELAY": "0.05",
    "DP_WEBHOOK_MAX_DELAY": "0.2",
    "DP_WEBHOOK_ATTEMPTS": "5",
    "DP_WEBHOOK_GRACE": "0.5",
}


@dataclass
class Hit:
    """One POST as the receiver saw it; `status` stays None while (or when never) answered."""

    behavior: str
    key: str
    headers: dict[str, str]
    body: dict[str, Any]
    status: int | None = None


@dataclass
class Receiver:
    """A webhook receiver: `/<behavior>?n=N` answers per behavior, counting attempts per Idempotency-Key.

    ok: 200. flaky: 503 for the first N attempts. hang: holds the first N attempts until `release` (the service
    gives up on them first). slow: 200 after 0.3 s. fail: 500. gone: 404.
    """

    port: int = field(default_factory=free_port)
    hits: list[Hit] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    busy: int = 0
    peak: int = 0

    def url(self, behavior: str, n: int = 0, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/{behavior}?n={n}"

    async def handle(self, request: web.Request) -> web.Response:
        behavior, n = request.match_info["behavior"], int(request.query.get("n", "0"))
        hit = Hit(behavior, request.headers.get("Idempotency-Key", ""), dict(request.headers), await request.json())
        attempt = 1 + sum(1 for seen in self.hits if seen.key == hit.key)
        self.hits.append(hit)
        self.busy += 1
        self.peak = max(self.peak, self.busy)
        try:
            if behavior == "hang" and attempt <= n:
                await self.release.wait()
            elif behavior == "slow":
                await asyncio.sleep(0.3)  # the receiver's slowness itself, not a wait for a condition
            hit.status = {"flaky": 503 if attempt <= n else 200, "fail": 500, "gone": 404}.get(behavior, 200)
            return web.Response(status=hit.status)
        finally:
            self.busy -= 1

    def delivered(self, key: str) -> bool:
        return any(hit.key == key and hit.status == 200 for hit in self.hits)

    def of(self, promise_id: str, subscription: str = "s") -> list[Hit]:
        return [
            hit
            for hit in self.hits
            if (hit.body["promise"]["id"], hit.body["subscription"]) == (promise_id, subscription)
        ]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    app_receiver = Receiver()
    app = web.Application()
    app.router.add_post("/{behavior}", app_receiver.handle)
    # A handler whose client hung up is cancelled, so that `busy` counts only the POSTs the service still waits on.
    runner = web.AppRunner(app, shutdown_timeout=1, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", app_receiver.port).start()
    yield app_receiver
    app_receiver.release.set()
    await runner.cleanup()


@pytest.fixture
async def client(kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]) -> AsyncIterator[Promises]:
    spawn()
    async with Promises(kafka=kafka, topics=topics) as promises:
        yield promises


async def notify(promises: Promises, promise_id: str, url: str, subscriptions: tuple[str, ...] = ("s",)) -> None:
    """Create a promise, subscribe a webhook (with a header of its own) and resolve it: one notification each."""
    (await promises.create(promise_id, timeout=timedelta(hours=1))).raise_for_status()
    for subscription in subscriptions:
        target = WebhookTarget(url=url, headers={"X-Token": f"t-{subscription}"})
        (await promises.send(Subscribe(promise_id, subscription=subscription, target=target))).raise_for_status()
    (await promises.resolve(promise_id, data='"done"')).raise_for_status()


async def eventually(condition: Callable[[], bool], within: float, what: str) -> None:
    """Poll `condition` until it holds; fail saying `what` did not happen within `within` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {within:g}s")
        await asyncio.sleep(0.05)  # polling a condition: the next look


async def dead_letters(kafka: Kafka, topics: Topics, count: int, within: float = 30) -> list[Any]:
    """The first `count` records of the DLQ (all partitions), read from the beginning."""
    found: list[Any] = []
    async with clients.started(kafka, clients.reader(kafka, auto_offset_reset="earliest")) as reader:
        reader.assign([TopicPartition(topics.dlq, number) for number in range(TEST_PARTITIONS)])
        deadline = time.monotonic() + within
        while len(found) < count and time.monotonic() < deadline:
            for records in (await reader.getmany(timeout_ms=200)).values():
                found.extend(records)
    assert len(found) == count, f"{len(found)} DLQ records, expected {count}: {found}"
    return found


def keys_per_notification(hits: list[Hit]) -> dict[tuple[str, str], set[str]]:
    keys: dict[tuple[str, str], set[str]] = {}
    for hit in hits:
        keys.setdefault((hit.body["promise"]["id"], hit.body["subscription"]), set()).add(hit.key)
    return keys


def same_partition(count: int) -> list[str]:
    """`count` fresh promise ids whose notifications land on one partition, so their commit order matters."""
    ids = [unique("order")]
    while len(ids) < count:
        candidate = unique("order")
        if partition_for(candidate.encode(), TEST_PARTITIONS) == partition_for(ids[0].encode(), TEST_PARTITIONS):
            ids.append(candidate)
    return ids


async def test_failing_hanging_and_slow_receivers_get_every_notification_under_one_key_each(
    client: Promises, receiver: Receiver, webhooks: Callable[..., WebhooksProcess]
) -> None:
    await asyncio.to_thread(webhooks({**FAST, "DP_WEBHOOK_PER_HOST": "3"}).start)
    plan = {unique("flaky"): receiver.url("flaky", 2) for _ in range(4)}
    plan |= {unique("hang"): receiver.url("hang", 1) for _ in range(3)}
    plan |= {unique("slow"): receiver.url("slow") for _ in range(4)}
    twice = unique("twice")
    await asyncio.gather(*(notify(client, promise_id, url) for promise_id, url in plan.items()))
    await notify(client, twice, receiver.url("ok"), subscriptions=("a", "b"))
    expected = {(promise_id, "s") for promise_id in plan} | {(twice, "a"), (twice, "b")}

    def all_delivered() -> bool:
        keys = keys_per_notification(receiver.hits)
        return keys.keys() == expected and all(receiver.delivered(key) for found in keys.values() for key in found)

    await eventually(all_delivered, 30, "a 2xx for every notification")
    keys = keys_per_notification(receiver.hits)
    assert all(len(found) == 1 for found in keys.values()), f"retries changed the Idempotency-Key: {keys}"
    assert len({key for found in keys.values() for key in found}) == len(expected), "two notifications share a key"
    attempts = Counter(hit.body["promise"]["id"] for hit in receiver.hits)
    assert all(attempts[promise_id] >= 3 for promise_id in plan if promise_id.startswith("flaky"))
    assert all(attempts[promise_id] >= 2 for promise_id in plan if promise_id.startswith("hang"))
    assert 1 < receiver.peak <= 3, f"{receiver.peak} POSTs at once to one host, with at most 3 allowed"
    (first, *_) = receiver.of(twice, "a")
    assert first.headers["Content-Type"] == "application/json" and first.headers["X-Token"] == "t-a"
    assert set(first.body) == {"type", "subscription", "promise"}, "the webhook target is not the receiver's"
    assert (first.body["type"], first.body["promise"]["state"]) == ("notify", "RESOLVED")


async def test_failures_that_never_end_and_hosts_off_the_allow_list_go_to_the_dlq(
    kafka: Kafka, topics: Topics, client: Promises, receiver: Receiver, webhooks: Callable[..., WebhooksProcess]
) -> None:
    await asyncio.to_thread(webhooks({**FAST, "DP_WEBHOOK_ATTEMPTS": "3"}).start)
    failing, gone, elsewhere = unique("fail"), unique("gone"), unique("elsewhere")
    await notify(client, failing, receiver.url("fail"))
    await notify(client, gone, receiver.url("gone"))
    await notify(client, elsewhere, receiver.url("ok", host="localhost"))  # the same receiver, by another name
    async with clients.started(kafka, clients.producer(kafka)) as producer:
        await producer.send_and_wait(topics.notifications, b"{not json", key=b"junk", partition=0)

    letters = await dead_letters(kafka, topics, 4)
    errors = {(letter.key or b"").decode(): dict(letter.headers) for letter in letters}
    assert "500" in errors[failing]["dp.error"].decode() and "attempt 3 of 3" in errors[failing]["dp.error"].decode()
    assert "404" in errors[gone]["dp.error"].decode() and "permanent" in errors[gone]["dp.error"].decode()
    assert "DP_WEBHOOK_HOSTS" in errors[elsewhere]["dp.error"].decode()
    assert "not a notification" in errors["junk"]["dp.error"].decode()
    assert (len(receiver.of(failing)), len(receiver.of(gone)), len(receiver.of(elsewhere))) == (3, 1, 0)
    for letter in letters:
        headers = dict(letter.headers)
        assert headers["dp.topic"].decode() == topics.notifications
        assert int(headers["dp.partition"]) in range(TEST_PARTITIONS) and int(headers["dp.offset"]) >= 0
        if letter.key != b"junk":
            original = decode_notification(letter.value)
            assert original.webhook is not None and original.promise.id == letter.key.decode()
            assert headers["dp.kind"] == b"notification"


async def test_sigterm_exits_at_once_while_a_receiver_hangs_and_the_next_run_delivers_what_was_not_done(
    client: Promises, receiver: Receiver, webhooks: Callable[..., WebhooksProcess]
) -> None:
    service = webhooks({**FAST, "DP_WEBHOOK_TIMEOUT": "60"})
    await asyncio.to_thread(service.start)
    held, after = same_partition(2)
    await notify(client, held, receiver.url("hang", 1))  # hangs on its first attempt, beyond the grace period
    await notify(client, after, receiver.url("ok"))  # done, but after `held` in the partition
    await eventually(lambda: bool(receiver.of(held)) and bool(receiver.of(after)), 30, "both POSTs")
    assert receiver.of(held)[0].status is None, "the held POST was answered"

    started = time.monotonic()
    assert await asyncio.to_thread(service.stop, 10) == 0
    assert time.monotonic() - started < 5, "the stop waited for the hanging receiver"
    assert "stopped:" in service.log.read_text()

    await asyncio.to_thread(service.start)
    await eventually(lambda: any(hit.status == 200 for hit in receiver.of(held)), 30, "the held notification's 2xx")
    assert len({hit.key for hit in receiver.of(held)}) == 1


async def test_a_kill_9_mid_delivery_loses_nothing(
    client: Promises, receiver: Receiver, webhooks: Callable[..., WebhooksProcess]
) -> None:
    service = webhooks({**FAST, "DP_WEBHOOK_PER_HOST": "2"})
    await asyncio.to_thread(service.start)
    ids = [unique("crash") for _ in range(20)]
    await asyncio.gather(*(notify(client, promise_id, receiver.url("slow")) for promise_id in ids))

    def midway() -> bool:
        answered = sum(hit.status == 200 for hit in receiver.hits)
        return answered >= 4 and any(hit.status is None for hit in receiver.hits)

    await eventually(midway, 30, "some deliveries done and some under way")
    # The receiver runs on this loop, so nothing is answered between this look and the kill.
    unanswered = {hit.body["promise"]["id"] for hit in receiver.hits if hit.status is None}
    service.kill()

    await asyncio.to_thread(service.start)
    await eventually(lambda: all(any(hit.status == 200 for hit in receiver.of(i)) for i in ids), 60, "every 2xx")
    assert all(len(receiver.of(promise_id)) >= 2 for promise_id in unanswered), "a POST cut by the kill was not redone"
    keys = keys_per_notification(receiver.hits)
    assert all(len(found) == 1 for found in keys.values()), f"a redelivery changed the Idempotency-Key: {keys}"


def test_missing_topics_and_bad_settings_end_in_one_sentence(bootstrap_servers: str) -> None:
    command = [sys.executable, "-m", "dp.cli", "webhooks", "--bootstrap-servers", bootstrap_servers]
    absent = f"absent{uuid.uuid4().hex[:8]}"
    missing = subprocess.run([*command, "--topic-prefix", absent], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert missing.returncode == 2 and "dp topics create" in missing.stderr, missing.stderr
    bad = subprocess.run(
        [*command, "--webhook-hosts", "http://x"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert bad.returncode == 2 and "DP_WEBHOOK_HOSTS" in bad.stderr, bad.stderr
    assert missing.stderr.strip().count("\n") == 0 and bad.stderr.strip().count("\n") == 0, "more than one line"


# --- the pure decisions, without the broker ------------------------------------------------------------------


def test_the_allow_list_matches_hosts_as_written() -> None:
    hosts = WebhookSettings(hosts="hooks.example.com, *.internal.example.com:8443, [::1]:80").allowed_hosts
    assert allowed(*destination("https://HOOKS.example.com/in"), hosts)
    assert allowed(*destination("http://hooks.example.com:9000/in"), hosts), "a host without a port allows any"
    assert allowed(*destination("https://a.b.internal.example.com:8443/"), hosts)
    assert not allowed(*destination("https://internal.example.com:8443/"), hosts), "*. matches subdomains only"
    assert not allowed(*destination("https://a.internal.example.com/"), hosts), "the port is 443, not 8443"
    assert not allowed(*destination("https://hooks.example.com.evil.net/"), hosts)
    assert allowed(*destination("http://[::1]/"), hosts) and not allowed(*destination("http://[::1]:81/"), hosts)
    assert not allowed(*destination("http://127.0.0.1/"), WebhookSettings().allowed_hosts), "empty allows none"


def test_answers_are_judged_delivered_retried_or_permanent() -> None:
    url = "http://user:secret@h:8080/in?token=secret"
    assert judge(204, "No Content", url) is None
    for status, permanent in ((500, False), (503, False), (408, False), (429, False), (404, True), (301, True)):
        failure = judge(status, None, url)
        assert failure is not None and failure.permanent is permanent, status
        assert "secret" not in str(failure), "credentials leaked into the error"


def test_the_ledger_commits_up_to_the_first_record_not_done() -> None:
    ledger, tp = Ledger(), TopicPartition("n", 0)
    for offset in (5, 6, 8):  # 7 is a transaction marker: never fetched
        ledger.fetched(tp, offset)
    ledger.done(tp, 6)
    ledger.done(tp, 8)
    assert ledger.committable() == {tp: 5}
    ledger.committed({tp: 5})
    assert ledger.committable() == {}, "nothing moved"
    ledger.done(tp, 5)
    assert ledger.committable() == {tp: 9}
    ledger.forget([tp])
    ledger.done(tp, 9)  # a delivery that ended after its partition was revoked
    assert ledger.committable() == {}


def test_the_idempotency_key_is_one_per_notification() -> None:
    assert idempotency_key("p", "s") == idempotency_key("p", "s")
    assert len({idempotency_key("a/b", "c"), idempotency_key("a", "b/c"), idempotency_key("a", "bc")}) == 3
    assert all(0 <= backoff(attempt, 0.5, 60) <= min(60, 0.5 * 2 ** (attempt - 1)) for attempt in range(1, 20))
