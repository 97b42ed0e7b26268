"""`dp bench --quick` runs end to end and prints the JSON it promises (a check, not a timing assertion)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import REPO

FIELDS = {
    "commands", "seconds", "throughput", "baseline_throughput", "ratio", "p50_ms", "p90_ms", "p99_ms",
    "p999_ms", "max_ms", "partitions", "processors", "offered_rate",
}  # fmt: skip


def test_quick_bench_spawns_processors_and_prints_one_json_object(bootstrap_servers: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dp.cli", "bench", "--quick", "--spawn", "1", "--partitions", "4", "--json",
         "--bootstrap-servers", bootstrap_servers],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report.keys() >= FIELDS
    assert report["commands"] == 4_000 and report["ok"] == report["commands"] + report["latency_commands"]
    assert report["throughput"] > 0 and report["baseline_throughput"] > 0
    assert 0 < report["p50_ms"] <= report["p99_ms"] <= report["max_ms"]
    assert report["processors"] == 1 and report["partitions"] == 4
