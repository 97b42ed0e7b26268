"""Which topics exist, and with how many partitions, so each command's `replyTo` can be checked."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

from dp.kafka import metadata_client
from dp.settings import Kafka

METADATA_REFRESH_S = 1.0


class ReplyTopics(Mapping[str, int]):
    """Partition counts of the cluster's topics, so commands can be checked against their `replyTo`.

    A lookup that misses is remembered; the writer then refreshes (at most once a second) and
    recomputes its batch, so a reply topic created a moment ago is found and hostile input naming
    random topics costs at most one metadata request per second.
    """

    def __init__(self, kafka: Kafka) -> None:
        self._client = metadata_client(kafka)
        self._counts: dict[str, int] = {}
        self._refreshed = 0.0
        self.missed = False

    async def start(self) -> None:
        await self._client.bootstrap()
        await self.refresh()

    async def close(self) -> None:
        await self._client.close()

    async def refresh(self) -> bool:
        """Reload the topic list unless that happened within the last second; True if it did."""
        if time.monotonic() - self._refreshed < METADATA_REFRESH_S:
            return False
        cluster = await self._client.fetch_all_metadata()
        self._counts = {topic: len(cluster.partitions_for_topic(topic) or ()) for topic in cluster.topics()}
        self._refreshed = time.monotonic()
        self.missed = False
        return True

    def __getitem__(self, topic: str) -> int:
        try:
            return self._counts[topic]
        except KeyError:
            self.missed = True
            raise

    def __iter__(self) -> Iterator[str]:
        return iter(self._counts)

    def __len__(self) -> int:
        return len(self._counts)
