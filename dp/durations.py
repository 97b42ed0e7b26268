"""Durations as people write them (`30s`, `5m`, `1h`, `7d`, `250ms`), for settings, flags and tags alike."""

from __future__ import annotations

import re
from typing import Final

_UNITS: Final = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION: Final = re.compile(r"(\d+(?:\.\d*)?)(ms|s|m|h|d)?")


def duration_seconds(text: str) -> float:
    """Seconds from `30s`, `5m`, `1h`, `2d`, `250ms` or a plain number of seconds; ValueError otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration")
    return float(match[1]) * _UNITS[match[2] or "s"]
