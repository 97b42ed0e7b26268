"""The client subcommands of `dp`: create, resolve, reject, cancel, get, wait and watch.

Each opens a `Promises` client, does one thing and prints the outcome: human-readable by default, the
wire objects of docs/wire.md with `--json` (one per line for `watch`). Exit codes: `dp.cli.options`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final, get_args

from dp.cli.options import (
    EXIT_CODES,
    EXIT_KO,
    EXIT_OK,
    Subcommands,
    add_connection_flags,
    duration,
    kafka_from,
    topics_from,
)
from dp.client import DEFAULT_REPLY_TIMEOUT, Deadline, Promises, Result, target_id
from dp.errors import Refused, UsageError
from dp.wire import (
    Cancel,
    Event,
    EventType,
    Promise,
    Reject,
    Resolve,
    TopicTarget,
    Value,
    WebhookTarget,
    encode,
)

_COMPLETIONS: Final = (
    (Resolve, "resolve", "RESOLVED", "the promised work succeeded"),
    (Reject, "reject", "REJECTED", "the promised work failed"),
    (Cancel, "cancel", "REJECTED_CANCELED", "the promised work is no longer wanted"),
)


def register(commands: Subcommands[argparse.ArgumentParser]) -> None:
    """Add the client subcommands to the `dp` parser."""
    create = _subcommand(
        commands,
        "create",
        "create a pending promise",
        "Create a promise that stays PENDING until it is resolved, rejected or canceled, or until --timeout "
        "passes (then it is REJECTED_TIMEDOUT). Repeating it with the same --idempotency-key is harmless.",
    )
    create.add_argument(
        "--timeout",
        required=True,
        type=deadline,
        metavar="WHEN",
        help="required: when the promise times out, as a duration from now (30s, 5m, 1h, 2d) or a time with a "
        "zone (2030-01-01T00:00:00Z)",
    )
    _payload_options(create, "param")
    create.add_argument("--tag", action="append", type=key_value, default=[], metavar="K=V", help="a tag; repeatable")
    _key_options(create, "create", "refuse a repeated create once the promise is completed")
    create.set_defaults(handler=run_create)

    for kind, op, state, meaning in _COMPLETIONS:
        completion = _subcommand(
            commands,
            op,
            f"complete a pending promise as {state}",
            f"Complete a pending promise as {state} ({meaning}). Repeating it with the same --idempotency-key "
            "is harmless; completing a promise that is already completed is refused.",
        )
        _payload_options(completion, "value")
        _key_options(
            completion,
            op,
            f"refuse unless the promise ends {state}: without it, a repeat with the same key and any {op} of a "
            "timed-out promise succeed as no-ops",
        )
        completion.set_defaults(handler=run_complete, kind=kind)

    get = _subcommand(commands, "get", "show a promise", "Read a promise through the processor; exit 1 if none.")
    get.set_defaults(handler=run_get)

    wait = _subcommand(
        commands,
        "wait",
        "wait until a promise completes",
        "Wait until the promise is completed (also by timing out) and print its record; a completion that "
        "happened earlier counts too.",
        epilog="exit status: 0 resolved; 1 rejected, canceled, timed out or no such promise; 2 usage or "
        "connection error, or --timeout passed first",
    )
    wait.add_argument("--timeout", type=duration, metavar="DURATION", help="give up after this long (default: never)")
    wait.set_defaults(handler=run_wait)

    subscribe = _subcommand(
        commands,
        "subscribe",
        "be notified once when a promise completes",
        "Subscribe a webhook (--url, posted by `dp webhooks`) or a Kafka topic (--topic) to the promise: one "
        "notification goes there when it completes, in the same transaction as the completion, or at once if "
        "it is completed already. Repeating a subscription is harmless.",
    )
    where = subscribe.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="POST the notification here (an http:// or https:// URL)")
    where.add_argument("--topic", help="write the notification to this Kafka topic (not one of dp's own)")
    subscribe.add_argument("--partition", type=int, help="with --topic: this partition (default: by key)")
    subscribe.add_argument("--key", help="with --topic: the record key (default: the promise id)")
    subscribe.add_argument(
        "--header", action="append", type=key_value, default=[], metavar="K=V", help="with --url: a request header"
    )
    subscribe.add_argument(
        "--subscription", metavar="NAME", help="the subscription's id (default: one made from the target)"
    )
    subscribe.set_defaults(handler=run_subscribe)

    watch = _subcommand(
        commands,
        "watch",
        "print promise events as they happen",
        "Print every event (created, resolved, rejected, canceled, timedout) until Ctrl-C.",
        sends=False,
        epilog="exit status: 130 after Ctrl-C; 2 usage or connection error",
    )
    watch.add_argument("--prefix", help="only promises whose id starts with this")
    watch.add_argument(
        "--type", action="append", dest="types", choices=get_args(EventType), help="only this event type; repeatable"
    )
    watch.add_argument("--from-beginning", action="store_true", help="start from the oldest event kept, not now")
    watch.add_argument(
        "--group",
        help="consumer group: a restarted watch resumes after the last event it printed; watches sharing a group "
        "share the events",
    )
    watch.set_defaults(handler=run_watch, reply_timeout=DEFAULT_REPLY_TIMEOUT)


def _subcommand(
    commands: Subcommands[argparse.ArgumentParser],
    name: str,
    summary: str,
    description: str,
    *,
    sends: bool = True,
    epilog: str = EXIT_CODES,
) -> argparse.ArgumentParser:
    """A client subcommand: the promise id when it `sends` a command, output and Kafka options."""
    parser: argparse.ArgumentParser = commands.add_parser(name, help=summary, description=description, epilog=epilog)
    if sends:
        parser.add_argument("id", help="the promise id (any text up to 256 bytes, e.g. order/42)")
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print the wire JSON (docs/wire.md) instead of text")
    if sends:
        output.add_argument(
            "--reply-timeout",
            type=duration,
            default=DEFAULT_REPLY_TIMEOUT,
            metavar="DURATION",
            help="how long to wait for the processor's reply (default %(default)gs)",
        )
    add_connection_flags(parser)
    return parser


def _payload_options(parser: argparse.ArgumentParser, field: str) -> None:
    parser.add_argument(
        "--data", type=payload, metavar="TEXT|@FILE", help=f"the {field}'s data: TEXT, @FILE, or @- for stdin"
    )
    parser.add_argument(
        "--header", action="append", type=key_value, default=[], metavar="K=V", help=f"a {field} header; repeatable"
    )


def _key_options(parser: argparse.ArgumentParser, op: str, strict: str) -> None:
    parser.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help=f"makes a repeated {op} harmless: pass the same key to retry (default: a fresh key)",
    )
    parser.add_argument("--strict", action="store_true", help=strict)


# --- argument types -------------------------------------------------------------------------------


def deadline(text: str) -> Deadline:
    """A duration from now, or an absolute ISO 8601 time with a zone."""
    try:
        return duration(text)
    except argparse.ArgumentTypeError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (30s, 5m, 1h, 2d) nor a time with a zone (2030-01-01T00:00:00Z)"
        )
    return moment


def payload(text: str) -> bytes:
    """TEXT as UTF-8, or the bytes of @FILE (@- is stdin)."""
    if not text.startswith("@"):
        return text.encode()
    name = text[1:]
    try:
        return sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot read {name}: {error.strerror}") from None


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


# --- handlers -------------------------------------------------------------------------------------


def client(args: argparse.Namespace) -> Promises:
    return Promises(kafka=kafka_from(args), topics=topics_from(args), reply_timeout=args.reply_timeout)


async def run_create(args: argparse.Namespace) -> int:
    async with client(args) as promises:
        result = await promises.create(
            args.id,
            timeout=args.timeout,
            param=args.data,
            headers=dict(args.header),
            tags=dict(args.tag),
            idempotency_key=args.idempotency_key,
            strict=args.strict,
        )
    return report(result, args.json)


async def run_complete(args: argparse.Namespace) -> int:
    async with client(args) as promises:
        result = await promises.complete(
            args.kind,
            args.id,
            data=args.data,
            headers=dict(args.header),
            idempotency_key=args.idempotency_key,
            strict=args.strict,
        )
    return report(result, args.json)


async def run_get(args: argparse.Namespace) -> int:
    async with client(args) as promises:
        result = await promises.get(args.id)
    return report(result, args.json)


async def run_wait(args: argparse.Namespace) -> int:
    async with client(args) as promises:
        promise = await promises.wait(args.id, timeout=args.timeout)
    print(encode(promise).decode() if args.json else f"{promise.id}\n{describe(promise)}")
    return EXIT_OK if promise.state == "RESOLVED" else EXIT_KO


async def run_subscribe(args: argparse.Namespace) -> int:
    target: TopicTarget | WebhookTarget
    if args.url is not None:
        if args.partition is not None or args.key is not None:
            raise UsageError("--partition and --key go with --topic, not with --url.")
        target = WebhookTarget(args.url, dict(args.header))
    else:
        if args.header:
            raise UsageError("--header goes with --url, not with --topic.")
        target = TopicTarget(args.topic, args.partition, args.key)
    async with client(args) as promises:
        result = await promises.subscribe(args.id, target, subscription=args.subscription)
    if not args.json and result.ok:
        name = args.subscription or target_id(target)
        waiting = "waits for the completion" if result.reply.subscription is not None else "has been notified"
        print(f"subscription {name!r} {waiting}")
    return report(result, args.json)


async def run_watch(args: argparse.Namespace) -> int:
    async with client(args) as promises:
        events = promises.events(
            from_beginning=args.from_beginning, prefix=args.prefix, types=args.types, group=args.group
        )
        async for event in events:
            print(encode(event).decode() if args.json else one_line(event), flush=True)
    return EXIT_OK


# --- output ---------------------------------------------------------------------------------------


def report(result: Result, as_json: bool) -> int:
    """Print a reply (and, when refused, one sentence on stderr); the exit code says ok or KO."""
    if as_json:
        print(encode(result.reply).decode())
    elif result.promise is not None:
        print(f"{result.status} {result.promise.id}\n{describe(result.promise)}")
    if result.ok:
        return EXIT_OK
    print(f"dp: {Refused(result.reply)}", file=sys.stderr)
    return EXIT_KO


def describe(promise: Promise) -> str:
    """A promise record as aligned `name  value` lines."""
    rows = [
        ("state", promise.state),
        ("timeout", timestamp(promise.timeout)),
        ("created", stamped(promise.created_on, promise.idempotency_key_for_create)),
        ("param", shown(promise.param)),
    ]
    if promise.completed_on is not None:
        rows.append(("completed", stamped(promise.completed_on, promise.idempotency_key_for_complete)))
        rows.append(("value", shown(promise.value)))
    if promise.tags:
        rows.append(("tags", pairs(promise.tags.items())))
    return "\n".join(f"  {name:<10}{text}" for name, text in rows)


def one_line(event: Event) -> str:
    promise = event.promise
    carries = promise.value.data is not None or promise.value.headers
    value = f"  value {shown(promise.value)}" if carries else ""
    return f"{event.type:<9} {promise.id}  {promise.state}{value}"


def timestamp(millis: int) -> str:
    moment = datetime(1970, 1, 1) + timedelta(milliseconds=millis)
    return moment.isoformat(timespec="milliseconds") + "Z"


def stamped(millis: int, idempotency_key: str | None) -> str:
    return f"{timestamp(millis)}  (idempotency key {idempotency_key})" if idempotency_key else timestamp(millis)


def shown(value: Value) -> str:
    """Data as text when it is UTF-8 (else its size), then any headers."""
    if value.data is None:
        text = "(none)"
    else:
        try:
            text = value.data.decode()
        except UnicodeDecodeError:
            text = f"({len(value.data)} bytes, not UTF-8)"
    return f"{text}  [{pairs(value.headers.items())}]" if value.headers else text


def pairs(items: Iterable[tuple[str, str]]) -> str:
    return ", ".join(f"{key}={value}" for key, value in items)
