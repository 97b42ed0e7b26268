"""`dp bench`: throughput and latency of the whole pipeline beside a raw Kafka baseline (`dp.bench`)."""

from __future__ import annotations

import argparse

from dp.bench import BenchOptions, render, run_bench
from dp.cli.options import EXIT_OK, Subcommands, add_connection_flags, kafka_from, topics_from


def register(commands: Subcommands[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "bench",
        help="measure throughput and latency beside a raw Kafka baseline",
        description="Measure the pipeline: throughput (N promises created then resolved, flat out), latency "
        "(open loop at --rate), and the same throughput through a raw Kafka pipe of the processor's shape "
        "(the baseline, started by the benchmark on fresh topics). Targets the running processors, or with "
        "--spawn K starts K processors on fresh topics and removes them afterwards.",
    )
    parser.add_argument(
        "--promises", type=int, default=BenchOptions.promises, help="N: 2N commands (default %(default)s)"
    )
    parser.add_argument(
        "--producers", type=int, default=BenchOptions.producers, help="concurrent producer tasks (default %(default)s)"
    )
    parser.add_argument(
        "--rate", type=int, default=BenchOptions.rate, help="offered commands/s for latency (default %(default)s)"
    )
    parser.add_argument(
        "--latency-seconds",
        type=float,
        default=BenchOptions.latency_seconds,
        help="length of the latency phase (default %(default)s)",
    )
    parser.add_argument(
        "--spawn", type=int, default=BenchOptions.spawn, metavar="K", help="start K processors on fresh topics"
    )
    parser.add_argument(
        "--partitions", type=int, default=BenchOptions.partitions, help="partitions of the fresh topics with --spawn"
    )
    parser.add_argument(
        "--preload",
        type=int,
        default=BenchOptions.preload,
        metavar="M",
        help="create M promises first (untimed), to measure a full store against an empty one",
    )
    parser.add_argument(
        "--restore",
        action="store_true",
        help="with --spawn: then stop the processors and time a new one restoring into an empty dir",
    )
    parser.add_argument("--quick", action="store_true", help="a short run (2,000 promises, 3 s of latency)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_connection_flags(parser)
    parser.set_defaults(handler=run)


async def run(args: argparse.Namespace) -> int:
    quick = args.quick
    options = BenchOptions(
        kafka=kafka_from(args),
        topics=topics_from(args),
        promises=2_000 if quick else args.promises,
        producers=args.producers,
        rate=args.rate,
        latency_seconds=3.0 if quick else args.latency_seconds,
        spawn=args.spawn,
        partitions=args.partitions,
        progress=not args.json,
        preload=args.preload,
        restore=args.restore,
    )
    print(render(await run_bench(options), args.json))
    return EXIT_OK
