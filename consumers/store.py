"""One partition's state in RocksDB: promise records, the pending-by-deadline index and offsets.

Key layout (raw bytes, one database per partition, written only by that partition's writer):

    b"p" + id                       -> promise record (the changelog value, JSON)
    b"t" + timeout (8 bytes BE) + id -> b""   for every PENDING promise: deadlines in order
    b"o:changelog"                  -> next changelog offset the store reflects (8 bytes BE)
    b"o:commands"                   -> next command offset the store reflects (8 bytes BE)

The changelog carries, besides the promise records, one progress record per batch under the empty
key (never a promise id: ids are non-empty) holding the next command offset, in the same
transaction as the batch. The store learns it on restore like any record, so the command offset a
partition resumes from survives even a lost consumer-offset commit.

Every change arrives as one `WriteBatch` that carries the records, their index entries and the
changelog offset together, so a crash leaves the store at some committed batch boundary, never
in between.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

import msgspec
from rocksdict import AccessType, Options, Rdict, WriteBatch

from dp.wire import Promise, decode_promise, encode

RECORD = b"p"
DEADLINE = b"t"
DEADLINE_END = b"u"
CHANGELOG_OFFSET = b"o:changelog"
COMMAND_OFFSET = b"o:commands"
PROGRESS_KEY = b""
OFFSET = struct.Struct(">q")
TIMEOUT = struct.Struct(">Q")


def record_key(promise_id: str) -> bytes:
    return RECORD + promise_id.encode()


def deadline_key(timeout: int, promise_id: str) -> bytes:
    return DEADLINE + TIMEOUT.pack(max(timeout, 0)) + promise_id.encode()


def options() -> Options:
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.increase_parallelism(2)
    opts.set_max_background_jobs(2)
    return opts


class PartitionStore:
    """RocksDB for one partition. Not thread-safe; only the partition's writer touches it."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = Rdict(str(path), options(), access_type=AccessType.read_write())

    def close(self) -> None:
        self._db.close()

    def get(self, promise_id: str) -> Promise | None:
        raw = self._db.get(record_key(promise_id))
        return None if raw is None else decode_promise(raw)

    @property
    def changelog_offset(self) -> int:
        """The next changelog offset to replay from: everything before it is in the store."""
        return self._offset(CHANGELOG_OFFSET)

    @property
    def command_offset(self) -> int:
        """The next command offset: every command before it has been applied to the store."""
        return self._offset(COMMAND_OFFSET)

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

    def due(self, now: int, limit: int) -> list[Promise]:
        """Pending promises whose timeout is at or before `now`, earliest first, at most `limit`."""
        found: list[Promise] = []
        bound = DEADLINE + TIMEOUT.pack(now + 1)
        iterator = self._db.iter()
        iterator.seek(DEADLINE)
        while len(found) < limit and iterator.valid() and iterator.key() < bound:
            promise = self.get(iterator.key()[1 + TIMEOUT.size :].decode())
            if promise is not None:
                found.append(promise)
            iterator.next()
        return found

    def write(
        self, records: Iterable[tuple[Promise, bytes]], changelog_offset: int, command_offset: int | None
    ) -> None:
        """Write a committed batch's records (with their encodings), index entries and offsets, atomically."""
        batch = WriteBatch(raw_mode=True)
        for promise, value in records:
            stage(batch, promise.id, value, promise)
        if command_offset is not None:
            batch.put(COMMAND_OFFSET, OFFSET.pack(command_offset))
        batch.put(CHANGELOG_OFFSET, OFFSET.pack(changelog_offset))
        self._db.write(batch)

    def write_raw(self, entries: Iterable[tuple[bytes, bytes | None]], changelog_offset: int) -> None:
        """Restore path: changelog records as they are, then the offset. (The processor never deletes.)"""
        batch = WriteBatch(raw_mode=True)
        for key, value in entries:
            if value is None:
                continue
            if key == PROGRESS_KEY:
                batch.put(COMMAND_OFFSET, OFFSET.pack(decode_progress(value).next_command_offset))
            else:
                stage(batch, key.decode(), value, decode_indexed(value))
        batch.put(CHANGELOG_OFFSET, OFFSET.pack(changelog_offset))
        self._db.write(batch)

    def records(self) -> dict[str, Promise]:
        """Every record, for checks and tests (not for the hot path)."""
        out: dict[str, Promise] = {}
        iterator = self._db.iter()
        iterator.seek(RECORD)
        while iterator.valid() and iterator.key().startswith(RECORD):
            out[iterator.key()[1:].decode()] = decode_promise(iterator.value())
            iterator.next()
        return out


class Indexed(msgspec.Struct, gc=False):
    """The two fields of a record the deadline index needs; decoding only these makes restore cheap."""

    state: str
    timeout: int


decode_indexed = msgspec.json.Decoder(Indexed).decode


class Progress(msgspec.Struct, frozen=True, gc=False, rename="camel"):
    """The changelog's progress record: how far the commands of this partition have been applied."""

    next_command_offset: int


decode_progress = msgspec.json.Decoder(Progress).decode


def progress_record(next_command_offset: int) -> bytes:
    return encode(Progress(next_command_offset))


def stage(batch: WriteBatch, promise_id: str, value: bytes, promise: Promise | Indexed) -> None:
    """Put one record and keep the deadline index in step: indexed exactly while PENDING."""
    batch.put(record_key(promise_id), value)
    index = deadline_key(promise.timeout, promise_id)
    if promise.state == "PENDING":
        batch.put(index, b"")
    else:
        batch.delete(index)
