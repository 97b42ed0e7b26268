"""`dp bench --quick` runs end to end and prints the JSON it promises (a check, not a timing assertion)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import REPO

FIELDS = {
    "commands", "seconds", "throughput", "baseline_throughput", "ratio", "p50_ms", "p90_ms", "p99_ms",
    "p999_ms", "max_ms", "partitions", "processors", "offered_rate", "rates",
}  # fmt: skip
RATE_FIELDS = {"offered_rate", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "commands", "transactions_per_s"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
