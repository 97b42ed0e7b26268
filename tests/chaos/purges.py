"""Retention in the verdict: where each purge happened, read from the changelog, never guessed.

A processor run with `--retention` purges a completed promise once `completedOn` + the retention has
passed; which batch does it depends on its clock and its step budget, so the replay learns it from
the log. Every transaction writes, per partition it touches, its tombstones (purges) first and its
progress record (empty key: `nextCommandOffset` after the step's commands, and the step's `now`)
last, in that partition's changelog. Read in offset order (read_committed: an aborted transaction
is invisible), the tombstones between two progress records are the purges of the later one's step,
whose commands start at the earlier one's `nextCommandOffset` (0 for the first): the purge happened
at that step's `now`, before any of its commands. The replay applies it there and judges it
(`Replayer.purge`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
from aiokafka.structs import ConsumerRecord

from dp.wire import Promise, decode_promise
from tests.chaos.accept import home_partition

if TYPE_CHECKING:
    from tests.chaos.verify import Verdict

# A completed promise still in the changelog this long after its retention ran out when the processors
# stop is a violation: purges must happen (on the processor's clock, in bounded steps, so not at once).
PURGE_BOUND_MS = 10_000
_GENERIC = msgspec.json.Decoder()


class Purge(NamedTuple):
    """One tombstone: the id, where it is in the changelog, and the step it belongs to."""

    id: str
    partition: int
    offset: int
    """The tombstone's changelog offset."""
    before: int
    """The command offset the step's commands start at: the purge comes before that command."""
    now: int
    """The step's `now`, from its progress record."""


def progress_fields(value: bytes | None) -> tuple[int, int] | None:
    """(nextCommandOffset, now) of a progress record (docs/wire.md), None if it is not one."""
    try:
        document: Any = _GENERIC.decode(value or b"")
    except msgspec.DecodeError:
        return None
    if not isinstance(document, dict) or not isinstance(document.get("nextCommandOffset"), int):
        return None
    now = document.get("now", 0)
    return int(document["nextCommandOffset"]), int(now) if isinstance(now, int) else 0


def find_purges(verdict: Verdict, changelog: Iterable[ConsumerRecord], partitions: int) -> dict[int, list[Purge]]:
    """Every partition's purges in changelog order, each placed in its step; the order the placement
    relies on (tombstones before the step's promise records, a progress record closing every step) is
    checked on the way."""
    found: dict[int, list[Purge]] = defaultdict(list)
    by_partition: dict[int, list[ConsumerRecord]] = defaultdict(list)
    for record in changelog:
        by_partition[record.partition].append(record)
    for partition, records in by_partition.items():
        start, written = 0, False
        tombstones: list[ConsumerRecord] = []
        for record in sorted(records, key=lambda r: r.offset):
            if not record.key:
                progress = progress_fields(record.value)
                if progress is None:
                    verdict.violate("changelog progress record that does not decode", f"{partition}:{record.offset}")
                    continue
                found[partition].extend(
                    Purge(t.key.decode(), partition, t.offset, start, progress[1]) for t in tombstones
                )
                start, tombstones, written = progress[0], [], False
            elif record.value is None:
                where = f"{record.key.decode()!r} at changelog {partition}:{record.offset}"
                if written:
                    verdict.violate("tombstone after a promise record of the same step", where)
                if home_partition(record.key, partitions) != partition:
                    verdict.violate("tombstone on the wrong partition", where)
                tombstones.append(record)
            else:
                written = True
        for record in tombstones:
            verdict.violate(
                "tombstone with no progress record after it", f"{record.key.decode()!r} at {partition}:{record.offset}"
            )
    return found


def check_uncompacted(verdict: Verdict, broker_logs: Path, changelog: str) -> None:
    """The placement needs every progress record, which compaction removes from all but the active segment:
    with one segment per partition (the changelog's segment.ms and segment.bytes were not reached), the
    cleaner has had nothing to clean."""
    rolled = sorted(d.name for d in broker_logs.glob(f"{changelog}-*") if len(list(d.glob("*.log"))) > 1)
    if rolled:
        verdict.violate(
            "changelog rolled a segment: compaction may have removed the progress records that place purges",
            ", ".join(rolled),
        )


def latest(changelog: Iterable[ConsumerRecord]) -> dict[str, tuple[int, Promise]]:
    """The compacted view: the last record per key, with the partition it was on; a tombstone (a purge)
    leaves the id absent, and the empty key (the progress record) is not a promise."""
    records: dict[str, tuple[int, Promise]] = {}
    for record in changelog:
        if not record.key:
            continue
        if record.value is None:
            records.pop(record.key.decode(), None)
        else:
            records[record.key.decode()] = (record.partition, decode_promise(record.value))
    return records


def kept_too_long(
    verdict: Verdict, final: Mapping[str, tuple[int, Promise]], retention_ms: int | None, stopped_ms: int
) -> None:
    """With a retention, no completed promise may still be there `PURGE_BOUND_MS` after it ran out."""
    if retention_ms is None:
        return
    for promise_id, (_, promise) in sorted(final.items()):
        if promise.completed_on is not None and promise.completed_on + retention_ms + PURGE_BOUND_MS <= stopped_ms:
            verdict.violate(
                f"completed promise not purged within its retention + {PURGE_BOUND_MS // 1000} s at the end",
                f"{promise_id}: completedOn {promise.completed_on}, stopped at {stopped_ms}",
            )
