"""scripts/kafka fails with one actionable sentence, and `start` on a running broker is a no-op."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.support import KAFKA_SCRIPT


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(KAFKA_SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60
    )


def one_sentence(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_missing_java_says_to_install_it(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}
    result = run_script("start", "--data", str(tmp_path / "data"), env=env)
    assert result.returncode == 1
    assert "Java not found: install Java 17" in one_sentence(result.stderr)


def test_missing_maven_with_a_cold_cache_says_to_install_it(tmp_path: Path) -> None:
    java_dir = Path(
        os.path.realpath(subprocess.run(["which", "java"], capture_output=True, text=True).stdout.strip())
    ).parent
    env = {"PATH": str(java_dir), "HOME": str(tmp_path), "DP_CACHE_DIR": str(tmp_path / "cache")}
    result = run_script("start", "--data", str(tmp_path / "data"), env=env)
    assert result.returncode == 1
    assert "Maven not found" in one_sentence(result.stderr)


def test_taken_port_says_to_pick_another(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_script("start", "--port", str(port), "--data", str(tmp_path / "data"))
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is taken" in one_sentence(result.stderr)
    assert "--port" in result.stderr


def test_status_of_a_stopped_broker_exits_3(tmp_path: Path) -> None:
    result = run_script("status", "--data", str(tmp_path))
    assert result.returncode == 3
    assert result.stdout.startswith("stopped")
