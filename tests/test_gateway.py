"""The HTTP gateway end to end: every row of tests/http_cases.py against a real `dp gateway` and `dp serve`
on the test broker, then what only a running server shows (auth, long-poll, events, metrics, readiness,
no answer from the log, protocol errors, a graceful stop)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from yarl import URL

from dp.settings import Kafka, Topics
from dp.topics import create_topics
from tests.http_cases import Case, Step, cases
from tests.support import REPO, TEST_PARTITIONS, GatewayProcess, Scene, ServeProcess, mismatches, now_ms, unique

HOUR_MS = 3_600_000


@pytest.fixture(scope="module")
async def deployment(
    kafka: Kafka, bootstrap_servers: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[GatewayProcess]:
    """One processor and one gateway for the whole case table (each row uses ids of its own)."""
    topics = Topics(f"t{uuid.uuid4().hex[:10]}")
    await create_topics(kafka, topics, TEST_PARTITIONS)
    where = tmp_path_factory.mktemp("gateway")
    processor = ServeProcess(
        bootstrap_servers, topics, f"g-{uuid.uuid4().hex[:8]}", where / "data", where / "serve.log"
    )
    gateway = GatewayProcess(bootstrap_servers, topics, where / "gateway.log")
    try:
        processor.start()
        yield gateway.start()
    finally:
        gateway.kill()
        processor.kill()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client:
        yield client


async def send(session: aiohttp.ClientSession, base: str, scene: Scene, step: Step) -> tuple[int, Any, str]:
    """One request of a row; returns its status, its decoded JSON body and its Content-Type."""
    body = (
        step.body if isinstance(step.body, bytes) or step.body is None else json.dumps(scene.value(step.body)).encode()
    )
    url = URL(base + scene.text(step.path), encoded=True)
    data = None if body is None else io.BytesIO(body)  # aiohttp warns about large bodies given as bytes
    async with session.request(step.method, url, data=data, headers=scene.headers(step)) as response:
        document = json.loads(await response.read())
        if isinstance(document, dict) and isinstance(document.get("cursor"), str):
            scene.cursor = document["cursor"]
        return response.status, document, response.content_type


@pytest.mark.parametrize("case", cases("gateway"), ids=lambda case: case.name)
async def test_the_contract_end_to_end(case: Case, deployment: GatewayProcess, session: aiohttp.ClientSession) -> None:
    scene = Scene(f"g{uuid.uuid4().hex[:10]}", now_ms())
    for step in case.given:
        status, document, _ = await send(session, deployment.url, scene, step)
        assert status < 300, f"setting the scene failed: {step} → {status} {document}"
    status, document, content_type = await send(session, deployment.url, scene, case.request)
    assert content_type == "application/json"
    assert mismatches(case, scene, status, document) == []


# --- what only a running server shows ---------------------------------------------------------------------


def create_body(promise_id: str) -> dict[str, Any]:
    return {"id": promise_id, "timeout": now_ms() + HOUR_MS}


async def test_tokens_guard_every_route_but_probes_and_metrics(
    spawn: Callable[..., ServeProcess], gateways: Callable[..., GatewayProcess], session: aiohttp.ClientSession
) -> None:
    spawn()
    gateway = gateways({"DP_GATEWAY_TOKENS": "one, two"})
    body = create_body(unique("auth"))
    for headers in ({}, {"Authorization": "Bearer three"}, {"Authorization": "Basic b25lOg=="}):
        async with session.post(f"{gateway.url}/promises", json=body, headers=headers) as refused:
            assert refused.status == 401
            assert refused.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await refused.json())["error"]["code"] == 40100
    async with session.get(f"{gateway.url}/openapi.json") as document:
        assert document.status == 401
    async with session.post(f"{gateway.url}/promises", json=body, headers={"Authorization": "bearer two"}) as ok:
        assert ok.status == 201, await ok.text()
    for path in ("/ping", "/healthz", "/readyz", "/metrics"):
        async with session.get(gateway.url + path) as probe:
            assert probe.status == 200, path


async def test_a_long_poll_answers_when_another_request_completes_the_promise(
    deployment: GatewayProcess, session: aiohttp.ClientSession
) -> None:
    promise_id = unique("poll/a")
    async with session.post(f"{deployment.url}/promises", json=create_body(promise_id)) as created:
        assert created.status == 201

    async def poll() -> tuple[int, dict[str, Any]]:
        async with session.get(f"{deployment.url}/promises/{promise_id}?wait=60s") as answer:
            return answer.status, await answer.json()

    started = time.monotonic()
    polling = asyncio.create_task(poll())
    async with session.get(f"{deployment.url}/promises/{promise_id}") as read:
        assert (await read.json())["state"] == "PENDING"
    assert not polling.done(), "a long-poll on a pending promise answered early"
    async with session.patch(f"{deployment.url}/promises/{promise_id}", json={"state": "RESOLVED"}) as resolved:
        assert resolved.status == 201
    status, record = await asyncio.wait_for(polling, 30)
    assert (status, record["state"]) == (200, "RESOLVED")
    assert time.monotonic() - started < 30


async def test_the_readme_curl_examples_work_as_written(deployment: GatewayProcess) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## HTTP gateway") :]
    (block,) = re.findall(r"```sh\n(.*?)```", section[: section.index("\n## ")], re.S)
    script = block.replace("127.0.0.1:8001", deployment.url).replace("curl -s ", "curl -s -w '\\n' ")
    ran = await asyncio.to_thread(
        subprocess.run, ["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0, ran.stderr
    created, read, resolved, found = (json.loads(line) for line in ran.stdout.splitlines())
    assert (created["state"], created["tags"], read["id"]) == ("PENDING", {"shop": "eu"}, "order/42")
    assert resolved["state"] == "RESOLVED" and resolved["value"] == {"data": "InNoaXBwZWQi"}
    assert [promise["id"] for promise in found["promises"]] == ["order/42"]


async def test_events_stream_as_server_sent_events(deployment: GatewayProcess, session: aiohttp.ClientSession) -> None:
    prefix = unique("sse") + "/"
    url = f"{deployment.url}/events?prefix={prefix}&types=resolved"
    async with session.get(url) as stream:
        assert stream.status == 200 and stream.content_type == "text/event-stream"
        # The first comment says the stream is in place: the very next completion is in it.
        assert await stream.content.readline() == b": following dp events\n"
        promise_id = f"{prefix}1"
        async with session.post(f"{deployment.url}/promises", json=create_body(promise_id)) as created:
            assert created.status == 201
        async with session.patch(f"{deployment.url}/promises/{promise_id}", json={"state": "RESOLVED"}) as done:
            assert done.status == 201
        kind, data = await asyncio.wait_for(next_event(stream), 30)
    assert kind == "resolved"
    assert data["id"] == promise_id and data["state"] == "RESOLVED" and "completedOn" in data


async def next_event(stream: aiohttp.ClientResponse) -> tuple[str, dict[str, Any]]:
    """The next SSE message (comments skipped): its event name and its data as JSON."""
    fields: dict[str, str] = {}
    while True:
        line = (await stream.content.readline()).decode().rstrip("\n")
        if line.startswith(":"):
            continue
        if not line:
            if fields:
                return fields["event"], json.loads(fields["data"])
            continue
        name, _, value = line.partition(": ")
        fields[name] = value


async def test_an_event_stream_ends_when_its_client_leaves(
    deployment: GatewayProcess, session: aiohttp.ClientSession
) -> None:
    async with aiohttp.ClientSession() as leaving, leaving.get(f"{deployment.url}/events") as stream:
        assert (await stream.content.readline()).startswith(b":")
        assert await in_flight(session, deployment) >= 2  # the stream and this scrape (an earlier test's may end)
    deadline = time.monotonic() + 10
    while await in_flight(session, deployment) != 1:  # only this scrape: the handler saw the client go
        assert time.monotonic() < deadline, "the event stream outlived its client"


async def test_metrics_count_requests_by_route_and_status(
    deployment: GatewayProcess, session: aiohttp.ClientSession
) -> None:
    async with session.get(f"{deployment.url}/promises/{unique('missing')}") as missing:
        assert missing.status == 404
    async with session.get(f"{deployment.url}/metrics") as metrics:
        text = await metrics.text()
    assert metrics.status == 200 and metrics.headers["Content-Type"].startswith("text/plain")
    assert 'dp_gateway_requests_total{method="GET",route="/promises/{id}",status="404"}' in text
    assert "dp_gateway_request_duration_seconds_bucket" in text
    assert "dp_gateway_requests_in_flight" in text and "dp_gateway_ready 1.0" in text


async def test_a_malformed_request_gets_a_json_error_too(deployment: GatewayProcess) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", deployment.port)
    writer.write(b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"400" and b"application/json" in head
    assert json.loads(body)["error"]["code"] == 40000


async def test_no_processor_is_a_504_and_missing_topics_make_it_unready(
    kafka: Kafka, gateways: Callable[..., GatewayProcess], session: aiohttp.ClientSession
) -> None:
    topics = Topics(f"t{uuid.uuid4().hex[:10]}")  # not created yet
    gateway = gateways({"DP_REPLY_TIMEOUT": "1"}, on=topics, wait=False)
    await until(lambda: gateway.answers("/healthz") == 200)
    assert gateway.answers("/readyz") == 503
    async with session.post(f"{gateway.url}/promises", json=create_body("x")) as early:
        assert early.status == 503 and (await early.json())["error"]["code"] == 50300
    await create_topics(kafka, topics, TEST_PARTITIONS)
    await until(gateway.ready, seconds=30)  # it retries until the topics exist
    async with session.post(f"{gateway.url}/promises", json=create_body("x")) as unanswered:
        assert unanswered.status == 504
        assert (await unanswered.json())["error"]["code"] == 50400


async def test_event_streams_beyond_the_limit_get_503_and_long_polls_still_work(
    spawn: Callable[..., ServeProcess], gateways: Callable[..., GatewayProcess], session: aiohttp.ClientSession
) -> None:
    spawn()
    gateway = gateways({"DP_MAX_FOLLOWERS": "1"})
    promise_id = unique("few")
    async with session.post(f"{gateway.url}/promises", json=create_body(promise_id)) as created:
        assert created.status == 201
    async with session.get(f"{gateway.url}/events") as stream:
        assert (await stream.content.readline()).startswith(b":")  # the one stream allowed is open
        async with session.get(f"{gateway.url}/events") as refused:
            assert refused.status == 503
            assert "--max-followers" in (await refused.json())["error"]["message"]

        async def poll() -> tuple[int, str]:
            async with session.get(f"{gateway.url}/promises/{promise_id}?wait=1s") as waited:
                return waited.status, (await waited.json())["state"]

        # Long-polls hold no consumer (they share the gateway's inbox): five at once, past the limit of one.
        assert await asyncio.gather(*(poll() for _ in range(5))) == [(200, "PENDING")] * 5
    await until(lambda: gateway.answers("/events") == 200)  # the stream's slot is free again


async def test_sigterm_while_connecting_exits_0(gateways: Callable[..., GatewayProcess]) -> None:
    topics = Topics(f"t{uuid.uuid4().hex[:10]}")  # never created: the gateway keeps retrying
    gateway = gateways(on=topics, wait=False)
    await until(lambda: gateway.answers("/readyz") == 503)
    await until(lambda: "not connected to Kafka yet" in gateway.log.read_text(), seconds=30)  # retrying
    started = time.monotonic()
    assert await asyncio.to_thread(gateway.stop) == 0
    assert time.monotonic() - started < 10


async def until(condition: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.05)


async def in_flight(session: aiohttp.ClientSession, gateway: GatewayProcess) -> float:
    async with session.get(f"{gateway.url}/metrics") as metrics:
        text = await metrics.text()
    (line,) = [line for line in text.splitlines() if line.startswith("dp_gateway_requests_in_flight ")]
    return float(line.split()[1])


async def test_sigterm_ends_streams_and_long_polls_and_exits_0(
    gateway: GatewayProcess, session: aiohttp.ClientSession
) -> None:
    promise_id = unique("stop")
    async with session.post(f"{gateway.url}/promises", json=create_body(promise_id)) as created:
        assert created.status == 201
    async with session.get(f"{gateway.url}/events") as stream:
        assert stream.status == 200
        assert (await stream.content.readline()).startswith(b":")  # the stream is open
        polling = asyncio.create_task(session.get(f"{gateway.url}/promises/{promise_id}?wait=5m"))
        deadline = time.monotonic() + 10
        while await in_flight(session, gateway) < 3:  # the stream, the poll and this scrape
            assert time.monotonic() < deadline, "the long-poll never reached the gateway"
        started = time.monotonic()
        assert await asyncio.to_thread(gateway.stop) == 0
        assert time.monotonic() - started < 20
        poll = await polling
        assert poll.status == 200 and (await poll.json())["state"] == "PENDING"  # answered with the record as it is
        assert (await stream.content.read()).strip() == b""  # the stream ended, with no event in it
