"""Time a full restore of a deployment's changelog into empty stores, as a new processor would do it.

`python -m consumers.restore_probe --bootstrap-servers B --topic-prefix P` restores every changelog
partition into a temporary directory, removes it, and prints one JSON object: `seconds`, `records`
(what the changelog holds now: compaction and tombstones make it shrink) and `store_bytes` (the
restored stores on disk). `dp bench --soak` runs it at intervals while a processor serves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

from aiokafka import TopicPartition

from consumers.restore import restore
from consumers.store import PartitionStore
from dp.settings import Kafka, Topics
from dp.topics import check_topics


async def probe(kafka: Kafka, topics: Topics) -> dict[str, float]:
    partitions = await check_topics(kafka, topics)
    scratch = Path(tempfile.mkdtemp(prefix="dp-restore-probe-"))
    try:
        began, records = time.monotonic(), 0
        for partition in range(partitions):
            store = PartitionStore(scratch / f"partition-{partition}")
            try:
                records += await restore(kafka, TopicPartition(topics.changelog, partition), store)
            finally:
                store.close()
        seconds = time.monotonic() - began
        size = await asyncio.to_thread(disk_bytes, scratch)
        return {"seconds": round(seconds, 3), "records": records, "store_bytes": size}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def disk_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--topic-prefix", required=True)
    args = parser.parse_args()
    kafka, topics = Kafka(bootstrap_servers=args.bootstrap_servers), Topics(args.topic_prefix)
    print(json.dumps(asyncio.run(probe(kafka, topics))), flush=True)


if __name__ == "__main__":
    main()
