"""`dp topics create` and `dp topics check`: the deployment's six topics, created idempotently with dp's
settings (docs/topics.md), and checked for what the processor needs and for drift from those settings."""

from __future__ import annotations

import argparse

from dp.cli.options import EXIT_OK, Subcommands, add_connection_flags, kafka_from, topics_from
from dp.topics import (
    DEFAULT_PARTITIONS,
    all_topics,
    check_configs,
    check_topics,
    create_topics,
    update_configs,
)


def register(commands: Subcommands[argparse.ArgumentParser]) -> None:
    topics = commands.add_parser("topics", help="manage the deployment's Kafka topics")
    actions = topics.add_subparsers(dest="topics_command", metavar="ACTION", required=True)
    create = actions.add_parser(
        "create",
        help="create the six topics (idempotent)",
        description="Create dp.commands, dp.events, dp.changelog (compacted), dp.replies, dp.dlq and "
        "dp.notifications with dp's settings: retention, compaction, broker timestamps and record sizes "
        "(docs/topics.md). Safe to run again; refuses when existing partition counts disagree.",
    )
    create.add_argument(
        "--partitions",
        type=int,
        default=None,
        help=f"partitions of every topic (default: the existing count, else {DEFAULT_PARTITIONS}); fixed for life",
    )
    create.add_argument("--replication-factor", type=int, default=1, help="default %(default)s")
    create.add_argument(
        "--update-configs",
        action="store_true",
        help="also set each setting of the existing topics that `dp topics check` reports to dp's value, "
        "keeping every other setting made on them",
    )
    add_connection_flags(create)
    create.set_defaults(handler=run_create)
    check = actions.add_parser(
        "check",
        help="check that the topics exist and are configured as the processor needs",
        description="Check the six topics: they exist, commands, events and changelog share one partition "
        "count, and every setting `dp topics create` makes holds (docs/topics.md): broker timestamps "
        "(LogAppendTime), room for the largest record dp writes, a compacted changelog whose compaction "
        "runs, and each topic's retention. A value on the safe side of dp's counts (a longer retention of "
        "events, a shorter segment). `dp serve` checks at start only what it cannot run without. Exit 0 "
        "when all holds, else 2 with one sentence naming each drifted setting and the fix.",
    )
    add_connection_flags(check)
    check.set_defaults(handler=run_check)


async def run_check(args: argparse.Namespace) -> int:
    kafka, topics = kafka_from(args), topics_from(args)
    partitions = await check_topics(kafka, topics, every=True)
    await check_configs(kafka, topics, every=True)
    print(f"ok: {', '.join(all_topics(topics))} ({partitions} partitions) have dp's settings")
    return EXIT_OK


async def run_create(args: argparse.Namespace) -> int:
    kafka, topics = kafka_from(args), topics_from(args)
    created = await create_topics(kafka, topics, args.partitions, args.replication_factor)
    updated = await update_configs(kafka, topics) if args.update_configs else []
    if created:
        print(f"created {', '.join(created)}")
    if updated:
        print(f"updated {', '.join(updated)}")
    if not created and not updated:
        print("all topics exist; nothing to do")
    return EXIT_OK
