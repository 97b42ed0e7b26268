"""The CI-sized chaos run (scripts/chaos --ci): load, hostile input and every kind of fault, then the
verdict from Kafka. It starts its own broker, so it needs no session fixture; it runs as a child
process because it kills and restarts that broker, and because its summary line is the contract.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.chaos.cluster import KAFKA_SCRIPT, REPO

pytestmark = pytest.mark.chaos

LIMIT_S = 240  # the run aims at about 100 s; past this it is stopped (SIGTERM, then SIGKILL) and fails
SUMMARY = re.compile(r"^faults=(\d+) commands=(\d+) replies=(\d+) lost=(\d+) duplicated=(\d+) violations=(\d+)$")
# kill -9 of a processor, a zombie, a lost disk and a broker kill -9 at the least.
MIN_FAULTS = 4
NOTIFICATIONS = re.compile(r"^  notifications: expected (\d+), found (\d+)", re.MULTILINE)
SUBSCRIBES = re.compile(r"^  subscribes: .*$", re.MULTILINE)
PURGES = re.compile(
    r"^  purges \(changelog tombstones, replayed\): (\d+) of (\d+) ids .*; (\d+) ids created anew", re.MULTILINE
)


def run_chaos(work: Path) -> tuple[int, str]:
    """scripts/chaos --ci in its own session; on overrun it gets SIGTERM (it cleans up), then SIGKILL."""
    command = [sys.executable, "-m", "tests.chaos", "--ci", "--work-dir", str(work)]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
        output += f"\n(stopped after {LIMIT_S}s)"
    finally:
        # Even a SIGKILLed run leaves no broker behind: it lives under the work dir we chose.
        subprocess.run([sys.executable, str(KAFKA_SCRIPT), "stop", "--data", str(work / "kafka")], capture_output=True)
    return process.returncode, output


def assert_subscriptions_exercised(output: str) -> None:
    """Subscriptions that waited for a completion and ones made on a completed promise, and their
    notifications checked one by one (the kills fall among them: the verdict covers every one)."""
    notifications, subscribes = NOTIFICATIONS.search(output), SUBSCRIBES.search(output)
    assert notifications and subscribes, output[-4000:]
    expected, found = map(int, notifications.groups())
    assert expected > 0 and found == expected, notifications.group(0)
    for kind in ("created (waiting)", "created (promise completed)"):
        count = re.search(rf"{re.escape(kind)} (\d+)", subscribes.group(0))
        assert count and int(count.group(1)) > 0, subscribes.group(0)


def assert_purges_exercised(output: str) -> None:
    """The processors ran with a 5 s retention: completed promises were purged (each judged by the replay
    at its step) and some of their ids created anew, all among the faults."""
    purges = PURGES.search(output)
    assert purges, output[-4000:]
    purged, _, recreated = map(int, purges.groups())
    assert purged > 0 and recreated > 0, purges.group(0)


def test_chaos_run_loses_nothing_duplicates_nothing_and_breaks_no_rule(tmp_path: Path) -> None:
    work = tmp_path / "chaos"
    code, output = run_chaos(work)
    last = output.strip().splitlines()[-1] if output.strip() else ""
    summary = SUMMARY.match(last)
    assert summary, f"no summary line at the end:\n{output[-6000:]}"
    faults, commands, replies, lost, duplicated, violations = map(int, summary.groups())
    assert (lost, duplicated, violations) == (0, 0, 0), output[-8000:]
    assert code == 0, output[-4000:]
    assert faults >= MIN_FAULTS, output[-4000:]
    assert commands >= 10_000 and replies == commands, last
    assert "1 zombie, 1 lost disk, 1 broker kill -9" in output, output[-4000:]
    assert_subscriptions_exercised(output)
    assert_purges_exercised(output)
    # Kept on failure (logs, stores, broker data, run.json: `scripts/chaos --reverify DIR`).
    shutil.rmtree(work, ignore_errors=True)
