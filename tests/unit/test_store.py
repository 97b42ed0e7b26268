"""Restoring a store from changelog records: kinds it does not know are skipped, records it cannot read stop it."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from consumers.store import FORMAT_KEY, KEY_KINDS, PROGRESS_KEY, PartitionStore, RestoreFailed, progress_record
from dp.wire import Position, Promise, Value, encode

PROMISE = Promise("a", "PENDING", Value(), Value(), 5_000, None, None, {}, 1_000, None)


def test_records_of_unknown_kinds_are_skipped_and_counted(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path)
    store.write_raw(
        [
            (0, b"a", encode(PROMISE), []),
            (1, b"zz", b"\x00 a future format", [("dp.kind", b"snapshot-v9")]),
            (2, PROGRESS_KEY, progress_record(11, 4_242, 3), [("dp.kind", b"progress")]),
        ],
        3,
    )
    assert store.skipped == 1
    assert set(store.records()) == {"a"}
    assert (store.changelog_offset, store.command_offset, store.last_now, store.version) == (3, 11, 4_242, 3)
    assert store.next_deadline() == 5_000


def test_a_record_of_a_known_kind_that_does_not_decode_stops_the_restore_naming_its_offset(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path)
    with pytest.raises(RestoreFailed, match="offset 7 is not one dp can read"):
        store.write_raw([(7, b"a", b"{not json", [])], 8)
    assert store.changelog_offset == 0 and store.records() == {}


def test_a_wiped_store_is_empty_and_usable(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path / "p")
    store.write([(PROMISE, encode(PROMISE))], 5, 9, 1_000, 1)
    fresh = store.wipe()
    assert (fresh.records(), fresh.changelog_offset, fresh.command_offset) == ({}, 0, 0)
    fresh.close()


def test_key_kinds_are_registered_once_and_prefix_free() -> None:
    prefixes = list(KEY_KINDS.values())
    assert len(set(prefixes)) == len(prefixes)
    assert not [(a, b) for a in prefixes for b in prefixes if a != b and b.startswith(a)]
    assert PROGRESS_KEY == b"" and all(prefixes)  # the progress record is a changelog key, never a store key


def test_the_search_index_reads_newest_first_from_any_place(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path)
    made = [
        msgspec.structs.replace(PROMISE, id=id, created_on=at) for id, at in [("b", 2), ("a", 2), ("c", 1), ("d", 3)]
    ]
    store.write([(p, encode(p)) for p in made], 1, 1, 1_000, 4)
    assert [id for _, id in store.newest(None)] == ["d", "b", "a", "c"]
    assert [id for _, id in store.newest(Position(2, "b"))] == ["a", "c"]
    assert [id for _, id in store.newest(Position(2, "az"))] == ["a", "c"]  # a place that is no promise's
    assert list(store.newest(Position(1, "c"))) == []
    assert sorted(store.falling_due(0, 5_000)) == ["a", "b", "c", "d"] and list(store.falling_due(5_000, 9_000)) == []


def test_a_store_of_the_previous_format_is_outdated_and_a_new_one_is_not(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path)
    assert not store.outdated  # empty
    store.write([(PROMISE, encode(PROMISE))], 5, 9, 1_000, 1)
    assert not store.outdated
    store._db.delete(FORMAT_KEY)  # as format 1 left it: offsets, no format key
    assert store.outdated
    store._db.put(FORMAT_KEY, b"2")
    assert store.outdated


def keys(store: PartitionStore) -> list[bytes]:
    """Every key of the store but its offsets: records and index entries."""
    iterator = store._db.iter()
    iterator.seek_to_first()
    found = []
    while iterator.valid():
        if not iterator.key().startswith(b"o:"):
            found.append(iterator.key())
        iterator.next()
    return found


def completed(id: str, created_on: int, completed_on: int) -> Promise:
    return msgspec.structs.replace(PROMISE, id=id, state="RESOLVED", created_on=created_on, completed_on=completed_on)


def test_completed_promises_are_found_oldest_first_and_a_purge_leaves_no_key(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path)
    done = [completed("a", 1, 30), completed("b", 2, 10), completed("c", 3, 20)]
    store.write([(p, encode(p)) for p in done], 1, 1, 1_000, 3)
    assert store.next_purge(5) == 15 and store.next_purge(None) is None
    assert [p.id for p in store.expired(20, 1_000, 10)] == ["b", "c"]
    assert [p.id for p in store.expired(30, 1_000, 1)] == ["b"]
    assert store.expired(None, 1_000, 10) == []  # the processor keeps them forever
    store.write([], 2, 2, 1_000, 5, purged=done[1:])
    assert set(store.records()) == {"a"} and store.next_purge(0) == 30
    assert all(key.endswith(b"a") for key in keys(store))


def test_a_promise_with_its_own_retention_is_found_at_its_own_time(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path)
    own = msgspec.structs.replace(completed("own", 1, 10), tags={"dp:retention": "1s"})
    kept = msgspec.structs.replace(completed("kept", 1, 10), tags={"dp:retention": "forever"})
    store.write([(p, encode(p)) for p in (own, kept, completed("plain", 1, 20))], 1, 1, 1_000, 3)
    assert store.next_purge(None) == 1_010 and store.next_purge(100) == 120
    assert [p.id for p in store.expired(None, 1_010, 10)] == ["own"]
    assert [p.id for p in store.expired(20, 1_009, 10)] == ["plain"]  # "kept" is found never


def test_a_tombstone_restores_as_a_purge_and_the_id_can_live_again(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path)
    old, again = completed("a", 1, 5), msgspec.structs.replace(PROMISE, created_on=50)
    store.write_raw([(0, b"a", encode(old), []), (1, b"b", encode(completed("b", 2, 6)), [])], 2)
    store.write_raw([(2, b"b", None, [])], 3)  # tombstoned in a later restore batch: read from the store
    store.write_raw([(3, b"a", None, []), (4, b"a", encode(again), [])], 5)  # purged and created in one batch
    assert store.records() == {"a": again}
    assert [id for _, id in store.newest(None)] == ["a"] and store.next_purge(0) is None
    assert sorted(keys(store)) == sorted([b"pa", b"c" + (50).to_bytes(8, "big") + b"a",
                                          b"t" + (5_000).to_bytes(8, "big") + b"a"])  # fmt: skip
