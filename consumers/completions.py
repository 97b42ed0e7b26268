"""A downstream consumer: print every completed promise as a JSON line, resuming where it left off.

    python -m consumers.completions --group billing-notifier [--from-beginning]

It is the pattern for writing one. Iterate `Promises.events()` with a consumer group and the event
types you care about; do the work for an event inside the loop body. The client commits an event when
the loop asks for the next one, so after a crash or restart the group resumes right after the last
event that was fully handled (the event in hand at a crash comes again: make its handling
idempotent, e.g. keyed by promise id). Run more processes with the same group to share the work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import Final, TextIO

from dp.client import Promises
from dp.errors import DpError
from dp.settings import Kafka, Topics, add_flags, from_flags
from dp.wire import EventType, encode

COMPLETIONS: Final[tuple[EventType, ...]] = ("resolved", "rejected", "canceled", "timedout")


async def forward(promises: Promises, group: str, from_beginning: bool, out: TextIO) -> None:
    """Write each completion event as one line of wire JSON (docs/wire.md); it is committed once written."""
    async for event in promises.events(group=group, types=COMPLETIONS, from_beginning=from_beginning):
        out.write(encode(event).decode() + "\n")
        out.flush()


async def run(args: argparse.Namespace) -> None:
    """Forward until SIGTERM or SIGINT, then leave the group cleanly so the others take over at once."""
    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main.cancel)
    with contextlib.suppress(asyncio.CancelledError):  # our own signal handler's doing: exit normally
        async with Promises(kafka=from_flags(Kafka, args), topics=from_flags(Topics, args)) as promises:
            await forward(promises, args.group, args.from_beginning, sys.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m consumers.completions",
        description="Print each completed promise (resolved, rejected, canceled, timed out) as a JSON event "
        "line; a restart with the same --group resumes after the last line printed.",
    )
    parser.add_argument("--group", required=True, help="consumer group: its committed position survives restarts")
    parser.add_argument(
        "--from-beginning",
        action="store_true",
        help="a group with no committed position starts at the oldest event kept (default: from now)",
    )
    add_flags(parser, Kafka, "Kafka connection")
    add_flags(parser, Topics, "topics")
    args = parser.parse_args(argv)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # a failure is reported once, below, in one sentence
    try:
        asyncio.run(run(args))
    except DpError as error:
        print(f"completions: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        print("completions: the output pipe closed; the event not written comes again on restart.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
