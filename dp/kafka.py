"""Every aiokafka client dp creates, built here from one `Kafka` settings object, one function a role.

Like Kafka Streams' `StreamsConfig.get*Configs`, each role's tuning lives in one place: the
processor's command consumer, the changelog restore consumer, the readers of replies and events,
plain and transactional producers, the admin client and the bare metadata client. `started` opens any
of them and turns "no broker answered" into `BrokerUnreachable`, a sentence that says what to do.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaConnectionError, KafkaError
from aiokafka.helpers import create_ssl_context

from dp.errors import BrokerUnreachable
from dp.settings import Kafka

# The largest record dp writes. Topics are created with room for it: a promise at the size limits
# (param and value each up to 512 KiB decoded, base64 on the wire, in one record) must never meet
# Kafka's 1 MB default and fail its transaction forever.
MAX_MESSAGE_BYTES: Final = 8 * 1024 * 1024
# As Kafka Streams sets it under exactly-once: a transaction abandoned by a process that froze or died is
# aborted by the coordinator within seconds, so a partition's next owner (invariant I5) never waits long.
TRANSACTION_TIMEOUT_MS: Final = 10_000
# The longest `discard` waits for a failed producer to stop before it tears it down.
DISCARD_S: Final = 10.0


def options(kafka: Kafka) -> dict[str, Any]:
    """Keyword arguments every aiokafka client takes: where the brokers are and how to reach them."""
    common: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "security_protocol": kafka.security_protocol,
    }
    if kafka.security_protocol.startswith("SASL"):
        common.update(
            sasl_mechanism=kafka.sasl_mechanism,
            sasl_plain_username=kafka.sasl_username,
            sasl_plain_password=kafka.sasl_password,
        )
    if kafka.security_protocol.endswith("SSL"):
        common["ssl_context"] = create_ssl_context(cafile=kafka.ssl_cafile)
    return common


def command_consumer(kafka: Kafka, group: str) -> AIOKafkaConsumer:
    """The group member that owns command partitions (a processor, or the benchmark's baseline pipe).

    Offsets are committed only inside the writers' transactions, never by the consumer itself.
    """
    return AIOKafkaConsumer(
        **options(kafka),
        group_id=group,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        max_poll_interval_ms=300_000,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
        fetch_max_wait_ms=50,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )


def restore_consumer(kafka: Kafka) -> AIOKafkaConsumer:
    """Replays a changelog partition into a store: large fetches, committed records only, no group."""
    return AIOKafkaConsumer(
        **options(kafka),
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=32 * 1024 * 1024,
    )


def watermark_reader(kafka: Kafka) -> AIOKafkaConsumer:
    """Reads high watermarks (`end_offsets` of uncommitted data), which open transactions hold back from
    a read_committed consumer: the gap between the two is a transaction still open."""
    return AIOKafkaConsumer(**options(kafka), isolation_level="read_uncommitted", enable_auto_commit=False)


def reader(kafka: Kafka, group: str | None = None, **tuning: Any) -> AIOKafkaConsumer:
    """Reads replies or events: only what the processor committed, and it commits nothing by itself."""
    return AIOKafkaConsumer(
        **options(kafka),
        group_id=group,
        isolation_level="read_committed",
        enable_auto_commit=False,
        **{"fetch_max_wait_ms": 100, **tuning},
    )


def producer(kafka: Kafka, **tuning: Any) -> AIOKafkaProducer:
    """Sends commands: idempotent, so a retried send never writes a command twice."""
    return AIOKafkaProducer(**options(kafka), **{"enable_idempotence": True, "linger_ms": 0, **tuning})


def transactional_producer(kafka: Kafka, transactional_id: str) -> AIOKafkaProducer:
    """The committer's producer (and the baseline pipe's): a cycle's replies, events, changelog records and
    consumer offsets commit in one transaction; a newer producer with the same id fences it."""
    return AIOKafkaProducer(
        **options(kafka),
        transactional_id=transactional_id,
        acks="all",
        linger_ms=0,
        retry_backoff_ms=5,
        max_batch_size=256 * 1024,
        max_request_size=MAX_MESSAGE_BYTES + 64 * 1024,
        request_timeout_ms=30_000,
        # Above the longest a transaction may take (its bytes are bounded; the committer abandons one after
        # PUBLISH_TIMEOUT_S), so the coordinator never aborts a transaction the committer still believes in.
        transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
    )


def admin(kafka: Kafka) -> AIOKafkaAdminClient:
    """Creates, describes and deletes topics."""
    return AIOKafkaAdminClient(**options(kafka), request_timeout_ms=10_000)


def metadata_client(kafka: Kafka) -> AIOKafkaClient:
    """Lists the cluster's topics and their partition counts, nothing else."""
    return AIOKafkaClient(**options(kafka))


C = TypeVar("C", AIOKafkaConsumer, AIOKafkaProducer, AIOKafkaAdminClient)


@asynccontextmanager
async def started(kafka: Kafka, client: C) -> AsyncIterator[C]:
    """Start `client`, yield it and always stop it; an unreachable broker is `BrokerUnreachable`."""
    try:
        await client.start()
    except KafkaConnectionError as error:
        await _stop(client)
        raise BrokerUnreachable(kafka.bootstrap_servers, str(error)) from None
    try:
        yield client
    finally:
        await _stop(client)


async def discard(producer: AIOKafkaProducer, seconds: float = DISCARD_S) -> None:
    """Stop a producer after a transactional failure, never to be reused, within `seconds`.

    aiokafka's `stop()` first waits for every pending batch, which never comes when a send is retried
    forever (a deleted topic's AddPartitionsToTxn); past the bound, or when the caller is cancelled
    meanwhile, its sender is cancelled and its connections closed. The transaction it left open is
    aborted by the next producer with its id.
    """
    try:
        await asyncio.wait_for(producer.stop(), seconds)
    except (TimeoutError, KafkaError):
        await _abandon(producer)
    except BaseException:
        await _abandon(producer)
        raise


async def _abandon(producer: AIOKafkaProducer) -> None:
    sender = producer._sender.sender_task
    if sender is not None:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    await producer.client.close()


async def _stop(client: AIOKafkaConsumer | AIOKafkaProducer | AIOKafkaAdminClient) -> None:
    if isinstance(client, AIOKafkaAdminClient):
        await client.close()
    else:
        await client.stop()
