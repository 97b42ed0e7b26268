"""Transaction markers counted straight from the broker's segment files, after the broker stopped.

read_committed consumers never see aborted records or the markers themselves, so this is the one
place where the work the fencing threw away (the zombie's, a killed processor's open transaction)
can be counted: each ABORT marker on a data partition is a transaction that made nothing visible.
"""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path

from aiokafka.record.memory_records import MemoryRecords

COMMIT, ABORT = 1, 0


def markers(logs: Path, topic: str) -> Counter[str]:
    """COMMIT and ABORT markers in every partition of `topic` under the broker's log dir."""
    found: Counter[str] = Counter()
    for segment in sorted(logs.glob(f"{topic}-*/*.log")):
        records = MemoryRecords(segment.read_bytes())
        while records.has_next():
            batch = records.next_batch()
            if batch is None or not batch.is_control_batch:
                continue
            for record in batch:
                kind = struct.unpack_from(">hh", record.key)[1]
                found["commit" if kind == COMMIT else "abort" if kind == ABORT else "other"] += 1
    return found
