"""What every `dp` subcommand shares: exit codes, the connection flags and the argument types.

Subcommand modules import this module and nothing else of the CLI; `dp.cli.main` imports them.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Final

from dp.durations import duration_seconds
from dp.settings import Kafka, Topics, add_flags, from_flags

EXIT_OK, EXIT_KO, EXIT_USAGE = 0, 1, 2
EXIT_CODES: Final = "exit status: 0 ok, 1 refused (a KO status, explained on stderr), 2 usage or connection error"

Handler = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]
Subcommands = argparse._SubParsersAction


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """The Kafka connection and topic prefix flags, each falling back to its DP_* variable."""
    add_flags(parser, Kafka, "Kafka connection")
    add_flags(parser, Topics, "topics")


def kafka_from(args: argparse.Namespace) -> Kafka:
    return from_flags(Kafka, args)


def topics_from(args: argparse.Namespace) -> Topics:
    return from_flags(Topics, args)


def quiet_client_logs() -> None:
    """aiokafka logs every failed connection attempt; our own error says it once, in one sentence."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


def service_logs(level: str) -> None:
    """A long-running service's logs: dp's at `level`. aiokafka logs each transient failure; dp reports the
    ones that matter, once, in its own words, so aiokafka's show only when debugging."""
    logging.getLogger("dp").setLevel(level)
    logging.getLogger("aiokafka").setLevel(logging.WARNING if level == "DEBUG" else logging.CRITICAL)


def duration(text: str) -> float:
    """Seconds from `30s`, `5m`, `1h`, `2d`, `250ms` or a plain number of seconds."""
    try:
        return duration_seconds(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: use e.g. 30s, 5m, 1h or 2d") from None
