"""`dp gateway`: Resonate's durable promise HTTP API (docs/http.md), served through the log.

Every request becomes a command sent with one `dp.client.Promises` per process (one producer, one reply
reader): the pure contract `dp.http` decides what a request means and what its reply says, and the
handlers in `consumers/gateway_routes.py` only move bytes between aiohttp and the client. This module is
the shell around them: the process's lifecycle, the middleware that gives every response a JSON body
and counts it, bearer-token auth, and a graceful stop.

The HTTP server listens before Kafka answers, so that an orchestrator sees the process alive (`/healthz`)
and not yet ready (`/readyz` 503) while the client connects with a backoff; API requests get 503 until
then. SIGTERM/SIGINT: stop accepting, end long-polls and event streams, let requests in flight finish
(bounded), close the client, return.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hmac
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import LineTooLong
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from consumers.gateway_routes import Routes
from dp.client import Promises
from dp.errors import DpError
from dp.http import UNAVAILABLE, HttpError, error_body, failure, unauthorized
from dp.settings import GatewaySettings

log = logging.getLogger("dp.gateway")

# A create may carry 512 KiB of data, 683 KiB in base64, plus headers and tags: the record limit is 1 MiB.
# Half as much again leaves room for JSON whitespace, and still refuses a body before it costs memory.
MAX_BODY_BYTES: Final = 1536 * 1024
MAX_LINE_BYTES: Final = 8190  # the request line (aiohttp's default): a promise id is at most 256 bytes
MAX_FIELD_BYTES: Final = 8190  # one header
DRAIN_S: Final = 15.0  # the longest a stop waits for requests in flight, beyond the reply timeout's bound
CONNECT_BACKOFF_S: Final = (0.5, 1.0, 2.0, 5.0, 10.0)
OPEN_PATHS: Final = frozenset(("/ping", "/healthz", "/readyz", "/metrics"))
"""Routes that answer without a token and while the client is not ready: probes and scrapers."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Lifecycle(enum.Enum):
    """The gateway's states: CONNECTING (listening, client not started), READY, STOPPING, STOPPED."""

    CONNECTING = "connecting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Metrics:
    """The gateway's Prometheus metrics, in a registry of its own (never the process-global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dp_gateway_requests", "HTTP requests answered, by route, method and status",
            ("route", "method", "status"), registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "dp_gateway_request_duration_seconds", "time to answer an HTTP request, by route and method",
            ("route", "method"), registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )  # fmt: skip
        self.in_flight = Gauge("dp_gateway_requests_in_flight", "HTTP requests being answered", registry=self.registry)
        self.ready = Gauge("dp_gateway_ready", "1 when connected to Kafka and serving", registry=self.registry)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)


def json_response(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


class Gateway:
    """One gateway process: the aiohttp application, its client, its state and its metrics."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.state = Lifecycle.CONNECTING
        self.client: Promises | None = None
        self.metrics = Metrics()
        self.registry = self.metrics.registry
        self.stopping = asyncio.Event()
        self._tokens = tuple(token.encode() for token in settings.token_list)
        self.routes = Routes(self)
        self.app = web.Application(
            client_max_size=MAX_BODY_BYTES, middlewares=(self._observe, self._guard), handler_args=_PARSER_LIMITS
        )
        self.routes.register(self.app.router)

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Listen, connect the client (retrying until it works or the gateway stops), serve until `stop()`."""
        host, port = self.settings.address
        runner = _Runner(self.app, access_log=None, shutdown_timeout=min(self.settings.reply_timeout, DRAIN_S) + 1)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, backlog=1024).start()
            log.info("listening on http://%s:%d", host, port)
            await self._connect()
            await self.stopping.wait()
        finally:
            self.state = Lifecycle.STOPPING
            self.metrics.ready.set(0)
            log.info("stopping: finishing the requests in flight")
            await runner.cleanup()
            if self.client is not None:
                await self.client.close()
            self.state = Lifecycle.STOPPED
            log.info("stopped")

    def stop(self) -> None:
        """Begin a graceful stop (signal handlers call this): long-polls and event streams end at once."""
        if self.state is not Lifecycle.STOPPED:
            self.state = Lifecycle.STOPPING
        self.stopping.set()

    async def _connect(self) -> None:
        """Start the client, again and again with a backoff until it starts; a stop cancels the attempt."""
        attempt = 0
        while not self.stopping.is_set():
            client = Promises(
                kafka=self.settings.kafka,
                topics=self.settings.topics,
                reply_timeout=self.settings.reply_timeout,
                cursor_key=self.settings.cursor_key.encode() if self.settings.cursor_key else None,
            )
            starting = asyncio.ensure_future(client.start())
            if not await self._before_stop(starting):
                await client.close()
                return
            error = starting.exception()
            if error is None:
                self.client = client
                self.state = Lifecycle.READY
                self.metrics.ready.set(1)
                log.info("ready: %d partitions, replies on partition %s", client.partitions, client.reply_partition)
                return
            delay = CONNECT_BACKOFF_S[min(attempt, len(CONNECT_BACKOFF_S) - 1)]
            attempt += 1
            detail = str(error) if isinstance(error, DpError) else repr(error)
            log.warning("not connected to Kafka yet (%s); retrying in %.1fs", detail, delay)
            await self._before_stop(asyncio.ensure_future(asyncio.sleep(delay)))

    async def _before_stop(self, work: asyncio.Future[None]) -> bool:
        """Whether `work` ended before a stop began; if not, it is cancelled (and awaited)."""
        stopping = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait((work, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
        return not work.cancelled()

    def ready_client(self) -> Promises:
        """The client, for a handler; 503 while connecting or stopping."""
        client = self.client
        if self.state is not Lifecycle.READY or client is None:
            raise HttpError(503, UNAVAILABLE, _NOT_SERVING[self.state])
        return client

    # --- middleware ---------------------------------------------------------------------------

    @web.middleware
    async def _observe(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Count and time every request, and give every error a JSON body (aiohttp's own 404, 405, 413 too)."""
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        started = time.perf_counter()
        self.metrics.in_flight.inc()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as error:
            if error.status < 400:
                status = error.status
                raise
            status, code, message = error.status, error.status * 100, _http_message(request, error)
            return json_response(status, error_body(code, message), _kept_headers(error))
        except asyncio.CancelledError:
            status = 499  # the client went away (or the stop's bound cancelled the handler)
            raise
        except Exception as error:
            answer = failure(error, _NOT_SERVING[Lifecycle.STOPPING])
            status = answer.status
            if status == 500:
                log.exception("%s %s failed", request.method, request.path)
            return json_response(status, answer.body(), answer.headers)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.observe(route, request.method, status, time.perf_counter() - started)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Bearer-token auth when the gateway has tokens (probes and metrics exempt)."""
        if self._tokens and request.path not in OPEN_PATHS and not self._authorized(request):
            raise unauthorized()
        return await handler(request)

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = token.strip().encode()
        # Compare with every token, without stopping at a match, so timing tells nothing about which.
        return sum(hmac.compare_digest(given, expected) for expected in self._tokens) > 0


_NOT_SERVING: Final = {
    Lifecycle.CONNECTING: "the gateway is not connected to Kafka yet: retry in a moment.",
    Lifecycle.READY: "the gateway is not connected to Kafka: retry in a moment.",
    Lifecycle.STOPPING: "the gateway is shutting down: retry on another gateway, or in a moment.",
    Lifecycle.STOPPED: "the gateway is shutting down: retry on another gateway, or in a moment.",
}
_PARSER_LIMITS: Final = {"max_line_size": MAX_LINE_BYTES, "max_field_size": MAX_FIELD_BYTES}


def _http_message(request: web.Request, error: web.HTTPException) -> str:
    if error.status == 404:
        return f"there is no route {request.method} {request.path}: see GET /openapi.json for the routes."
    if error.status == 405:
        allowed = error.headers.get("Allow", "")
        return f"{request.method} is not allowed on {request.path}: use {allowed or 'another method'}."
    if error.status == 413:
        return f"the body is over {MAX_BODY_BYTES} bytes: send less data (at most 512 KiB decoded per payload)."
    return f"{error.reason}: {error.text or 'see docs/http.md'}"


def _kept_headers(error: web.HTTPException) -> dict[str, str]:
    return {name: error.headers[name] for name in ("Allow", "WWW-Authenticate") if name in error.headers}


class _JsonErrors(web_protocol.RequestHandler):
    """Requests aiohttp refuses before any handler runs (a malformed request line, a header over the limit)
    get the same JSON error body as every other response, not aiohttp's plain text; and a debug line, not
    a traceback at ERROR, since any client on the network can send them."""

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the response has begun: the error cannot be sent")  # as aiohttp's own does
        if status >= 500:
            log.error("failed to read a request from %s", request.remote, exc_info=exc)
        else:
            log.debug("refused a request from %s: %r", request.remote, exc)
        if isinstance(exc, LineTooLong):
            text = f"the request line or a header is over {MAX_FIELD_BYTES} bytes: send shorter headers."
        elif status < 500:
            text = "the request is not valid HTTP/1.1: fix the client."
        else:
            text = "the gateway failed to read the request: retry, and report it if it persists."
        response = json_response(status, error_body(status * 100, text))
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _JsonErrors(self, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    """An AppRunner whose connections answer protocol errors in JSON (see `_JsonErrors`)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server
        return server


async def serve(settings: GatewaySettings) -> None:
    """Run a gateway until SIGTERM or SIGINT."""
    gateway = Gateway(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, gateway.stop)
    await gateway.run()
