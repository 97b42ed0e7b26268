"""`dp bench`: throughput and latency of the whole pipeline beside a raw Kafka baseline (`dp.bench`), or with
--http creates through the HTTP gateway beside the client library's (`dp.bench_http`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from dp import bench_http, bench_soak, bench_waits
from dp.bench import BenchOptions, plot, render, require_plotting, run_bench
from dp.bench_http import HttpBenchOptions, run_http_bench
from dp.bench_soak import SoakOptions, run_soak
from dp.bench_waits import WaitBenchOptions, run_wait_bench
from dp.cli.options import EXIT_KO, EXIT_OK, Subcommands, add_connection_flags, kafka_from, topics_from

# The flags of the pipeline phases, which --http does not run: refused beside it rather than ignored.
PIPELINE_ONLY = {"promises": "--promises", "producers": "--producers", "rates": "--rates",
                 "latency_seconds": "--latency-seconds", "preload": "--preload", "restore": "--restore",
                 "plot": "--plot"}  # fmt: skip
HTTP_ONLY = {"clients": "--clients", "http_seconds": "--http-seconds", "warmup_seconds": "--warmup-seconds",
             "gateway": "--gateway"}  # fmt: skip


def register(commands: Subcommands[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "bench",
        help="measure throughput and latency beside a raw Kafka baseline (--http: the gateway beside the client)",
        description="Measure the pipeline: throughput (N promises created then resolved, flat out), latency "
        "(open loop at each of --rates, with the transactions/s the processors committed meanwhile), and the "
        "same throughput through a raw Kafka pipe of the processor's shape (the baseline, started by the "
        "benchmark on fresh topics). Targets the running processors, or with --spawn K starts K processors on "
        "fresh topics and removes them afterwards. --plot draws latency against offered rate. With --http it "
        "measures instead creates through the HTTP gateway beside the same creates through the client library, "
        "closed loop at each of --clients.",
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
    http = parser.add_argument_group(
        "HTTP mode",
        "--http runs only this comparison, not the phases above: for each of --clients, C concurrent clients "
        "create promises back to back (each sends its next create when its previous answer arrives) for "
        "--http-seconds after --warmup-seconds, first with POST /promises to the gateway (keep-alive, one "
        "connection per client), then with Promises.create sharing one client. Only 201 / `created` count; "
        "every other answer is an error, reported by status, and makes the exit status 1.",
    )
    http.add_argument("--http", action="store_true", help="measure the HTTP gateway beside the client library")
    http.add_argument(
        "--clients",
        type=positive_list,
        default=None,
        metavar="C1,C2,...",
        help=f"concurrent clients, one pair of phases each (default {','.join(map(str, HttpBenchOptions.clients))})",
    )
    http.add_argument(
        "--http-seconds",
        type=seconds(positive=True),
        default=None,
        help=f"measured length of each phase (default {HttpBenchOptions.seconds:g}; 3 with --quick)",
    )
    http.add_argument(
        "--warmup-seconds",
        type=seconds(positive=False),
        default=None,
        help=f"unmeasured start of each phase (default {HttpBenchOptions.warmup_seconds:g}; 1 with --quick)",
    )
    http.add_argument(
        "--gateway",
        metavar="URL",
        default=None,
        help=f"the running gateway to measure, serving the --topic-prefix topics (default "
        f"{bench_http.DEFAULT_GATEWAY}); with --spawn the benchmark starts its own on a free loopback port",
    )
    waits = parser.add_argument_group(
        "waits mode",
        "--waits N runs only this: one client process (a child of the benchmark) awaits N pending promises at "
        "once with Promises.as_completed, then they are resolved in random order; it prints the client's peak "
        "RSS, its Kafka connections, and p50/p99 from each completion to its wait returning.",
    )
    waits.add_argument("--waits", type=int, metavar="N", help="await N promises from one client (e.g. 100000)")
    soak = parser.add_argument_group(
        "soak mode",
        "--soak runs only this: one processor with --retention on fresh topics whose changelog compacts "
        "within a minute; promises are created and resolved at a steady rate, and at intervals the "
        "processor's RocksDB size, the changelog's records and a full restore's time are recorded; with "
        "--plot, drawn against time.",
    )
    soak.add_argument("--soak", action="store_true", help="run the soak (at least 10 minutes by default)")
    soak.add_argument("--soak-seconds", type=seconds(positive=True), default=None, help="length (default 600)")
    soak.add_argument("--soak-rate", type=int, default=None, help="promises a second (default 500)")
    soak.add_argument("--soak-interval", type=seconds(positive=True), default=None, help="between samples (30)")
    soak.add_argument("--soak-retention", type=seconds(positive=True), default=None, help="retention (10)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run (2,000 promises, 3 s of latency; with --http 1 s of warm-up and 3 s per phase)",
    )
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
    parsed = whole_numbers(text)
    if not parsed:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of rates: use positive integers, e.g. 200,1000,3000")
    return parsed


def positive_list(text: str) -> tuple[int, ...]:
    """Client counts from `10,100`."""
    parsed = whole_numbers(text)
    if not parsed:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of client counts: use positive integers, e.g. 10,100")
    return parsed


def whole_numbers(text: str) -> tuple[int, ...]:
    """Positive integers from `a,b,c`; empty when any part is not one."""
    try:
        parsed = tuple(int(part) for part in text.split(","))
    except ValueError:
        return ()
    return parsed if parsed and min(parsed) >= 1 else ()


def seconds(positive: bool) -> Callable[[str], float]:
    """A number of seconds: above zero, or (`positive=False`) at least zero."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not (value > 0 if positive else value >= 0):
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'positive ' if positive else ''}number of seconds")
        return value

    return parse


def one_rate(text: str) -> tuple[int, ...]:
    """`--rate R`, kept from before --rates: one offered rate."""
    parsed = rates(text)
    if len(parsed) != 1:
        raise argparse.ArgumentTypeError(f"--rate takes one rate, not {text!r}: use --rates for several")
    return parsed


def given(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    """The flags among `flags` whose value is not their default: what the user asked for."""
    defaults = {"promises": BenchOptions.promises, "producers": BenchOptions.producers, "rates": BenchOptions.rates,
                "latency_seconds": BenchOptions.latency_seconds, "preload": BenchOptions.preload}  # fmt: skip
    return [flag for name, flag in flags.items() if getattr(args, name) not in (None, False, defaults.get(name))]


def refuse(message: str) -> None:
    """A usage error in one sentence, exit 2, before anything starts (argparse's own way)."""
    print(f"dp bench: {message}", file=sys.stderr)
    raise SystemExit(2)


async def run(args: argparse.Namespace) -> int:
    if args.soak:
        return await run_soak_mode(args)
    if args.waits is not None:
        return await run_waits(args)
    if args.http:
        return await run_http(args)
    if mixed := given(args, HTTP_ONLY):
        refuse(f"the HTTP mode's flags ({', '.join(mixed)}) need --http: add it, or leave them out.")
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


async def run_soak_mode(args: argparse.Namespace) -> int:
    flags = {**PIPELINE_ONLY, **HTTP_ONLY, "http": "--http", "waits": "--waits", "spawn": "--spawn"}
    flags.pop("plot")
    if mixed := given(args, flags):
        refuse(f"--soak runs only the soak: leave out {', '.join(mixed)}, or run them without --soak.")
    if args.plot is not None:
        require_plotting()
    quick = args.quick
    options = SoakOptions(
        kafka=kafka_from(args),
        rate=args.soak_rate or SoakOptions.rate,
        seconds=args.soak_seconds or (20.0 if quick else SoakOptions.seconds),
        interval=args.soak_interval or (5.0 if quick else SoakOptions.interval),
        retention_s=args.soak_retention or SoakOptions.retention_s,
        partitions=args.partitions,
        progress=not args.json,
    )
    report = await run_soak(options)
    print(bench_soak.render(report, args.json))
    if args.plot is not None:
        bench_soak.plot(report, args.plot)
    return EXIT_OK


async def run_waits(args: argparse.Namespace) -> int:
    if mixed := given(args, {**PIPELINE_ONLY, **HTTP_ONLY, "http": "--http"}):
        refuse(f"--waits runs only the waits benchmark: leave out {', '.join(mixed)}, or run them without --waits.")
    if args.waits < 1:
        refuse(f"--waits {args.waits}: await at least one promise.")
    options = WaitBenchOptions(
        kafka=kafka_from(args),
        topics=topics_from(args),
        waits=1_000 if args.quick else args.waits,
        spawn=args.spawn,
        partitions=args.partitions,
        progress=not args.json,
    )
    report = await run_wait_bench(options)
    print(bench_waits.render(report, args.json))
    waited = report.waited
    if waited.wrong or waited.returned != report.waits:
        print(f"dp bench: {waited.returned} of {report.waits} waits returned, {waited.wrong} wrong.", file=sys.stderr)
        return EXIT_KO
    return EXIT_OK


async def run_http(args: argparse.Namespace) -> int:
    if mixed := given(args, PIPELINE_ONLY):
        refuse(f"--http runs only the HTTP comparison: leave out {', '.join(mixed)}, or run them without --http.")
    if args.spawn and args.gateway is not None:
        refuse("--spawn starts its own gateway: leave out --gateway, or --spawn to measure the one at --gateway.")
    kafka, topics = kafka_from(args), topics_from(args)
    options = HttpBenchOptions(
        kafka=kafka,
        topics=topics,
        clients=args.clients or HttpBenchOptions.clients,
        seconds=args.http_seconds or (3.0 if args.quick else HttpBenchOptions.seconds),
        warmup_seconds=(1.0 if args.quick else HttpBenchOptions.warmup_seconds)
        if args.warmup_seconds is None
        else args.warmup_seconds,
        gateway=args.gateway or HttpBenchOptions.gateway,
        spawn=args.spawn,
        partitions=args.partitions,
        progress=not args.json,
    )
    report = await run_http_bench(options)
    print(bench_http.render(report, args.json))
    if report.errors:
        print(f"dp bench: {report.errors} requests failed (see the errors by status above).", file=sys.stderr)
        return EXIT_KO
    return EXIT_OK
