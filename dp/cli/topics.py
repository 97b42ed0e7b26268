"""`dp topics create`: the deployment's six topics, created idempotently."""

from __future__ import annotations

import argparse

from dp.cli.options import EXIT_OK, Subcommands, add_connection_flags, kafka_from, topics_from
from dp.topics import DEFAULT_PARTITIONS, all_topics, check_configs, check_topics, create_topics


def register(commands: Subcommands[argparse.ArgumentParser]) -> None:
    topics = commands.add_parser("topics", help="manage the deployment's Kafka topics")
    actions = topics.add_subparsers(dest="topics_command", metavar="ACTION", required=True)
    create = actions.add_parser(
        "create",
        help="create the six topics (idempotent)",
        description="Create dp.commands, dp.events, dp.changelog (compacted), dp.replies and dp.dlq. "
        "Safe to run again; refuses when existing partition counts disagree.",
    )
    create.add_argument(
        "--partitions",
        type=int,
        default=None,
        help=f"partitions of every topic (default: the existing count, else {DEFAULT_PARTITIONS}); fixed for life",
    )
    create.add_argument("--replication-factor", type=int, default=1, help="default %(default)s")
    add_connection_flags(create)
    create.set_defaults(handler=run_create)
    check = actions.add_parser(
        "check",
        help="check that the topics exist and are configured as the processor needs",
        description="Check the six topics: they exist, commands, events and changelog share one partition "
        "count, every topic stamps records with the broker's time (LogAppendTime), the output topics take "
        "the largest record dp writes, and the changelog is compacted. `dp serve` checks the same at start. "
        "Exit 0 when all holds, else 2 with one sentence saying what to fix.",
    )
    add_connection_flags(check)
    check.set_defaults(handler=run_check)


async def run_check(args: argparse.Namespace) -> int:
    kafka, topics = kafka_from(args), topics_from(args)
    partitions = await check_topics(kafka, topics, every=True)
    await check_configs(kafka, topics)
    print(f"ok: {', '.join(all_topics(topics))} ({partitions} partitions) are as the processor needs")
    return EXIT_OK


async def run_create(args: argparse.Namespace) -> int:
    created = await create_topics(kafka_from(args), topics_from(args), args.partitions, args.replication_factor)
    print(f"created {', '.join(created)}" if created else "all topics exist; nothing to do")
    return EXIT_OK
