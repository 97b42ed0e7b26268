"""What a failed transaction or partition opening means, decided in one place, so that each kind gets its
one reaction."""

from __future__ import annotations

import enum

from aiokafka.errors import (
    IllegalGenerationError,
    InvalidProducerEpoch,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    ProducerFenced,
    RebalanceInProgressError,
    TransactionCoordinatorFenced,
    UnknownMemberIdError,
    UnknownTopicOrPartitionError,
)

from consumers.kip447 import FencedInstanceIdError
from consumers.restore import StoreAhead
from consumers.store import RestoreFailed


class Failure(enum.Enum):
    FENCED = "fenced by the consumer group"
    """The group moved on to a newer generation (the offsets were refused): the partitions may be another
    process's now, so wait for the rebalance rather than reopen them at once."""
    RETRIABLE = "a transient failure"
    """The network, a broker, a timeout, or a producer epoch bumped by the coordinator after a transaction
    timed out: reopen from Kafka's truth after a short backoff."""
    POISON = "a record Kafka refuses"
    """A send refused for what it carried: find the command behind it, refuse it, commit the rest."""
    FATAL = "a failure that needs an operator"
    """A bug, bad configuration or an unreadable changelog: say so loudly, retry rarely."""


def classify(error: BaseException, *, from_send: bool = False) -> Failure:
    """The kind of `error`; `from_send` when it is the outcome of one record batch's send."""
    if isinstance(
        error, IllegalGenerationError | UnknownMemberIdError | FencedInstanceIdError | RebalanceInProgressError
    ):
        return Failure.FENCED
    if isinstance(error, ProducerFenced | InvalidProducerEpoch | TransactionCoordinatorFenced):
        return Failure.RETRIABLE  # the transactional id is this data dir's alone (its lock), so no one else holds it
    if from_send and isinstance(error, UnknownTopicOrPartitionError):
        return Failure.POISON  # a reply topic deleted under us: the next check refuses the command
    if isinstance(error, KafkaError) and from_send and not error.retriable:
        return Failure.POISON
    if isinstance(error, RestoreFailed):
        return Failure.FATAL
    if isinstance(error, StoreAhead | KafkaConnectionError | KafkaTimeoutError | TimeoutError | OSError):
        return Failure.RETRIABLE
    if isinstance(error, KafkaError) and error.retriable:
        return Failure.RETRIABLE
    return Failure.FATAL
