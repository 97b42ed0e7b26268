"""The `dp` command: operate a deployment (topics, serve), talk to it, and measure it.

The subcommands are modules of this package, each with a `register` function; this module imports
them and nothing imports this module. Exit codes: 0 success, 1 a refused (KO) outcome, 2 a usage or
connection problem, each with one sentence on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from dp.cli import bench, gateway, promises, serve, topics, webhooks
from dp.cli.options import EXIT_KO, EXIT_OK, EXIT_USAGE, Handler, quiet_client_logs
from dp.errors import DpError, Refused


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dp",
        description="Durable promises on Kafka: run the service and talk to it.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for subcommand in (topics, serve, gateway, webhooks, promises, bench):
        subcommand.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_client_logs()
    handler: Handler = args.handler
    try:
        return asyncio.run(handler(args))
    except DpError as error:
        print(f"dp: {error}", file=sys.stderr)
        return EXIT_KO if isinstance(error, Refused) else EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `dp watch | head`: the reader left, which is how such a pipeline ends
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
