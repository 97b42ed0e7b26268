"""`dp bench --quick` runs end to end and prints the JSON it promises (a check, not a timing assertion).

The same for `dp bench --http`, whose timing targets live in docs/benchmarks.md, never here: a test
machine's speed is not the code's.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dp.bench_http import CPU_SOURCES, closed_loop
from dp.bench_soak import Sample, SoakReport
from tests.support import REPO

FIELDS = {
    "commands", "seconds", "throughput", "baseline_throughput", "ratio", "p50_ms", "p90_ms", "p99_ms",
    "p999_ms", "max_ms", "partitions", "processors", "offered_rate", "rates",
}  # fmt: skip
RATE_FIELDS = {"offered_rate", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "commands", "transactions_per_s"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HTTP_FIELDS = {"mode", "gateway", "processors", "partitions", "seconds", "warmup_seconds", "cores", "phases", "errors"}
PHASE_FIELDS = {
    "face", "clients", "seconds", "created", "creates_per_s", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms",
    "errors", "cpu_percent",
}  # fmt: skip


def test_quick_bench_at_two_rates_prints_one_json_object_and_plots_them(bootstrap_servers: str, tmp_path: Path) -> None:
    chart = tmp_path / "latency.png"
    result = subprocess.run(
        [sys.executable, "-m", "dp.cli", "bench", "--quick", "--spawn", "1", "--partitions", "4", "--json",
         "--rates", "200,500", "--plot", str(chart), "--bootstrap-servers", bootstrap_servers],
        capture_output=True, text=True, timeout=180, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report.keys() >= FIELDS
    rates = report["rates"]
    assert [rate["offered_rate"] for rate in rates] == [200, 500]
    assert all(rate.keys() >= RATE_FIELDS and rate["transactions_per_s"] > 0 for rate in rates)
    assert all(0 < rate["p50_ms"] <= rate["p99_ms"] <= rate["max_ms"] for rate in rates)
    # The top-level latency fields are the first rate's, as before --rates.
    first = rates[0]
    assert (report["offered_rate"], report["latency_commands"]) == (200, first["commands"])
    assert (report["p50_ms"], report["p99_ms"], report["max_ms"]) == (first["p50_ms"], first["p99_ms"], first["max_ms"])
    assert report["commands"] == 4_000 and report["ok"] == report["commands"] + sum(rate["commands"] for rate in rates)
    assert report["throughput"] > 0 and report["baseline_throughput"] > 0
    assert report["processors"] == 1 and report["partitions"] == 4
    assert chart.read_bytes().startswith(PNG_SIGNATURE)


def test_plot_without_matplotlib_is_refused_before_the_run_in_one_sentence(tmp_path: Path) -> None:
    hide_matplotlib = "import sys; sys.modules['matplotlib'] = None; from dp.cli.main import main; sys.exit(main())"
    result = subprocess.run(
        [sys.executable, "-c", hide_matplotlib, "bench", "--plot", str(tmp_path / "latency.png"),
         "--bootstrap-servers", "127.0.0.1:9"],  # never reached: the refusal comes first
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "dp[plot]" in result.stderr
    assert not (tmp_path / "latency.png").exists()


def test_quick_http_bench_measures_the_gateway_beside_the_client_at_each_concurrency(bootstrap_servers: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dp.cli", "bench", "--quick", "--http", "--spawn", "1", "--partitions", "4", "--json",
         "--clients", "10,100", "--bootstrap-servers", bootstrap_servers],
        capture_output=True, text=True, timeout=180, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report.keys() >= HTTP_FIELDS and report["mode"] == "http"
    assert (report["processors"], report["partitions"], report["errors"]) == (1, 4, 0)
    assert report["gateway"].startswith("http://127.0.0.1:")
    phases = report["phases"]
    assert [(p["clients"], p["face"]) for p in phases] == [(10, "http"), (10, "client"), (100, "http"), (100, "client")]
    for p in phases:
        assert p.keys() >= PHASE_FIELDS and p["errors"] == {}
        assert p["created"] > 0 and p["creates_per_s"] == round(p["created"] / p["seconds"], 1)
        assert 0 < p["p50_ms"] <= p["p99_ms"] <= p["max_ms"]
        assert set(p["cpu_percent"]) == set(CPU_SOURCES)
    # The benchmark started the gateway, so it can say how much CPU the gateway used while it was measured.
    assert all(p["cpu_percent"]["gateway"] is not None for p in phases if p["face"] == "http")


def test_quick_waits_bench_awaits_every_promise_from_one_client_and_reports_it(bootstrap_servers: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dp.cli", "bench", "--quick", "--waits", "100000", "--spawn", "1", "--partitions", "4",
         "--json", "--bootstrap-servers", bootstrap_servers],
        capture_output=True, text=True, timeout=180, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["waits"], report["processors"], report["partitions"]) == (1_000, 1, 4)
    waited = report["waited"]
    assert (waited["returned"], waited["wrong"]) == (1_000, 0)
    assert 0 < waited["p50_ms"] <= waited["p99_ms"] <= waited["max_ms"]
    # One producer and one consumer, each with a connection or two per broker: never one per wait.
    assert 1 <= waited["kafka_connections"] <= 6 and waited["peak_rss_bytes"] > 0


async def test_closed_loop_times_the_window_and_counts_errors_from_the_warm_up_on() -> None:
    sent: list[str] = []

    async def attempt(promise_id: str) -> str | None:
        sent.append(promise_id)
        await asyncio.sleep(0.002)  # stands for the round trip
        return "HTTP 409" if len(sent) % 5 == 0 else None

    tally = await closed_loop(attempt, 3, warmup=0.1, seconds=0.2, ids=lambda k, n: f"{k}/{n}")
    assert len(set(sent)) == len(sent)
    assert tally.errors == {"HTTP 409": len(sent) // 5}
    # Successes of the warm-up (about a third of the time) are not counted; every counted one is timed.
    assert 0 < tally.created < len(sent) - len(sent) // 5
    assert tally.histogram.get_total_count() == tally.created


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--http", "--plot", "x.png"], "--plot"),
        (["--http", "--rates", "200"], "--rates"),
        (["--clients", "10"], "--clients"),
        (["--gateway", "http://127.0.0.1:9"], "--gateway"),
        (["--http", "--spawn", "1", "--gateway", "http://127.0.0.1:9"], "--gateway"),
        (["--waits", "10", "--http"], "--http"),
        (["--waits", "10", "--rates", "200"], "--rates"),
    ],
)
def test_flags_of_the_other_mode_are_refused_in_one_sentence(flags: list[str], named: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dp.cli", "bench", *flags, "--bootstrap-servers", "127.0.0.1:9"],  # never reached
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and named in result.stderr


def test_a_quick_soak_samples_disk_changelog_and_restore_and_plots_them(bootstrap_servers: str, tmp_path: Path) -> None:
    plot = tmp_path / "soak.png"
    result = subprocess.run(
        [sys.executable, "-m", "dp.cli", "bench", "--soak", "--quick", "--soak-seconds", "12", "--soak-interval", "4",
         "--soak-rate", "200", "--partitions", "4", "--json", "--plot", str(plot), "--bootstrap-servers",
         bootstrap_servers],
        capture_output=True, text=True, timeout=180, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["rate"], report["retention_s"], report["partitions"]) == (200, 10.0, 4)
    samples = report["samples"]
    assert len(samples) >= 2 and samples[-1]["promises"] > samples[0]["promises"] > 0
    assert all(s["rocksdb_bytes"] > 0 and s["changelog_records"] > 0 and s["restore_seconds"] > 0 for s in samples)
    assert plot.read_bytes().startswith(PNG_SIGNATURE)


def test_soak_growth_compares_peaks_so_a_sawtooth_is_flat_and_a_line_is_not() -> None:
    def report(sizes: list[int]) -> SoakReport:
        samples = [Sample(60.0 + 30 * n, 1_000 * n, size, size, 1.0) for n, size in enumerate(sizes)]
        return SoakReport(500, 10.0, 8, samples)

    sawtooth = report([10, 80, 30, 85, 12, 70, 40, 90, 15, 75])
    line = report([10, 20, 30, 40, 50, 60, 70, 80, 90, 100])
    assert sawtooth.growth()["rocksdb_bytes"] < 2 <= line.growth()["rocksdb_bytes"]
    assert SoakReport(500, 10.0, 8, []).growth() == {}
