"""One partition's state in RocksDB: promise records, their indexes, offsets and the change version.

Key layout (raw bytes, one database per partition, written only by that partition's writer). Every
kind of key is registered in `KEY_KINDS` with its one-byte (or `o:`) prefix; a once assigned prefix
never changes meaning, and the prefixes are prefix-free (tested):

    b"p" + id                         -> stored record (the changelog value, JSON: the promise record
                                         and its subscriptions, `dp.subscriptions`)
    b"t" + timeout (8 bytes BE) + id  -> b""   for every PENDING promise: deadlines in order
    b"c" + createdOn (8 bytes BE) + id -> b""  for every promise: search order (read backwards)
    b"k" + completedOn (8 bytes BE) + id -> b"" for every completed promise kept the processor's retention
    b"q" + purgeAt (8 bytes BE) + id  -> b""   for every completed promise with its own (`dp:retention`)
    b"o:changelog"                    -> next changelog offset the store reflects (8 bytes BE)
    b"o:commands"                     -> next command offset the store reflects (8 bytes BE)
    b"o:now"                          -> the latest batch time applied (epoch ms, 8 bytes BE)
    b"o:version"                      -> the partition's change version: promise changes applied so far
    b"o:format"                       -> the layout's version, `FORMAT`; a store of another format is
                                         rebuilt from the changelog when its partition opens

A purged promise (retention) leaves no key behind: its changelog record is a tombstone, which the
restore applies as a delete of the record and its index entries.

The changelog carries, besides the promise records, one progress record per batch under the empty
key (never a promise id: ids are non-empty) holding the next command offset, in the same
transaction as the batch, and the batch's `now`. The store learns both on restore like any record,
so the command offset a partition resumes from survives even a lost consumer-offset commit, and a
new owner whose clock lags never applies a command at a time before one already applied.

A changelog record may carry a `dp.kind` header; a kind this version does not know is skipped and
counted, so that a newer writer never wedges an older reader. A record of a known kind that does
not decode stops the restore with `RestoreFailed`, naming the offset.

Every change arrives as one `WriteBatch` that carries the records, their index entries and the
changelog offset together, so a crash leaves the store at some committed batch boundary, never
in between.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Final

import msgspec
from rocksdict import AccessType, BlockBasedOptions, Cache, Options, Rdict, WriteBatch

from dp.errors import DataDirInUse
from dp.subscriptions import NONE, Subscribers, decode_subscribers
from dp.wire import RETENTION_TAG, Position, Promise, decode_promise, encode, tag_retention_ms

RECORD = b"p"
DEADLINE = b"t"
DEADLINE_END = b"u"
CREATED = b"c"
CREATED_END = b"d"
COMPLETED = b"k"
COMPLETED_END = b"l"
PURGE_AT = b"q"
PURGE_AT_END = b"r"
CHANGELOG_OFFSET = b"o:changelog"
COMMAND_OFFSET = b"o:commands"
LAST_NOW = b"o:now"
VERSION = b"o:version"
FORMAT_KEY = b"o:format"
FORMAT: Final = b"3"
"""Format 1 had no `c` index and no version; format 2 adds both; format 3 the `k` and `q` indexes."""
KEY_KINDS: Final[dict[str, bytes]] = {
    "record": RECORD,
    "deadline": DEADLINE,
    "created": CREATED,
    "completed": COMPLETED,
    "purge at": PURGE_AT,
    "changelog offset": CHANGELOG_OFFSET,
    "command offset": COMMAND_OFFSET,
    "last now": LAST_NOW,
    "version": VERSION,
    "format": FORMAT_KEY,
}
PROGRESS_KEY = b""
KIND_HEADER: Final = "dp.kind"
KNOWN_KINDS: Final = frozenset((b"promise", b"progress"))
OFFSET = struct.Struct(">q")
TIMEOUT = struct.Struct(">Q")


def record_key(promise_id: str) -> bytes:
    return RECORD + promise_id.encode()


def deadline_key(timeout: int, promise_id: str) -> bytes:
    return DEADLINE + TIMEOUT.pack(max(timeout, 0)) + promise_id.encode()


def created_key(created_on: int, promise_id: str) -> bytes:
    return CREATED + TIMEOUT.pack(max(created_on, 0)) + promise_id.encode()


def retention_key(promise_id: str, promise: Promise | Indexed) -> bytes | None:
    """The index entry that finds a completed promise when its retention is over: by completion time when
    the processor's retention applies, by purge time when its own tag says, none when that is `forever`."""
    if promise.completed_on is None:
        return None
    given = promise.tags.get(RETENTION_TAG)
    if given is not None:
        try:
            own = tag_retention_ms(given)
        except ValueError:  # unreadable (written before tags were checked): the processor's retention
            pass
        else:
            return (
                None
                if own is None
                else PURGE_AT + TIMEOUT.pack(max(promise.completed_on + own, 0)) + promise_id.encode()
            )
    return COMPLETED + TIMEOUT.pack(max(promise.completed_on, 0)) + promise_id.encode()


BLOOM_BITS_PER_KEY: Final = 10
"""A full (whole-key) bloom filter at about 1 % false positives: most reads are point reads of one record,
and a create reads an id that does not exist yet, which the filter answers without touching a block."""


def options(cache: Cache | None = None) -> Options:
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.increase_parallelism(2)
    opts.set_max_background_jobs(2)
    # One database per partition: RocksDB's 64 MiB memtables (two of them) would cost a process hundreds
    # of MiB once large promises arrive; a quarter of that keeps memory bounded at little cost in flushes.
    opts.set_write_buffer_size(16 * 1024 * 1024)
    # Level compaction with dynamic level sizes keeps space amplification near 1.1 under a steady stream of
    # updates and, with retention, deletes; the writes are small and the reads mostly point reads.
    opts.set_level_compaction_dynamic_level_bytes(True)
    table = BlockBasedOptions()
    table.set_bloom_filter(BLOOM_BITS_PER_KEY, False)
    if cache is not None:  # shared by every partition of the process, index and filter blocks included
        table.set_block_cache(cache)
        table.set_cache_index_and_filter_blocks(True)
        table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    opts.set_block_based_table_factory(table)
    return opts


class DataDir:
    """A processor's claim on `root/group`: its partitions' stores and the identity of its transactions.

    The transactional id is stable per data dir (a name drawn once and kept in the dir), so a restarted
    processor's producer aborts its previous incarnation's open transaction at once; a lock held for the
    life of the process keeps two processors from sharing a dir, and so an id.
    """

    def __init__(self, root: Path, group: str, block_cache_bytes: int = 64 << 20) -> None:
        self.path = root / group
        self.block_cache = Cache(block_cache_bytes)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(self.path / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise DataDirInUse(self.path) from None
        name = self.path / "transactional-id"
        if not name.exists():
            draft = name.with_suffix(".new")
            draft.write_text(f"{group}-{uuid.uuid4().hex[:12]}\n")
            draft.replace(name)
        self.transactional_id = name.read_text().strip()

    def partition_path(self, partition: int) -> Path:
        return self.path / f"partition-{partition}"

    def release(self) -> None:
        os.close(self._lock)


class RestoreFailed(Exception):
    """A changelog record of a kind this version knows that does not decode: restoring past it would
    leave the store wrong, so the partition stays closed until an operator looks."""


class PartitionStore:
    """RocksDB for one partition. Not thread-safe; only the partition's writer touches it."""

    def __init__(self, path: Path, cache: Cache | None = None) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.cache = cache
        self.skipped = 0
        self._db = Rdict(str(path), options(cache), access_type=AccessType.read_write())

    def close(self) -> None:
        self._db.close()

    def wipe(self) -> PartitionStore:
        """Close and delete this store; returns a fresh empty one at the same path."""
        self.close()
        shutil.rmtree(self.path)
        return PartitionStore(self.path, self.cache)

    def get(self, promise_id: str) -> Promise | None:
        raw = self._db.get(record_key(promise_id))
        return None if raw is None else decode_promise(raw)

    def subscribers(self, promise_id: str) -> Subscribers:
        raw = self._db.get(record_key(promise_id))
        return NONE if raw is None else decode_subscribers(raw)

    @property
    def changelog_offset(self) -> int:
        """The next changelog offset to replay from: everything before it is in the store."""
        return self._offset(CHANGELOG_OFFSET)

    @property
    def command_offset(self) -> int:
        """The next command offset: every command before it has been applied to the store."""
        return self._offset(COMMAND_OFFSET)

    @property
    def last_now(self) -> int:
        """The time of the latest batch applied: a partition's clock never runs backwards."""
        return self._offset(LAST_NOW)

    @property
    def version(self) -> int:
        """How many promise changes this partition has applied, ever: a search's snapshot."""
        return self._offset(VERSION)

    @property
    def outdated(self) -> bool:
        """Written in another layout (`FORMAT`): the partition rebuilds it from the changelog."""
        written = self._db.get(FORMAT_KEY)
        return written != FORMAT if written is not None else self._db.get(CHANGELOG_OFFSET) is not None

    def _offset(self, key: bytes) -> int:
        raw = self._db.get(key)
        return 0 if raw is None else int(OFFSET.unpack(raw)[0])

    def next_deadline(self) -> int | None:
        """The earliest timeout among pending promises, if any."""
        iterator = self._db.iter()
        iterator.seek(DEADLINE)
        if iterator.valid() and iterator.key() < DEADLINE_END:
            return int(TIMEOUT.unpack_from(iterator.key(), 1)[0])
        return None

    def due(self, now: int, limit: int, max_bytes: int) -> list[Promise]:
        """Pending promises whose timeout is at or before `now`, earliest first: at most `limit` of them
        and about `max_bytes` of records (always at least one, so that a large one is not stuck)."""
        found: list[Promise] = []
        size = 0
        bound = DEADLINE + TIMEOUT.pack(now + 1)
        iterator = self._db.iter()
        iterator.seek(DEADLINE)
        while len(found) < limit and size < max_bytes and iterator.valid() and iterator.key() < bound:
            raw = self._db.get(record_key(iterator.key()[1 + TIMEOUT.size :].decode()))
            if raw is not None:
                found.append(decode_promise(raw))
                size += len(raw)
            iterator.next()
        return found

    def expired(self, completed_by: int | None, now: int, limit: int) -> list[Promise]:
        """At most `limit` completed promises whose retention is over: kept by the processor's retention and
        completed at or before `completed_by` (None: that retention is forever), or with their own and due
        at `now`; oldest first within each."""
        found: list[Promise] = []
        if completed_by is not None:
            found.extend(self._indexed(COMPLETED, completed_by, limit))
        found.extend(self._indexed(PURGE_AT, now, limit - len(found)))
        return found

    def _indexed(self, prefix: bytes, end: int, limit: int) -> list[Promise]:
        found: list[Promise] = []
        bound = prefix + TIMEOUT.pack(end + 1)
        iterator = self._db.iter()
        iterator.seek(prefix)
        while len(found) < limit and iterator.valid() and iterator.key() < bound:
            raw = self._db.get(record_key(iterator.key()[1 + TIMEOUT.size :].decode()))
            if raw is not None:
                found.append(decode_promise(raw))
            iterator.next()
        return found

    def next_purge(self, retention_ms: int | None) -> int | None:
        """When the next purge is due: the oldest completion plus `retention_ms`, or an own purge time."""
        times = [self._first(PURGE_AT, PURGE_AT_END)]
        if retention_ms is not None and (completed := self._first(COMPLETED, COMPLETED_END)) is not None:
            times.append(completed + retention_ms)
        due = [time for time in times if time is not None]
        return min(due) if due else None

    def _first(self, prefix: bytes, end: bytes) -> int | None:
        iterator = self._db.iter()
        iterator.seek(prefix)
        if iterator.valid() and iterator.key() < end:
            return int(TIMEOUT.unpack_from(iterator.key(), 1)[0])
        return None

    def newest(self, after: Position | None) -> Iterator[tuple[Position, str]]:
        """Every promise's place in search order (newest first), strictly after `after`."""
        iterator = self._db.iter()
        if after is None:
            iterator.seek_for_prev(CREATED_END)
        else:
            start = created_key(after.created_on, after.id)
            iterator.seek_for_prev(start)
            if iterator.valid() and iterator.key() == start:
                iterator.prev()
        while iterator.valid() and (key := iterator.key()).startswith(CREATED):
            promise_id = key[1 + TIMEOUT.size :].decode()
            yield Position(int(TIMEOUT.unpack_from(key, 1)[0]), promise_id), promise_id
            iterator.prev()

    def falling_due(self, start: int, end: int) -> Iterator[str]:
        """The ids of pending promises whose timeout is in (start, end]."""
        bound = DEADLINE + TIMEOUT.pack(end + 1)
        iterator = self._db.iter()
        iterator.seek(DEADLINE + TIMEOUT.pack(start + 1))
        while iterator.valid() and iterator.key() < bound:
            yield iterator.key()[1 + TIMEOUT.size :].decode()
            iterator.next()

    def write(
        self,
        records: Iterable[tuple[Promise, bytes]],
        changelog_offset: int,
        command_offset: int,
        now: int,
        version: int,
        purged: Iterable[Promise] = (),
    ) -> None:
        """Write a committed batch's purges, then its records (with their encodings), index entries and
        offsets, atomically (an id purged and created anew in one batch ends as the new record)."""
        batch = WriteBatch(raw_mode=True)
        for gone in purged:
            unstage(batch, gone.id, gone)
        for promise, value in records:
            stage(batch, promise.id, value, promise)
        batch.put(COMMAND_OFFSET, OFFSET.pack(command_offset))
        batch.put(LAST_NOW, OFFSET.pack(now))
        batch.put(VERSION, OFFSET.pack(version))
        batch.put(CHANGELOG_OFFSET, OFFSET.pack(changelog_offset))
        batch.put(FORMAT_KEY, FORMAT)
        self._db.write(batch)

    def write_raw(self, entries: Iterable[ChangelogEntry], changelog_offset: int) -> None:
        """Restore path: changelog records as they are, a tombstone (a purge) as a delete, then the offset.
        A record replacing another drops the index entries of the one it replaces."""
        batch = WriteBatch(raw_mode=True)
        staged: dict[bytes, Indexed | None] = {}
        for offset, key, value, headers in entries:
            kind = dict(headers).get(KIND_HEADER)
            if key is None or (key == PROGRESS_KEY and value is None):
                continue
            if value is None:
                self._replace(batch, staged, key, None)
                continue
            if kind is not None and kind not in KNOWN_KINDS:
                self.skipped += 1
                continue
            try:
                if key == PROGRESS_KEY:
                    progress = decode_progress(value)
                    batch.put(COMMAND_OFFSET, OFFSET.pack(progress.next_command_offset))
                    batch.put(LAST_NOW, OFFSET.pack(progress.now))
                    batch.put(VERSION, OFFSET.pack(progress.version))
                else:
                    self._replace(batch, staged, key, value)
            except (msgspec.DecodeError, UnicodeDecodeError) as error:
                raise RestoreFailed(f"changelog record at offset {offset} is not one dp can read ({error})") from None
        batch.put(CHANGELOG_OFFSET, OFFSET.pack(changelog_offset))
        batch.put(FORMAT_KEY, FORMAT)
        self._db.write(batch)

    def _replace(self, batch: WriteBatch, staged: dict[bytes, Indexed | None], key: bytes, value: bytes | None) -> None:
        """Stage the record under `key` (None: delete it), unstaging what it replaces. A record replaces one
        staged in this batch, or one in the store only when it is a tombstone: the changelog tombstones
        a promise before its id is created again, so a put needs no read (restore stays write-only)."""
        promise_id = key.decode()
        if key in staged:
            previous = staged[key]
        elif value is None:
            raw = self._db.get(record_key(promise_id))
            previous = None if raw is None else decode_indexed(raw)
        else:
            previous = None
        if previous is not None:
            unstage(batch, promise_id, previous)
        staged[key] = indexed = None if value is None else decode_indexed(value)
        if value is not None and indexed is not None:
            stage(batch, promise_id, value, indexed)

    def records(self) -> dict[str, Promise]:
        """Every record, for checks and tests (not for the hot path)."""
        out: dict[str, Promise] = {}
        iterator = self._db.iter()
        iterator.seek(RECORD)
        while iterator.valid() and iterator.key().startswith(RECORD):
            out[iterator.key()[1:].decode()] = decode_promise(iterator.value())
            iterator.next()
        return out


class Indexed(msgspec.Struct, gc=False, rename="camel"):
    """The fields of a record the indexes need; decoding only these makes restore cheap."""

    state: str
    timeout: int
    created_on: int
    completed_on: int | None = None
    tags: dict[str, str] = {}


decode_indexed = msgspec.json.Decoder(Indexed).decode


class Progress(msgspec.Struct, frozen=True, gc=False, rename="camel"):
    """The changelog's progress record: how far the commands of this partition have been applied, at
    what time, and the partition's change version after them (0 in records written before either was
    recorded)."""

    next_command_offset: int
    now: int = 0
    version: int = 0


decode_progress = msgspec.json.Decoder(Progress).decode
ChangelogEntry = tuple[int, bytes | None, bytes | None, Sequence[tuple[str, bytes]]]
"""(offset, key, value, headers) of one changelog record."""


def progress_record(next_command_offset: int, now: int, version: int) -> bytes:
    return encode(Progress(next_command_offset, now, version))


def stage(batch: WriteBatch, promise_id: str, value: bytes, promise: Promise | Indexed) -> None:
    """Put one record and keep the indexes in step: in search order always, by deadline exactly while PENDING,
    by completion time once completed."""
    batch.put(record_key(promise_id), value)
    batch.put(created_key(promise.created_on, promise_id), b"")
    index = deadline_key(promise.timeout, promise_id)
    if promise.state == "PENDING":
        batch.put(index, b"")
    else:
        batch.delete(index)
        if (retention := retention_key(promise_id, promise)) is not None:
            batch.put(retention, b"")


def unstage(batch: WriteBatch, promise_id: str, promise: Promise | Indexed) -> None:
    """Delete one record and every index entry it has."""
    batch.delete(record_key(promise_id))
    batch.delete(created_key(promise.created_on, promise_id))
    batch.delete(deadline_key(promise.timeout, promise_id))
    if (retention := retention_key(promise_id, promise)) is not None:
        batch.delete(retention)
