"""Typed errors whose messages tell a user what to do; the CLI prints them as one sentence."""


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


class TopicsProblem(DpError):
    """The deployment's topics are missing or their partition counts disagree."""
