"""Search through the log against the real broker and processors: pages across partitions, cursors,
byte-bounded pages, the double collect under concurrent writes, and a store rebuilt from an older layout."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import pytest

from consumers.store import CREATED, CREATED_END, FORMAT_KEY, PartitionStore
from dp.client import Promises
from dp.errors import Refused, SearchBusy
from dp.partitioning import partition_for
from dp.search import BadCursor, Query
from dp.settings import Kafka, Topics
from tests.support import TEST_PARTITIONS, ServeProcess, unique

HOUR = timedelta(hours=1)


async def everything(promises: Promises, query: Query) -> list[list[str]]:
    """Every page of `query`, as ids."""
    pages = promises.search(query.pattern, state=query.state, tags=query.tags, limit=query.limit)
    return [[p.id for p in page.promises] async for page in pages]


async def test_pages_span_every_partition_newest_first_and_resume_by_cursor(promises: Promises) -> None:
    run = unique("s")
    ids = [f"{run}/{n:02d}" for n in range(25)]
    for id in ids:  # one at a time: creation times strictly increase with n
        (
            await promises.create(id, timeout=HOUR, tags={"even": str(n % 2 == 0)} if (n := int(id[-2:])) else {})
        ).raise_for_status()
    assert len({partition_for(id.encode(), TEST_PARTITIONS) for id in ids}) == TEST_PARTITIONS
    pages = await everything(promises, Query(f"{run}/*", limit=10))
    assert [len(page) for page in pages] == [10, 10, 5]
    assert [id for page in pages for id in page] == ids[::-1]
    (await promises.resolve(ids[3])).raise_for_status()
    assert await everything(promises, Query(f"{run}/*", "resolved")) == [[ids[3]]]
    assert await everything(promises, Query(f"{run}/*", tags={"even": "True"})) == [ids[2::2][::-1]]
    assert await everything(promises, Query(f"{run}/1*", "pending", limit=100)) == [ids[10:20][::-1]]
    assert await everything(promises, Query(ids[7])) == [[ids[7]]]
    assert await everything(promises, Query(f"nothing-{run}*")) == [[]]


async def test_a_cursor_from_elsewhere_is_refused(promises: Promises) -> None:
    page = await promises.search_page(Query("*", limit=1))
    with pytest.raises(BadCursor):
        await promises.search_page((page.cursor or "x.y")[:-3] + "AAA")
    other = Promises(kafka=promises.kafka, topics=promises.topics)
    with pytest.raises(BadCursor):
        await other.search_page(page.cursor or "")


async def test_large_payloads_make_more_pages_never_an_oversized_reply(promises: Promises) -> None:
    run = unique("big")
    blob = b"x" * 512 * 1024
    await asyncio.gather(*(promises.create(f"{run}/{n}", timeout=HOUR, param=blob) for n in range(24)))
    pages = await everything(promises, Query(f"{run}/*"))
    assert sorted(id for page in pages for id in page) == sorted(f"{run}/{n}" for n in range(24))
    assert len(pages) >= 4 and all(len(page) <= 6 for page in pages)  # a page carries at most 4 MiB


async def test_a_search_sees_every_write_acknowledged_before_it_while_writes_go_on(promises: Promises) -> None:
    run = unique("busy")
    started: set[str] = set()
    done: list[str] = []
    stop = asyncio.Event()

    async def write(writer: int) -> None:
        for n in range(45):  # two writers: 90 promises, so that one page of 100 holds them all
            if stop.is_set():
                return
            started.add(f"{run}/{writer}-{n}")
            (await promises.create(f"{run}/{writer}-{n}", timeout=HOUR)).raise_for_status()
            done.append(f"{run}/{writer}-{n}")

    writers = [asyncio.create_task(write(writer)) for writer in range(2)]
    try:
        settled = 0
        for _ in range(20):
            before = set(done)
            try:
                page = await promises.search_page(Query(f"{run}/*"))
            except SearchBusy:
                continue
            settled += 1
            seen = {p.id for p in page.promises}
            assert before <= seen, "a write acknowledged before the search began is missing"
            assert seen <= started, "the search shows a promise nobody created"
        assert settled > 0, "no search settled while two clients wrote"
    finally:
        stop.set()
        await asyncio.gather(*writers)


async def test_an_invalid_search_is_refused_with_the_reason(promises: Promises) -> None:
    with pytest.raises(Refused, match="at most 256 UTF-8 bytes"):
        await promises.search_page(Query("x" * 300))


async def test_a_store_of_the_previous_layout_is_rebuilt_from_the_changelog(
    kafka: Kafka, topics: Topics, spawn: Callable[..., ServeProcess]
) -> None:
    first = spawn("a")
    run = unique("old")
    async with Promises(kafka=kafka, topics=topics) as promises:
        for n in range(8):
            (await promises.create(f"{run}/{n}", timeout=HOUR)).raise_for_status()
        assert first.stop() == 0
        aged = 0
        for path in sorted((first.data_dir / first.group).glob("partition-*")):
            store = PartitionStore(path)
            if store.records():  # made format 1: no format key, no search index
                store._db.delete(FORMAT_KEY)
                store._db.delete_range(CREATED, CREATED_END)
                assert store.outdated
                aged += 1
            store.close()
        assert aged > 0
        spawn("a")
        page = await promises.search_page(Query(f"{run}/*"))
        assert sorted(p.id for p in page.promises) == sorted(f"{run}/{n}" for n in range(8))
    assert "rebuilding it from the changelog" in first.log.read_text()
