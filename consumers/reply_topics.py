"""What the processor knows of the topics it may write replies to: partitions, size limit, compaction.

Commands name their reply topic (`replyTo`), so the processor must know, before it publishes, that
the topic exists, how many partitions it has, how large a record it accepts and whether it is
compacted or internal. Partition counts come from cluster metadata; configurations are described
only for the topics commands actually named, so a cluster with thousands of topics costs nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Final

from consumers.effects import KAFKA_DEFAULT_MAX_MESSAGE_BYTES, TopicInfo
from dp.kafka import admin
from dp.settings import Kafka
from dp.topics import topic_configs

# A topic deleted, created or reconfigured is noticed within this, even when nothing misses.
REFRESH_S: Final = 10.0
# A lookup that missed refreshes at most this often, so hostile input naming random topics costs
# at most one metadata request a second.
MISS_REFRESH_S: Final = 1.0
# Topics whose configuration is tracked (those commands named); hostile input cannot grow it past this.
MAX_TRACKED: Final = 10_000
CONFIGS: Final = ("max.message.bytes", "cleanup.policy")
OK = 0


class ReplyTopics(Mapping[str, TopicInfo]):
    """The topics commands may name, described. A lookup that misses counts in `misses` (a counter, not a
    flag: writers share this object, and one writer's refresh must not hide another's miss); the writer
    then settles and recomputes its batch, so a reply topic created a moment ago is found."""

    def __init__(self, kafka: Kafka, always: Iterable[str] = ()) -> None:
        self._admin = admin(kafka)
        self._info: dict[str, TopicInfo] = {}
        self._metadata: dict[str, tuple[int, bool]] = {}
        self._always = frozenset(always)
        self._tracked: set[str] = set(self._always)
        self._pending: set[str] = set()
        self._unconfirmed: set[str] = set()
        self._absent: set[str] = set()
        self._refreshed = float("-inf")
        self._lock = asyncio.Lock()
        self.misses = 0

    async def start(self) -> None:
        await self._admin.start()
        await self.refresh(force=True)

    async def close(self) -> None:
        await self._admin.close()

    async def settle(self) -> bool:
        """After a lookup missed: refresh if the rate limit allows, and when a missed name was never yet
        looked for in the cluster's metadata, wait for the limit to allow it (under a second), so that a
        topic created a moment ago is never refused as missing. True if anything was reloaded."""
        if await self.refresh():
            return True
        if not self._unconfirmed:
            return False
        await asyncio.sleep(max(0.0, self._refreshed + MISS_REFRESH_S - time.monotonic()))
        return await self.refresh()

    def expire(self) -> None:
        """Make the next batch reload everything: a publish failed, perhaps on a topic that is gone."""
        self._refreshed = float("-inf")

    @property
    def stale(self) -> bool:
        return time.monotonic() - self._refreshed > REFRESH_S

    async def refresh(self, *, force: bool = False) -> bool:
        """Reload what is known unless that happened within the last second; True if it did. A topic that
        exists but was never named before only needs its configuration, fetched at once."""
        async with self._lock:
            if self._pending and not force:
                pending, self._pending = list(self._pending), set()
                configs = await self._describe(pending)
                self._info.update(
                    (name, TopicInfo(self._metadata[name][0], *configs[name])) for name in pending if name in configs
                )
                return True
            if not force and time.monotonic() - self._refreshed < MISS_REFRESH_S:
                return False
            described = await self._admin.describe_topics()
            self._metadata = metadata = {
                topic["topic"]: (len(topic["partitions"]), bool(topic["is_internal"]))
                for topic in described
                if topic["error_code"] == OK and topic["partitions"]
            }
            wanted = [name for name in self._tracked if name in metadata and not metadata[name][1]]
            configs = await self._describe(wanted)
            self._info = {
                name: TopicInfo(metadata[name][0], *configs.get(name, (KAFKA_DEFAULT_MAX_MESSAGE_BYTES, False)))
                for name in self._tracked
                if name in metadata
            }
            self._info.update(
                (name, TopicInfo(count, internal=True)) for name, (count, internal) in metadata.items() if internal
            )
            if len(self._absent) > MAX_TRACKED:
                self._absent.clear()
            self._absent = (self._absent | self._unconfirmed) - metadata.keys()
            self._unconfirmed.clear()
            self._refreshed = time.monotonic()
            self._pending.clear()
            return True

    async def _describe(self, names: list[str]) -> dict[str, tuple[int, bool]]:
        """(max.message.bytes, compacted) of each topic that still exists."""
        return {
            name: (
                int(entries.get("max.message.bytes") or KAFKA_DEFAULT_MAX_MESSAGE_BYTES),
                "compact" in (entries.get("cleanup.policy") or ""),
            )
            for name, entries in (await topic_configs(self._admin, names, CONFIGS)).items()
        }

    def limits(self) -> dict[str, int]:
        """max.message.bytes of every known topic (a read that counts no miss)."""
        return {name: info.max_message_bytes for name, info in self._info.items()}

    def __getitem__(self, topic: str) -> TopicInfo:
        try:
            return self._info[topic]
        except KeyError:
            if len(self._tracked) < MAX_TRACKED:
                self._tracked.add(topic)
            if topic in self._metadata:
                self._pending.add(topic)
            elif topic not in self._absent:
                self._unconfirmed.add(topic)
            self.misses += 1
            raise

    def __iter__(self) -> Iterator[str]:
        return iter(self._info)

    def __len__(self) -> int:
        return len(self._info)
