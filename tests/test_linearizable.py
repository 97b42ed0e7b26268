"""Linearizability of the HTTP gateway, end to end: concurrent clients record a history over HTTP and
tests/lincheck.py checks it against SPEC.md's model (searches included: HTTP.md promises each one
reflects one instant across partitions).

Each client runs a closed loop of random creates, gets, completions and searches over 100 ids of its
run, with and without `Idempotency-Key` and `Strict`, timing every request with time.monotonic().
An answer that says nothing about the outcome (a 5xx, a client-side timeout, a broken connection) is
recorded as unanswered: the command may or may not have been applied, at any time after its call.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from tests.lincheck import TARGETS, Kind, Operation, check
from tests.support import GatewayProcess, ServeProcess, now_ms

IDS = 100
HOUR_MS = 3_600_000
KINDS: list[Kind] = ["create", "get", "resolve", "reject", "cancel", "search"]
# A promise changes at most twice, so writes that change one are in the first few hundred operations;
# searches are about 5% of the operations.
WEIGHTS = [20, 40, 8, 5, 4, 4]


@dataclass
class Workload:
    """One run's ids, the patterns its searches use and the history its clients record."""

    run: str = field(default_factory=lambda: f"lin-{uuid.uuid4().hex[:8]}")
    history: list[Operation] = field(default_factory=list)
    answered: int = 0
    milestone: int = -1  # when this many requests are answered, `reached` is set
    reached: asyncio.Event = field(default_factory=asyncio.Event)

    def id(self, n: int) -> str:
        return f"{self.run}/{n}"

    @property
    def ids(self) -> list[str]:
        return [self.id(n) for n in range(IDS)]

    @property
    def patterns(self) -> list[str]:
        return ["*", f"{self.run}/*", f"{self.run}/1*", "*5", "*/4"]


def plan(work: Workload, rng: random.Random, client: int, n: int) -> tuple[Kind, str, dict[str, Any]]:
    """One random operation: its kind, its target (id or pattern) and its inputs."""
    kind = rng.choices(KINDS, WEIGHTS)[0]
    if kind == "search":
        tags = {"t": "1"} if rng.random() < 0.2 else {}
        return kind, rng.choice(work.patterns), {"state": rng.choice([None, "pending", "resolved", "rejected"]),
                                                 "tags": tags}  # fmt: skip
    inputs: dict[str, Any] = {"data": f"{client}:{n}".encode()}
    if kind != "get":
        inputs["idempotency_key"] = rng.choice([None, "k1", "k2", ""])
        inputs["strict"] = rng.random() < 0.3
    if kind == "create":
        inputs["past"] = rng.random() < 0.1  # created timed out (a timer: resolved) at once
        timer = inputs["past"] and rng.random() < 0.3
        inputs["tags"] = {"resonate:timeout": "true"} if timer else rng.choice([{}, {"t": "1"}])
        inputs["timeout"] = now_ms() + (-HOUR_MS if inputs["past"] else HOUR_MS)
    return kind, work.id(rng.randrange(IDS)), inputs


def request(base: str, kind: Kind, target: str, inputs: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """The HTTP request of an operation: method, URL and aiohttp keyword arguments."""
    headers: dict[str, str] = {}
    if inputs.get("idempotency_key") is not None:
        headers["Idempotency-Key"] = inputs["idempotency_key"]
    if inputs.get("strict"):
        headers["Strict"] = "true"  # absent is false
    data = base64.b64encode(inputs.get("data", b"")).decode()
    if kind == "create":
        body = {"id": target, "timeout": inputs["timeout"], "param": {"data": data}, "tags": inputs["tags"]}
        return "POST", f"{base}/promises", {"json": body, "headers": headers}
    if kind == "get":
        return "GET", f"{base}/promises/{target}", {}
    if kind == "search":
        params = {"id": target, "limit": "100", **{f"tags[{k}]": v for k, v in inputs["tags"].items()}}
        if inputs["state"] is not None:
            params["state"] = inputs["state"]
        return "GET", f"{base}/promises", {"params": params}
    body = {"state": TARGETS[kind], "value": {"data": data}}
    return "PATCH", f"{base}/promises/{target}", {"json": body, "headers": headers}


async def perform(
    session: aiohttp.ClientSession, base: str, client: int, kind: Kind, target: str, inputs: dict[str, Any]
) -> Operation:
    """Send one operation and record it; anything that does not tell its outcome is unanswered."""
    method, url, arguments = request(base, kind, target, inputs)
    call = time.monotonic()
    try:
        async with session.request(method, url, **arguments) as response:
            text = await response.text()
            ret = time.monotonic()
            status = response.status
    except (TimeoutError, aiohttp.ClientError):
        return Operation(client, call, None, kind, target, **inputs)
    try:
        body: object = json.loads(text)
    except ValueError:
        body = text  # the checker refuses it as a response HTTP.md never gives
    if status >= 500:  # 504: no answer from the log in time; 503: a busy search, or not serving
        return Operation(client, call, None, kind, target, status, body, **inputs)
    return Operation(client, call, ret, kind, target, status, body, **inputs)


async def run_clients(base: str, work: Workload, clients: int, per_client: int, patience: float, seed: int) -> None:
    """`clients` closed loops of `per_client` operations each, appending to `work.history`; a client
    gives up on a request after `patience` seconds."""

    async def loop(session: aiohttp.ClientSession, client: int) -> None:
        rng = random.Random(seed * 1000 + client)
        for n in range(per_client):
            kind, target, inputs = plan(work, rng, client, n)
            done = await perform(session, base, client, kind, target, inputs)
            work.history.append(done)
            work.answered += done.ret is not None
            if work.answered == work.milestone:
                work.reached.set()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=patience)) as session:
        await asyncio.gather(*(loop(session, client) for client in range(clients)))


def verdict(history: list[Operation]) -> None:
    result = check(history)
    summary = f"{len(history)} ops, {sum(op.ret is None for op in history)} unanswered, {result.seconds:.2f} s"
    assert result.ok, f"{result.reason}\n({summary})"
    assert result.seconds < 60, f"the check is too slow ({summary})"


async def concurrent_run(base: str, clients: int, per_client: int) -> None:
    work = Workload()
    await run_clients(base, work, clients, per_client, patience=60, seed=random.randrange(1 << 30))
    unanswered = [op for op in work.history if op.ret is None and op.kind != "search"]
    assert unanswered == [], "a request went unanswered with the processor up (only a search may be busy)"
    assert any(op.kind == "search" and op.ret is not None for op in work.history), "no search was answered"
    verdict(work.history)


async def test_ten_clients_by_a_hundred_operations_are_linearizable(gateway: GatewayProcess) -> None:
    await concurrent_run(gateway.url, clients=10, per_client=100)


@pytest.mark.slow
async def test_ten_clients_by_a_thousand_operations_are_linearizable(gateway: GatewayProcess) -> None:
    await concurrent_run(gateway.url, clients=10, per_client=1000)


async def final_reads(base: str, work: Workload, client: int) -> list[Operation]:
    """A GET of every id, once every client is done: the state every acknowledged write left."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        return [await perform(session, base, client, "get", x, {}) for x in work.ids]


def keeps(record: object, write: Operation) -> bool:
    """Whether a promise as read keeps what an acknowledged create or completion wrote to it."""
    if not isinstance(record, dict):
        return False
    data = base64.b64encode(write.data).decode()
    if write.kind == "create":
        return (record["param"].get("data", ""), record.get("idempotencyKeyForCreate")) == (data, write.idempotency_key)
    completed = record["state"], record["value"].get("data", ""), record.get("idempotencyKeyForComplete")
    return completed == (TARGETS[write.kind], data, write.idempotency_key)


def lost_writes(history: list[Operation], reads: list[Operation]) -> list[str]:
    """Acknowledged creates and completions (201) that the final reads do not show."""
    final = {read.id: read.body if read.status == 200 else None for read in reads}
    return [
        f"{op.kind} {op.id} was acknowledged but the promise reads {final[op.id]}"
        for op in history
        if op.ret is not None and op.status == 201 and op.kind != "search" and not keeps(final[op.id], op)
    ]


@pytest.mark.slow
async def test_a_history_across_a_processor_crash_is_linearizable_and_keeps_every_acknowledged_write(
    spawn: Callable[..., ServeProcess], gateways: Callable[..., GatewayProcess]
) -> None:
    """kill -9 of the processor early in the run (while many promises are pending), then a new one on the
    same topics and group with a fresh data dir (it restores from the changelog): requests in between get
    504 within the gateway's reply timeout and are unanswered; their commands may still be applied later."""
    clients, per_client = 10, 300
    victim = spawn("a")
    gateway = gateways({"DP_REPLY_TIMEOUT": "5"})
    work = Workload(milestone=clients * per_client // 20)

    async def crash() -> None:
        await work.reached.wait()
        victim.kill()
        await asyncio.sleep(2)
        spawn("b")

    await asyncio.gather(
        run_clients(gateway.url, work, clients, per_client, patience=15, seed=random.randrange(1 << 30)), crash()
    )
    reads = await final_reads(gateway.url, work, client=clients)
    unanswered = [op for op in work.history if op.ret is None]
    assert unanswered, "no request went unanswered: the processor was not down during the run"
    assert all(op.ret is not None for op in reads), "the final reads went unanswered"
    assert lost_writes(work.history, reads) == []
    verdict(work.history + [op for op in reads if op.ret is not None])
