"""scripts/setup installs only what uv.lock pins, and refuses a lock that no longer matches pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.support import REPO


def test_a_stale_lock_is_refused_with_the_command_that_fixes_it(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    for name in ("scripts/setup", "scripts/uv", "uv.lock", "README.md"):
        shutil.copy2(REPO / name, tmp_path / name)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"msgspec>=0.19,<1"' in pyproject
    (tmp_path / "pyproject.toml").write_text(pyproject.replace('"msgspec>=0.19,<1"', '"msgspec>=0.19,<0.20"'))

    result = subprocess.run(["scripts/setup"], cwd=tmp_path, capture_output=True, text=True, timeout=120)

    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "scripts/setup: uv.lock does not match pyproject.toml (uv's words above): run scripts/uv lock, then commit "
        "uv.lock."
    )
    assert not (tmp_path / ".venv").exists()
