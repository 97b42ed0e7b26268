"""`dp gateway`: the launcher of the HTTP gateway, the second place the library starts what `consumers/` runs."""

from __future__ import annotations

import argparse

from dp.cli.options import EXIT_OK, Subcommands, add_connection_flags, service_logs
from dp.settings import GatewaySettings, add_flags, from_flags


def register(commands: Subcommands[argparse.ArgumentParser]) -> None:
    gateway = commands.add_parser(
        "gateway",
        help="serve Resonate's durable promise HTTP API (docs/http.md) through the log",
        description="Answer HTTP requests (create, read, complete and search promises; long-poll, events, "
        "health and metrics) by sending commands through Kafka and rendering the processor's replies: run "
        "`dp serve` too. Any number of gateways can serve one deployment; give them the same --cursor-key. "
        "SIGTERM/SIGINT stop accepting, finish the requests in flight and exit 0.",
    )
    add_flags(gateway, GatewaySettings, "gateway")
    add_connection_flags(gateway)
    gateway.set_defaults(handler=run_gateway)


async def run_gateway(args: argparse.Namespace) -> int:
    from consumers.gateway import serve

    settings = from_flags(GatewaySettings, args)
    service_logs(settings.log_level)
    await serve(settings)
    return EXIT_OK
