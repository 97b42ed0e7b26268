"""`dp bench`: throughput and latency of the whole pipeline beside a raw Kafka baseline (`dp.bench`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dp.bench import BenchOptions, plot, render, require_plotting, run_bench
from dp.cli.options import EXIT_OK, Subcommands, add_connection_flags, kafka_from, topics_from


def register(commands: Subcommands[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "bench",
        help="measure throughput and latency beside a raw Kafka baseline",
        description="Measure the pipeline: throughput (N promises created then resolved, flat out), latency "
        "(open loop at each of --rates, with the transactions/s the processors committed meanwhile), and the "
        "same throughput through a raw Kafka pipe of the processor's shape (the baseline, started by the "
        "benchmark on fresh topics). Targets the running processors, or with --spawn K starts K processors on "
        "fresh topics and removes them afterwards. --plot draws latency against offered rate.",
    )
    parser.add_argument(
        "--promises", type=int, default=BenchOptions.promises, help="N: 2N commands (default %(default)s)"
    )
    parser.add_argument(
        "--producers", type=int, default=BenchOptions.producers, help="concurrent producer tasks (default %(default)s)"
    )
    offered = parser.add_mutually_exclusive_group()
    offered.add_argument(
        "--rates",
        type=rates,
        default=BenchOptions.rates,
        metavar="R1,R2,...",
        help="offered commands/s of the latency phase, one phase per rate, each --latency-seconds long "
        f"(default {','.join(map(str, BenchOptions.rates))})",
    )
    offered.add_argument(
        "--rate", type=one_rate, dest="rates", metavar="R", help="one offered rate: the same as --rates R"
    )
    parser.add_argument(
        "--latency-seconds",
        type=float,
        default=BenchOptions.latency_seconds,
        help="length of the latency phase at each rate (default %(default)s)",
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
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="also draw latency (p50, p99) against offered rate into a PNG (needs the `plot` extra: matplotlib)",
    )
    add_connection_flags(parser)
    parser.set_defaults(handler=run)


def rates(text: str) -> tuple[int, ...]:
    """Offered rates from `200,1000,3000`: positive whole commands per second."""
    try:
        parsed = tuple(int(part) for part in text.split(","))
    except ValueError:
        parsed = ()
    if not parsed or min(parsed) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of rates: use positive integers, e.g. 200,1000,3000")
    return parsed


def one_rate(text: str) -> tuple[int, ...]:
    """`--rate R`, kept from before --rates: one offered rate."""
    parsed = rates(text)
    if len(parsed) != 1:
        raise argparse.ArgumentTypeError(f"--rate takes one rate, not {text!r}: use --rates for several")
    return parsed


async def run(args: argparse.Namespace) -> int:
    if args.plot is not None:
        require_plotting()
    quick = args.quick
    options = BenchOptions(
        kafka=kafka_from(args),
        topics=topics_from(args),
        promises=2_000 if quick else args.promises,
        producers=args.producers,
        rates=args.rates,
        latency_seconds=3.0 if quick else args.latency_seconds,
        spawn=args.spawn,
        partitions=args.partitions,
        progress=not args.json,
        preload=args.preload,
        restore=args.restore,
    )
    report = await run_bench(options)
    print(render(report, args.json))
    if args.plot is not None:
        plot(report, args.plot)
    return EXIT_OK
