"""The `dp` command: operate a deployment (topics, serve) and talk to it.

Exit codes: 0 success, 1 a refused (KO) outcome, 2 a usage or connection problem, each with one
sentence on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from dp.config import Kafka, Topics, env
from dp.errors import DpError, Refused
from dp.wire import DEFAULT_LIMITS

EXIT_OK, EXIT_KO, EXIT_USAGE = 0, 1, 2

Handler = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


def add_kafka_options(parser: argparse.ArgumentParser) -> None:
    """Flags every subcommand shares; each falls back to its DP_* environment variable."""
    defaults = Kafka()
    group = parser.add_argument_group("Kafka connection")
    group.add_argument(
        "--bootstrap-servers",
        default=defaults.bootstrap_servers,
        help="Kafka bootstrap servers (env DP_BOOTSTRAP_SERVERS, default %(default)s)",
    )
    group.add_argument(
        "--topic-prefix",
        default=Topics.from_env().commands.rsplit(".", 1)[0],
        help="prefix of the five topics (env DP_TOPIC_PREFIX, default %(default)s)",
    )
    group.add_argument(
        "--security-protocol",
        default=defaults.security_protocol,
        help="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (env DP_SECURITY_PROTOCOL)",
    )
    group.add_argument(
        "--sasl-mechanism", default=defaults.sasl_mechanism, help="e.g. PLAIN, SCRAM-SHA-256 (env DP_SASL_MECHANISM)"
    )
    group.add_argument("--sasl-username", default=defaults.sasl_username, help="env DP_SASL_USERNAME")
    group.add_argument("--sasl-password", default=defaults.sasl_password, help="env DP_SASL_PASSWORD")
    group.add_argument("--ssl-cafile", default=defaults.ssl_cafile, help="CA bundle for SSL (env DP_SSL_CAFILE)")


def kafka_from(args: argparse.Namespace) -> Kafka:
    return Kafka(
        bootstrap_servers=args.bootstrap_servers,
        security_protocol=args.security_protocol,
        sasl_mechanism=args.sasl_mechanism,
        sasl_username=args.sasl_username,
        sasl_password=args.sasl_password,
        ssl_cafile=args.ssl_cafile,
    )


def topics_from(args: argparse.Namespace) -> Topics:
    return Topics.with_prefix(args.topic_prefix)


async def topics_create(args: argparse.Namespace) -> int:
    from dp.topics import create_topics

    created = await create_topics(kafka_from(args), topics_from(args), args.partitions, args.replication_factor)
    print(f"created {', '.join(created)}" if created else "all topics exist; nothing to do")
    return EXIT_OK


async def serve(args: argparse.Namespace) -> int:
    from consumers.processor import ProcessorSettings, serve
    from dp.wire import Limits

    logging.getLogger("dp").setLevel(args.log_level)
    # aiokafka logs each transient failure; the processor reports the ones that matter, once, in its words.
    logging.getLogger("aiokafka").setLevel(logging.WARNING if args.log_level == "DEBUG" else logging.CRITICAL)
    settings = ProcessorSettings(
        kafka=kafka_from(args),
        topics=topics_from(args),
        group=args.group,
        data_dir=Path(args.data_dir),
        max_batch=args.max_batch,
        limits=Limits(max_record_bytes=args.max_record_bytes, max_data_bytes=args.max_data_bytes),
    )
    await serve(settings)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dp",
        description="Durable promises on Kafka: run the service and talk to it.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    topics = commands.add_parser("topics", help="manage the deployment's Kafka topics")
    topic_commands = topics.add_subparsers(dest="topics_command", metavar="ACTION", required=True)
    create = topic_commands.add_parser(
        "create",
        help="create the five topics (idempotent)",
        description="Create dp.commands, dp.events, dp.changelog (compacted), dp.replies and dp.dlq. "
        "Safe to run again; refuses when existing partition counts disagree.",
    )
    create.add_argument(
        "--partitions",
        type=int,
        default=None,
        help="partitions of every topic (default: the existing count, else 8); fixed for life",
    )
    create.add_argument("--replication-factor", type=int, default=1, help="default %(default)s")
    add_kafka_options(create)
    create.set_defaults(handler=topics_create)

    serving = commands.add_parser(
        "serve",
        help="run a processor (one member of the consumer group)",
        description="Apply commands from the commands topic, one single writer per partition, with state in "
        "RocksDB under --data-dir and replies, events and changelog written exactly once. Run several with "
        "the same --group to share the partitions. SIGTERM/SIGINT finish the batch in flight and exit 0.",
    )
    serving.add_argument(
        "--group",
        default=env("DP_GROUP", "dp"),
        help="application id: consumer group and transactional-id prefix (env DP_GROUP)",
    )
    serving.add_argument(
        "--data-dir", default=env("DP_DATA_DIR", "data"), help="RocksDB root (env DP_DATA_DIR, default %(default)s)"
    )
    serving.add_argument(
        "--max-batch",
        type=int,
        default=int(env("DP_MAX_BATCH", "2000")),
        help="most commands fetched per poll (env DP_MAX_BATCH, default %(default)s)",
    )
    serving.add_argument(
        "--max-record-bytes",
        type=int,
        default=DEFAULT_LIMITS.max_record_bytes,
        help="largest command accepted (default %(default)s)",
    )
    serving.add_argument(
        "--max-data-bytes",
        type=int,
        default=DEFAULT_LIMITS.max_data_bytes,
        help="largest decoded param/value data accepted (default %(default)s)",
    )
    serving.add_argument(
        "--log-level",
        default=env("DP_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="env DP_LOG_LEVEL",
    )
    add_kafka_options(serving)
    serving.set_defaults(handler=serve)

    # Imported here, not at the top: these modules build on this one.
    from dp import bench
    from dp.commands import register

    register(commands)
    bench.register(commands)
    return parser


def quiet_client_logs() -> None:
    """aiokafka logs every failed connection attempt; our own error says it once, in one sentence."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


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


if __name__ == "__main__":
    sys.exit(main())
