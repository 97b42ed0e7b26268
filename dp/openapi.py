"""The HTTP contract's OpenAPI 3.1 document, generated from `dp.http`'s types: `python -m dp.openapi [PATH]`.

Like `docs/wire.schema.json`, the document is derived, never edited by hand: the schemas come from the
msgspec types the gateway decodes and encodes with (`msgspec.json.schema_components`), and the paths
below name them. A test checks that the committed `docs/openapi.json` is current; the gateway serves the
same document at `GET /openapi.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Final

import msgspec

from dp.http import (
    CallbackRequest,
    CompleteRequest,
    CreateRequest,
    ErrorBody,
    PromiseView,
    SearchPage,
    Status,
    SubscribeRequest,
    SubscriptionBody,
)
from dp.schema import write_generated
from dp.wire import MAX_SEARCH_LIMIT

DEFAULT_PATH: Final = Path(__file__).resolve().parents[1] / "docs" / "openapi.json"
_REF: Final = "#/components/schemas/{name}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("ErrorBody"), description)


def _header(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"in": "header", "name": name, "description": description, "schema": schema or {"type": "string"}}


def _query(name: str, description: str, schema: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"in": "query", "name": name, "description": description, "schema": schema or {"type": "string"}, **extra}


_REQUEST_ID: Final = _header("Request-Id", "correlation id, the command's requestId; generated when absent")
_KEY: Final = _header("Idempotency-Key", 'the command\'s key: absent is null (matches nothing), empty is the key ""')
_STRICT: Final = _header(
    "Strict", "true/false/1/0/t/f, any case; absent is false", {"type": "string", "enum": ["true", "false"]}
)
_ID: Final = {
    "in": "path",
    "name": "id",
    "required": True,
    "description": "the promise id; it may contain `/` (or `%2F`)",
    "schema": {"type": "string"},
}
_COMMON_ERRORS: Final = {
    "400": _error("malformed request (code 40000)"),
    "401": _error("missing or wrong bearer token, when the gateway has tokens (code 40100)"),
    "503": _error("shutting down or overloaded (code 50300)"),
    "504": _error("no answer from the log in time; the command may still be applied (code 50400)"),
}


def _paths() -> dict[str, Any]:
    promise = _json(_ref("PromiseView"), "the promise")
    text = {"text/plain": {"schema": {"type": "string"}}}
    return {
        "/promises": {
            "post": {
                "summary": "Create a promise",
                "operationId": "createPromise",
                "parameters": [_REQUEST_ID, _KEY, _STRICT],
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("CreateRequest")}}},
                "responses": {
                    "201": _json(_ref("PromiseView"), "created (timed out at once if its timeout is past)"),
                    "200": _json(_ref("PromiseView"), "deduplicated: the promise as stored now"),
                    "409": _error("already exists (code 40900)"),
                    **_COMMON_ERRORS,
                },
            },
            "get": {
                "summary": "Search promises, newest first, linearizable across partitions",
                "operationId": "searchPromises",
                "parameters": [
                    _REQUEST_ID,
                    _query("id", "id pattern, `*` matches any run of characters; required unless cursor"),
                    _query("state", "state filter", {"type": "string", "enum": ["pending", "resolved", "rejected"]}),
                    _query(
                        "tags",
                        "tags[k]=v, all must match",
                        {"type": "object", "additionalProperties": {"type": "string"}},
                        style="deepObject",
                        explode=True,
                    ),
                    _query(
                        "limit",
                        f"page size, 1 to {MAX_SEARCH_LIMIT} (0 or absent: {MAX_SEARCH_LIMIT})",
                        {"type": "integer", "minimum": 0, "maximum": MAX_SEARCH_LIMIT},
                    ),
                    _query("cursor", "from a previous page; the other parameters are then ignored"),
                ],
                "responses": {"200": _json(_ref("SearchPage"), "one page"), **_COMMON_ERRORS},
            },
        },
        "/promises/{id}": {
            "get": {
                "summary": "Read a promise (optionally long-poll until it is completed)",
                "operationId": "readPromise",
                "parameters": [
                    _ID,
                    _REQUEST_ID,
                    _query("wait", "long-poll up to this long (500ms, 30s, 2m or seconds), then answer either way"),
                ],
                "responses": {"200": promise, "404": _error("not found (code 40400)"), **_COMMON_ERRORS},
            },
            "patch": {
                "summary": "Complete a promise",
                "operationId": "completePromise",
                "parameters": [_ID, _REQUEST_ID, _KEY, _STRICT],
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("CompleteRequest")}}},
                "responses": {
                    "201": _json(_ref("PromiseView"), "completed by this request"),
                    "200": _json(_ref("PromiseView"), "deduplicated: the promise as stored"),
                    "403": _error(
                        "already completed (40301 resolved, 40302 rejected, 40303 canceled, 40304 timed out)"
                    ),
                    "404": _error("not found (code 40400)"),
                    **_COMMON_ERRORS,
                },
            },
        },
        "/promises/subscribe/{id}": {
            "post": _subscribe_operation(
                "subscribePromise", "Be notified of a promise's completion (webhook or Kafka topic)", "SubscribeRequest"
            )
        },
        "/promises/callback/{id}": {
            "post": _subscribe_operation(
                "callbackPromise", "Register a root promise's callback (delivered as a notification)", "CallbackRequest"
            )
        },
        "/events": {
            "get": {
                "summary": "Server-Sent Events of promise state changes, from now on",
                "operationId": "events",
                "parameters": [
                    _query("prefix", "only promises whose id starts with this"),
                    _query("types", "comma-separated: created, resolved, rejected, canceled, timedout"),
                ],
                "responses": {
                    "200": {
                        "description": "`event: <type>` and `data: <promise JSON>` per message",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_COMMON_ERRORS,
                },
            }
        },
        "/ping": {"get": {"summary": "Liveness, as Resonate answers it", "responses": {"200": _status()}}},
        "/healthz": {"get": {"summary": "The process is alive", "responses": {"200": _status()}}},
        "/readyz": {
            "get": {
                "summary": "Connected to Kafka, replies assigned",
                "responses": {"200": _status(), "503": _error("not ready (code 50300)")},
            }
        },
        "/metrics": {
            "get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text", "content": text}}}
        },
        "/openapi.json": {
            "get": {"summary": "This document", "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")}}
        },
    }


def _subscribe_operation(operation: str, summary: str, body: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "operationId": operation,
        "parameters": [_ID, _REQUEST_ID],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(body)}}},
        "responses": {
            "201": _json(_ref("SubscriptionBody"), "subscribed: notified once the promise completes"),
            "200": _json(_ref("SubscriptionBody"), "already subscribed, or the promise is completed (callback null)"),
            "404": _error("not found (code 40400)"),
            **_COMMON_ERRORS,
        },
    }


def _status() -> dict[str, Any]:
    return _json(_ref("Status"), '{"status": "ok"}')


def document() -> dict[str, Any]:
    """The OpenAPI document as a dict (what `GET /openapi.json` serves)."""
    _, schemas = msgspec.json.schema_components(
        (
            CreateRequest,
            CompleteRequest,
            SubscribeRequest,
            CallbackRequest,
            PromiseView,
            SubscriptionBody,
            SearchPage,
            ErrorBody,
            Status,
        ),
        ref_template=_REF,
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dp durable promises",
            "version": "1",
            "description": "Resonate's durable promise HTTP API, served through the log by the dp gateway. "
            "See docs/http.md.",
        },
        "servers": [{"url": "http://127.0.0.1:8001"}],
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
        "paths": _paths(),
    }


def generate() -> str:
    """The committed text of `docs/openapi.json`."""
    return json.dumps(document(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> None:
    write_generated(generate(), argv, DEFAULT_PATH)


if __name__ == "__main__":
    main(sys.argv[1:])
