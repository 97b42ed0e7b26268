"""Configuration in one place: where Kafka is, how to reach it securely, and what the topics are called.

Every command line flag has an environment fallback (`DP_*`) and a default that works on a
developer machine with `scripts/kafka start`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

DEFAULT_BOOTSTRAP_SERVERS = "127.0.0.1:9092"
DEFAULT_PARTITIONS = 8


def env(name: str, default: str) -> str:
    return os.environ.get(name) or default


@dataclass(frozen=True)
class Topics:
    """The five topics of a deployment (WIRE.md); a prefix renames them all at once."""

    commands: str = "dp.commands"
    events: str = "dp.events"
    changelog: str = "dp.changelog"
    replies: str = "dp.replies"
    dlq: str = "dp.dlq"

    @classmethod
    def with_prefix(cls, prefix: str) -> Topics:
        return cls(*(f"{prefix}.{name}" for name in ("commands", "events", "changelog", "replies", "dlq")))

    @classmethod
    def from_env(cls) -> Topics:
        return cls.with_prefix(env("DP_TOPIC_PREFIX", "dp"))


@dataclass(frozen=True)
class Kafka:
    """How to reach the brokers; passed to every aiokafka client we create."""

    bootstrap_servers: str = field(default_factory=lambda: env("DP_BOOTSTRAP_SERVERS", DEFAULT_BOOTSTRAP_SERVERS))
    security_protocol: str = field(default_factory=lambda: env("DP_SECURITY_PROTOCOL", "PLAINTEXT"))
    sasl_mechanism: str = field(default_factory=lambda: env("DP_SASL_MECHANISM", "PLAIN"))
    sasl_username: str | None = field(default_factory=lambda: os.environ.get("DP_SASL_USERNAME"))
    sasl_password: str | None = field(default_factory=lambda: os.environ.get("DP_SASL_PASSWORD"))
    ssl_cafile: str | None = field(default_factory=lambda: os.environ.get("DP_SSL_CAFILE"))

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments common to aiokafka's producer, consumer and admin client."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol.startswith("SASL"):
            options.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        if self.security_protocol.endswith("SSL"):
            from aiokafka.helpers import create_ssl_context

            options["ssl_context"] = create_ssl_context(cafile=self.ssl_cafile)
        return options
