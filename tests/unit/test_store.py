"""Restoring a store from changelog records: kinds it does not know are skipped, records it cannot read stop it."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumers.store import PROGRESS_KEY, PartitionStore, RestoreFailed, progress_record
from dp.wire import Promise, Value, encode

PROMISE = Promise("a", "PENDING", Value(), Value(), 5_000, None, None, {}, 1_000, None)


def test_records_of_unknown_kinds_are_skipped_and_counted(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path)
    store.write_raw(
        [
            (0, b"a", encode(PROMISE), []),
            (1, b"zz", b"\x00 a future format", [("dp.kind", b"snapshot-v9")]),
            (2, PROGRESS_KEY, progress_record(11, 4_242), [("dp.kind", b"progress")]),
        ],
        3,
    )
    assert store.skipped == 1
    assert set(store.records()) == {"a"}
    assert (store.changelog_offset, store.command_offset, store.last_now) == (3, 11, 4_242)
    assert store.next_deadline() == 5_000


def test_a_record_of_a_known_kind_that_does_not_decode_stops_the_restore_naming_its_offset(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path)
    with pytest.raises(RestoreFailed, match="offset 7 is not one dp can read"):
        store.write_raw([(7, b"a", b"{not json", [])], 8)
    assert store.changelog_offset == 0 and store.records() == {}


def test_a_wiped_store_is_empty_and_usable(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path / "p")
    store.write([(PROMISE, encode(PROMISE))], 5, 9, 1_000)
    fresh = store.wipe()
    assert (fresh.records(), fresh.changelog_offset, fresh.command_offset) == ({}, 0, 0)
    fresh.close()
