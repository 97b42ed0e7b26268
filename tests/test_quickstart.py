"""The README's quickstart as written: its `dp` commands as processes, then its Python program."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable

from dp.settings import Topics
from dp.wire import decode_reply
from tests.support import REPO, ServeProcess

DP = [sys.executable, "-m", "dp.cli"]


def quickstart() -> tuple[list[list[list[str]]], str]:
    """The commands of each terminal (one ```sh block each) and the Python program of the section."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Quickstart") :]
    section = section[: section.index("\n## ")]
    terminals = [
        [words for line in block.splitlines() if (words := shlex.split(line, comments=True))]
        for block in re.findall(r"```sh\n(.*?)```", section, re.S)
    ]
    (program,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return terminals, program


def command(words: list[str]) -> list[str]:
    assert words[0] == ".venv/bin/dp", words
    return [*DP, *words[1:]]


def test_the_readme_quickstart_works_as_written(
    bootstrap_servers: str, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    (service, create, wait, resolve), program = quickstart()
    assert service == [["scripts/dev"]]  # the spawned processor stands in for it
    spawn()
    env = {
        **os.environ,
        "DP_BOOTSTRAP_SERVERS": bootstrap_servers,
        "DP_TOPIC_PREFIX": topics.prefix,
    }

    def run(words: list[str]) -> subprocess.CompletedProcess[str]:
        ran = subprocess.run(command(words), env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, (words, ran.stderr)
        return ran

    assert "created" in run(*create).stdout
    (wait_words,) = wait
    waiting = subprocess.Popen(command(wait_words), env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        outputs = [run(words).stdout for words in resolve]
        waited, _ = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
    assert waiting.returncode == 0 and "RESOLVED" in waited
    record = decode_reply(outputs[-1].encode()).promise
    assert record is not None and record.state == "RESOLVED" and record.value.data == b'"shipped"'

    ran = subprocess.run([sys.executable, "-c", program], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (ran.returncode, ran.stdout) == (0, "created\nRESOLVED\n"), ran.stderr
