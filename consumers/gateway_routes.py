"""The gateway's route handlers: each reads a request's pieces, lets `dp.http` make the command, sends it
with the gateway's one client and writes what `dp.http` renders. No decision about the contract is made
here (see `dp/http.py`); errors are raised and the gateway's middleware answers them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Iterator
from typing import Final, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dp import http
from dp.client import Promises
from dp.errors import Refused, WaitTimeout
from dp.http import UNAVAILABLE, HttpError
from dp.http_query import events_filter, search_request, wait_seconds
from dp.openapi import generate
from dp.settings import GatewaySettings
from dp.wire import Event, encode

log = logging.getLogger("dp.gateway")

KEEPALIVE_S: Final = 15.0
"""An idle event stream sends a comment this often, so that proxies keep it open."""
LOOK_S: Final = 1.0
"""How often an event stream checks that its client is still connected."""
_OK: Final = encode(http.Status("ok"))
_SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _json(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json")


def _params(request: web.Request) -> list[tuple[str, str]]:
    return list(request.query.items())


def _connected(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing()


class Serving(Protocol):
    """What the handlers need of the gateway (`consumers.gateway.Gateway`)."""

    settings: GatewaySettings
    stopping: asyncio.Event
    registry: CollectorRegistry

    def ready_client(self) -> Promises:
        """The client, or an HttpError (503) while the gateway connects or stops."""
        ...


class Routes:
    """The handlers, bound to one gateway (its client, state, settings and metrics)."""

    def __init__(self, gateway: Serving) -> None:
        self.gateway = gateway
        self.openapi = generate().encode()
        self.followers = 0
        """Event streams open now."""

    def register(self, router: web.UrlDispatcher) -> None:
        for method, path, handler in (
            ("POST", "/promises", self.create),
            ("GET", "/promises", self.search),
            ("GET", "/promises/{id:.+}", self.read),
            ("PATCH", "/promises/{id:.+}", self.complete),
            ("POST", "/promises/subscribe/{id:.+}", self.subscribe),
            ("POST", "/promises/callback/{id:.+}", self.callback),
            ("GET", "/events", self.events),
            ("GET", "/ping", self.ping),
            ("GET", "/healthz", self.ping),
            ("GET", "/readyz", self.readyz),
            ("GET", "/metrics", self.metrics),
            ("GET", "/openapi.json", self.document),
        ):
            router.add_route(method, path, handler)

    # --- the durable promise API --------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        client = self.gateway.ready_client()
        command = http.create_command(await request.read(), request.headers)
        result = await client.send(command)
        return _respond(http.answer("create", result.reply, command.id))

    async def complete(self, request: web.Request) -> web.Response:
        client = self.gateway.ready_client()
        promise_id = request.match_info["id"]
        command = http.complete_command(promise_id, await request.read(), request.headers)
        result = await client.send(command)
        return _respond(http.answer("complete", result.reply, promise_id))

    async def read(self, request: web.Request) -> web.Response:
        client = self.gateway.ready_client()
        promise_id = request.match_info["id"]
        command = http.get_command(promise_id, request.headers)
        seconds = wait_seconds(_params(request), self.gateway.settings.max_wait)
        if seconds is not None:
            waited = await self._long_poll(promise_id, seconds)
            if waited is not None:
                return waited
        result = await client.send(command)
        return _respond(http.answer("get", result.reply, promise_id))

    async def subscribe(self, request: web.Request) -> web.Response:
        return await self._subscribe(request, callback=False)

    async def callback(self, request: web.Request) -> web.Response:
        return await self._subscribe(request, callback=True)

    async def _subscribe(self, request: web.Request, *, callback: bool) -> web.Response:
        client = self.gateway.ready_client()
        promise_id = request.match_info["id"]
        command, timeout = http.subscribe_command(promise_id, await request.read(), request.headers, callback=callback)
        result = await client.send(command)
        return _respond(http.subscribed(result.reply, promise_id, timeout))

    async def _long_poll(self, promise_id: str, seconds: float) -> web.Response | None:
        """The completed record once `wait` has it; None when the wait ended first (or the gateway is
        stopping): the caller then reads the record as it is now. A wait costs no consumer: every wait
        of the gateway shares its client's inbox."""
        client = self.gateway.ready_client()
        waiting = asyncio.ensure_future(client.wait(promise_id, timeout=seconds))
        stopping = asyncio.ensure_future(self.gateway.stopping.wait())
        try:
            await asyncio.wait((waiting, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not waiting.done():
                waiting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiting
        if waiting.cancelled():
            return None
        try:
            return _json(200, http.render_promise(waiting.result()))
        except WaitTimeout:
            return None
        except Refused as refused:  # no such promise (or an id the processor refused)
            return _respond(http.answer("get", refused.reply, promise_id))

    async def search(self, request: web.Request) -> web.Response:
        client = self.gateway.ready_client()
        query = search_request(_params(request))
        page = await client.search_page(query, request_id=http.request_id(request.headers))
        return _json(200, http.render_page(page.promises, page.cursor))

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events of state changes from now on, until the client leaves or the gateway stops.

        aiohttp does not cancel a handler whose client left, so the loop looks at the connection every
        second: a gone client releases its Kafka consumer within a second, not at the next event."""
        client = self.gateway.ready_client()
        prefix, types = events_filter(_params(request))
        positioned = asyncio.Event()
        with self._following():
            return await self._stream(
                request, client.events(prefix=prefix, types=types, positioned=positioned), positioned
            )

    async def _stream(
        self, request: web.Request, stream: AsyncGenerator[Event, None], positioned: asyncio.Event
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        stopping = asyncio.ensure_future(self.gateway.stopping.wait())
        following: asyncio.Future[Event] | None = None
        quiet_since = time.monotonic()
        try:
            # The comment says the stream is in place: every event after it arrives (clients may wait for it).
            following = asyncio.ensure_future(anext(stream))
            placed = asyncio.ensure_future(positioned.wait())
            await asyncio.wait((placed, following, stopping), return_when=asyncio.FIRST_COMPLETED)
            placed.cancel()
            await response.write(b": following dp events\n\n")
            while not stopping.done() and _connected(request):
                if following is None:
                    following = asyncio.ensure_future(anext(stream))
                await asyncio.wait((following, stopping), timeout=LOOK_S, return_when=asyncio.FIRST_COMPLETED)
                if following.done():
                    event, following = following.result(), None
                    await response.write(http.render_event(event))
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= KEEPALIVE_S:
                    await response.write(b": keep-alive\n\n")
                    quiet_since = time.monotonic()
        except (ConnectionResetError, StopAsyncIteration):
            pass  # the client left, or the client library closed the stream: nothing more to send
        except Exception:  # the headers are out: the stream can only end, so say why in the log
            log.exception("the event stream failed")
        finally:
            stopping.cancel()
            if following is not None and not following.done():
                following.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await following
            await stream.aclose()
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    @contextlib.contextmanager
    def _following(self) -> Iterator[None]:
        """Count an event stream for as long as it runs: each holds a Kafka consumer, so past `max_followers`
        of them a request is refused (503) rather than exhaust the brokers' connections."""
        limit = self.gateway.settings.max_followers
        if self.followers >= limit:
            raise HttpError(
                503, UNAVAILABLE, f"{limit} event streams are open already: retry later, or raise "
                "the gateway's --max-followers (DP_MAX_FOLLOWERS)",
            )  # fmt: skip
        self.followers += 1
        try:
            yield
        finally:
            self.followers -= 1

    # --- probes, metrics and the document -----------------------------------------------------

    async def ping(self, request: web.Request) -> web.Response:
        return _json(200, _OK)

    async def readyz(self, request: web.Request) -> web.Response:
        if not self.gateway.ready_client().healthy:
            raise HttpError(503, UNAVAILABLE, "the gateway lost its reply reader (Kafka failed): restart it")
        return _json(200, _OK)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.gateway.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def document(self, request: web.Request) -> web.Response:
        return _json(200, self.openapi)


def _respond(answer: http.Answer) -> web.Response:
    return _json(answer.status, answer.body)
