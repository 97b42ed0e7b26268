"""Typed errors whose messages tell a user what to do; the CLI prints them as one sentence."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dp.wire import Reply


class DpError(Exception):
    """Base class: every message is a complete sentence a user can act on."""


class BrokerUnreachable(DpError):
    """No Kafka broker answered at the configured bootstrap servers."""

    def __init__(self, bootstrap_servers: str, detail: str = "") -> None:
        suffix = f" ({detail})" if detail else ""
        super().__init__(
            f"no Kafka broker answered at {bootstrap_servers}{suffix}: start one with `scripts/kafka start` "
            "or point --bootstrap-servers / DP_BOOTSTRAP_SERVERS at yours."
        )
        self.bootstrap_servers = bootstrap_servers


class UsageError(DpError):
    """Options that do not go together; the message says which."""


class DataDirInUse(DpError):
    """Another running processor holds the data dir (and with it the transactional id)."""

    def __init__(self, path: object) -> None:
        super().__init__(
            f"the data dir {path} is in use by another running `dp serve`: give each processor its own "
            "--data-dir (DP_DATA_DIR)."
        )


class TopicsProblem(DpError):
    """The deployment's topics are missing or their partition counts disagree."""


class CommandInDoubt(DpError):
    """A command whose fate is unknown: the processor may still apply it, and a retry is safe."""

    def __init__(self, reason: str, op: str, promise_id: str, idempotency_key: str | None) -> None:
        retry = "retrying is safe"
        if idempotency_key:
            retry = f"retrying with the same idempotency key ({idempotency_key!r}) is safe"
        super().__init__(f"{reason}: {op} {promise_id!r} may still be applied; {retry}.")
        self.op = op
        self.promise_id = promise_id
        self.idempotency_key = idempotency_key


class ReplyTimeout(CommandInDoubt):
    """No reply arrived within the caller's bound (no processor running, or one far behind)."""

    def __init__(self, seconds: float, op: str, promise_id: str, idempotency_key: str | None) -> None:
        super().__init__(f"no reply within {seconds:g}s (is `dp serve` running?)", op, promise_id, idempotency_key)
        self.seconds = seconds


class SendFailed(CommandInDoubt):
    """Kafka did not acknowledge the command, or the replies could no longer be read."""


class WaitTimeout(DpError):
    """The promise did not complete within the time the caller was willing to wait."""

    def __init__(self, promise_id: str, seconds: float) -> None:
        super().__init__(f"promise {promise_id!r} did not complete within {seconds:g}s: wait again, or longer.")
        self.promise_id = promise_id
        self.seconds = seconds


class SearchBusy(DpError):
    """A search found no instant at which every partition agreed: what it matches kept changing."""

    def __init__(self, rounds: int) -> None:
        super().__init__(
            f"the search did not settle in {rounds} rounds because the promises it matches kept changing: "
            "retry it, or narrow it (a longer id prefix, a state, a tag) so that fewer writes touch it."
        )
        self.rounds = rounds


class ClientClosed(DpError):
    """The client was used outside `async with` (or after it closed)."""

    def __init__(self) -> None:
        super().__init__("the client is not running: use it inside `async with Promises(...) as promises:`.")


class Refused(DpError):
    """A KO reply as an exception, for callers who ask (`Result.raise_for_status()`) and for `wait`."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{_refusal(reply)} ({reply.op or 'command'} refused: {reply.status}).")
        self.reply = reply


def _refusal(reply: Reply) -> str:
    subject = f"promise {reply.id!r}"
    if reply.status == "not_found":
        return f"{subject} does not exist"
    if reply.status == "already_pending":
        return f"{subject} already exists, pending, created with another idempotency key"
    if reply.status.startswith("already_"):
        return f"{subject} is already {reply.status.removeprefix('already_').replace('timedout', 'timed out')}"
    return reply.error or "the command was not applied"
