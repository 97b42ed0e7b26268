"""`dp serve`: the launcher of a processor, the one place the library starts what `consumers/` runs."""

from __future__ import annotations

import argparse

from dp.cli.options import EXIT_OK, Subcommands, add_connection_flags, service_logs
from dp.settings import ProcessorSettings, add_flags, from_flags


def register(commands: Subcommands[argparse.ArgumentParser]) -> None:
    serving = commands.add_parser(
        "serve",
        help="run a processor (one member of the consumer group)",
        description="Apply commands from the commands topic, one single writer per partition, with state in "
        "RocksDB under --data-dir and replies, events and changelog written exactly once: one transaction per "
        "cycle for all the partitions this processor owns. Run several with the same --group to share the "
        "partitions, each with its own --data-dir. SIGTERM/SIGINT finish the transaction in flight and exit 0.",
    )
    add_flags(serving, ProcessorSettings, "processor")
    add_connection_flags(serving)
    serving.set_defaults(handler=run_serve)


async def run_serve(args: argparse.Namespace) -> int:
    from consumers.processor import serve

    settings = from_flags(ProcessorSettings, args)
    service_logs(settings.log_level)
    await serve(settings)
    return EXIT_OK
