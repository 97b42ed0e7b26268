"""Every setting of dp, declared once: name, environment variable, command line flag, help and default.

A setting is a field of one of the frozen dataclasses below, declared with `setting(...)`. Its
environment variable is `DP_` plus the upper-cased name and its flag the dashed name (`max_batch`:
`DP_MAX_BATCH`, `--max-batch`). The CLI derives its flags from these declarations (`add_flags`,
`from_flags`), libraries call `from_env()` or pass keyword arguments, and each default is written
here and nowhere else. Defaults work on a developer machine with `scripts/kafka start`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Self, TypeVar

from dp.durations import duration_seconds
from dp.errors import DpError
from dp.wire import DEFAULT_LIMITS, Limits

S = TypeVar("S", bound="Settings")
ENV_PREFIX: Final = "DP_"
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")
_DESCRIBED: Final[dict[Any, str]] = {int: "a whole number", float: "a number"}


class BadSetting(DpError):
    """An environment variable (or flag) holds a value of the wrong kind."""


def setting(
    default: Any,
    help: str,
    *,
    name: str | None = None,
    choices: tuple[str, ...] | None = None,
    secret: bool = False,
) -> Any:
    """Declare a setting: a dataclass field whose metadata the environment and the CLI read.

    `name` overrides the stem of the flag and variable when the field's own name would be ambiguous
    on a command line (`Topics.prefix` is `--topic-prefix`, `DP_TOPIC_PREFIX`); a `secret` never
    shows in a repr, so never in a log line.
    """
    return field(default=default, repr=not secret, metadata={"help": help, "name": name, "choices": choices})


@dataclass(frozen=True)
class Spec:
    """What one declared setting looks like from the outside."""

    field: str
    name: str
    help: str
    default: Any
    parse: Callable[[str], Any]
    choices: tuple[str, ...] | None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def read(self, environ: Mapping[str, str]) -> Any:
        """This setting's value from `environ`, or its default when unset or empty."""
        raw = environ.get(self.env)
        if not raw:
            return self.default
        if self.choices is not None and raw.upper() in self.choices:
            raw = raw.upper()
        if self.choices is not None and raw not in self.choices:
            raise BadSetting(f"{self.env}={raw!r} is not one of {', '.join(self.choices)}: fix or unset it.")
        try:
            return self.parse(raw)
        except ValueError:
            raise BadSetting(
                f"{self.env}={raw!r} is not {_DESCRIBED.get(self.parse, 'valid')}: fix or unset it."
            ) from None


class Settings:
    """Mixin of the settings dataclasses: build them from the environment or from parsed flags."""

    @classmethod
    def specs(cls) -> list[Spec]:
        hints = typing.get_type_hints(cls)
        return [
            Spec(
                item.name,
                item.metadata["name"] or item.name,
                item.metadata["help"],
                item.default,
                _parser(hints[item.name]),
                item.metadata["choices"],
            )
            for item in dataclasses.fields(cls)  # type: ignore[arg-type]
            if "help" in item.metadata
        ]

    @classmethod
    def parts(cls) -> dict[str, type[Settings]]:
        """Fields that are settings objects of their own (a processor's `kafka` and `topics`)."""
        hints = typing.get_type_hints(cls)
        return {name: hint for name, hint in hints.items() if isinstance(hint, type) and issubclass(hint, Settings)}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **given: Any) -> Self:
        """Every setting from `DP_*` variables (or its default), parts included; `given` fields win."""
        environ = os.environ if environ is None else environ
        values = {spec.field: spec.read(environ) for spec in cls.specs() if spec.field not in given}
        parts = {name: part.from_env(environ) for name, part in cls.parts().items() if name not in given}
        return cls(**values, **parts, **given)


def _parser(hint: Any) -> Callable[[str], Any]:
    """The type to parse a flag or variable with: the field's type, without `| None`."""
    options = [option for option in typing.get_args(hint) if option is not type(None)] or [hint]
    parse: Callable[[str], Any] = options[0]
    return parse


@dataclass(frozen=True)
class Kafka(Settings):
    """How to reach the brokers; `dp.kafka` passes it to every aiokafka client dp creates."""

    bootstrap_servers: str = setting("127.0.0.1:9092", "Kafka bootstrap servers")
    security_protocol: str = setting(
        "PLAINTEXT", "how to connect", choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
    )
    sasl_mechanism: str = setting("PLAIN", "SASL mechanism, e.g. PLAIN, SCRAM-SHA-256")
    sasl_username: str | None = setting(None, "SASL user name")
    sasl_password: str | None = setting(None, "SASL password", secret=True)
    ssl_cafile: str | None = setting(None, "CA bundle to verify the brokers with SSL")


@dataclass(frozen=True)
class Topics(Settings):
    """The six topics of a deployment (WIRE.md), named `<prefix>.commands` and so on."""

    prefix: str = setting("dp", "prefix of the six topics", name="topic_prefix")

    @property
    def commands(self) -> str:
        return f"{self.prefix}.commands"

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    @property
    def changelog(self) -> str:
        return f"{self.prefix}.changelog"

    @property
    def replies(self) -> str:
        return f"{self.prefix}.replies"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq"

    @property
    def notifications(self) -> str:
        """Where notifications for webhook subscriptions wait for `dp webhooks` to post them."""
        return f"{self.prefix}.notifications"

    @property
    def own(self) -> tuple[str, ...]:
        """The topics only dp writes: no reply or notification may go there."""
        return (self.commands, self.events, self.changelog, self.dlq, self.notifications)


MAX_SUBSCRIPTIONS: Final = 500
"""With every subscription at its size limits (about 6.4 KiB) and the promise at its own, a record still
fits the 8 MiB dp's topics take (`dp.kafka.MAX_MESSAGE_BYTES`)."""


@dataclass(frozen=True)
class ProcessorSettings(Settings):
    """One `dp serve` process: where it keeps state, how it batches, what it accepts."""

    kafka: Kafka = field(default_factory=Kafka)
    topics: Topics = field(default_factory=Topics)
    group: str = setting("dp", "application id: consumer group and transactional-id prefix")
    data_dir: Path = setting(
        Path("data"), "RocksDB root, and the home of the processor's transactional id: one processor per dir"
    )
    max_batch: int = setting(2_000, "most commands in one transaction (all partitions together)")
    max_batch_bytes: int = setting(
        4 * 1024 * 1024, "about the most command bytes in one transaction (memory: up to 4x queued per partition)"
    )
    max_record_bytes: int = setting(DEFAULT_LIMITS.max_record_bytes, "largest command accepted, in bytes")
    max_data_bytes: int = setting(DEFAULT_LIMITS.max_data_bytes, "largest decoded param or value data, in bytes")
    block_cache_mb: int = setting(
        64, "RocksDB block cache shared by this processor's partitions, in MiB (index and bloom filter blocks too)"
    )
    max_subscriptions: int = setting(
        DEFAULT_LIMITS.max_subscriptions,
        "most subscriptions one promise holds (waiting or notified; kept in its record)",
    )
    retention: str = setting(
        "",
        "how long a completed promise is kept after it completed (e.g. 7d, 12h; empty: forever); after it the "
        "promise is purged and its id is free again: get answers not_found, create makes a new promise; a "
        "promise's tag dp:retention (a duration, or forever) overrides it",
    )
    reply_topic_prefixes: str = setting(
        "", "comma-separated prefixes a command's replyTo must start with (default: any topic not the deployment's own)"
    )
    log_level: str = setting("INFO", "log level", choices=LOG_LEVELS)

    def __post_init__(self) -> None:
        if self.retention:
            try:
                positive = duration_seconds(self.retention) > 0
            except ValueError:
                positive = False
            if not positive:
                raise BadSetting(
                    f"retention {self.retention!r} is not a positive duration: use e.g. 7d, 12h or 30m in "
                    "--retention or DP_RETENTION, or leave it empty to keep completed promises forever."
                )
        if self.block_cache_mb < 1:
            raise BadSetting("block_cache_mb must be at least 1: fix --block-cache-mb or DP_BLOCK_CACHE_MB.")
        if not 1 <= self.max_subscriptions <= MAX_SUBSCRIPTIONS:
            raise BadSetting(
                f"max_subscriptions must be 1 to {MAX_SUBSCRIPTIONS} (a client's waits take one per promise, and "
                "each is kept in its promise's record, which must fit one Kafka record): fix --max-subscriptions "
                "or DP_MAX_SUBSCRIPTIONS."
            )

    @property
    def limits(self) -> Limits:
        return Limits(
            max_record_bytes=self.max_record_bytes,
            max_data_bytes=self.max_data_bytes,
            max_subscriptions=self.max_subscriptions,
        )

    @property
    def retention_ms(self) -> int | None:
        """How long a completed promise is kept, in milliseconds; None: forever."""
        return int(duration_seconds(self.retention) * 1000) if self.retention else None

    @property
    def reply_prefixes(self) -> tuple[str, ...]:
        return tuple(prefix.strip() for prefix in self.reply_topic_prefixes.split(",") if prefix.strip())


@dataclass(frozen=True)
class GatewaySettings(Settings):
    """One `dp gateway` process: the HTTP face of a deployment, one client (producer and reply reader) each."""

    kafka: Kafka = field(default_factory=Kafka)
    topics: Topics = field(default_factory=Topics)
    listen: str = setting("127.0.0.1:8001", "host:port the HTTP gateway listens on (0.0.0.0:8001 for every address)")
    tokens: str | None = setting(
        None,
        "comma-separated bearer tokens; when set, every route but /ping, /healthz, /readyz and /metrics needs "
        "`Authorization: Bearer <one of them>`",
        name="gateway_tokens",
        secret=True,
    )
    cursor_key: str | None = setting(
        None,
        "key that signs search cursors (default: random per process, so a cursor works only on the gateway that "
        "made it: give every gateway behind one load balancer the same key)",
        secret=True,
    )
    reply_timeout: float = setting(30.0, "seconds to await the processor's answer before answering 504")
    max_wait: float = setting(300.0, "longest long-poll (GET /promises/{id}?wait=...) in seconds; longer waits are cut")
    max_followers: int = setting(
        100,
        "most event streams open at once (each holds a Kafka consumer); beyond it they get 503",
    )
    log_level: str = setting("INFO", "log level", choices=LOG_LEVELS)

    def __post_init__(self) -> None:
        self.address  # noqa: B018 - refuses a malformed `listen` when the settings are made, not at bind time
        for name in ("reply_timeout", "max_wait"):
            if not getattr(self, name) > 0:
                flag = name.replace("_", "-")
                raise BadSetting(f"{name} must be a positive number of seconds: fix --{flag} or DP_{name.upper()}.")
        if self.max_followers < 0:
            raise BadSetting("max_followers must be 0 or more: fix --max-followers or DP_MAX_FOLLOWERS.")

    @property
    def address(self) -> tuple[str, int]:
        """`listen` as (host, port); an IPv6 host may be bracketed (`[::1]:8001`)."""
        host, _, port = self.listen.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not host or not port.isdigit() or int(port) > 65535:
            raise BadSetting(
                f"listen {self.listen!r} is not host:port (e.g. 127.0.0.1:8001): fix --listen or DP_LISTEN."
            )
        return host, int(port)

    @property
    def token_list(self) -> tuple[str, ...]:
        return tuple(token.strip() for token in (self.tokens or "").split(",") if token.strip())


@dataclass(frozen=True)
class WebhookSettings(Settings):
    """One `dp webhooks` process: posts the notifications of webhook subscriptions (docs/webhooks.md)."""

    kafka: Kafka = field(default_factory=Kafka)
    topics: Topics = field(default_factory=Topics)
    group: str | None = setting(
        None, "consumer group of the webhook posters (default: <topic prefix>-webhooks)", name="webhook_group"
    )
    hosts: str | None = setting(
        None,
        "comma-separated hosts webhooks may be posted to: `host` (any port), `host:port`, `*.example.com` "
        "(its subdomains), `[::1]:8080`; empty allows none, so every webhook goes to the DLQ",
        name="webhook_hosts",
    )
    timeout: float = setting(10.0, "seconds one POST may take before it counts as failed", name="webhook_timeout")
    first_delay: float = setting(0.5, "seconds before the first retry (doubling, full jitter)", name="webhook_delay")
    max_delay: float = setting(60.0, "longest wait between two attempts, in seconds", name="webhook_max_delay")
    attempts: int = setting(10, "attempts per notification before it goes to the DLQ", name="webhook_attempts")
    in_flight: int = setting(
        1_000, "notifications being delivered at once (fetching pauses beyond)", name="webhook_in_flight"
    )
    per_host: int = setting(8, "concurrent POSTs to one host:port", name="webhook_per_host")
    grace: float = setting(
        5.0,
        "seconds a stop waits for the POSTs in flight (the rest are posted again by the next run)",
        name="webhook_grace",
    )
    log_level: str = setting("INFO", "log level", choices=LOG_LEVELS)

    def __post_init__(self) -> None:
        positive = {"timeout": self.timeout, "first_delay": self.first_delay, "attempts": self.attempts,
                    "in_flight": self.in_flight, "per_host": self.per_host}  # fmt: skip
        for name, value in positive.items():
            if not value > 0:
                raise BadSetting(f"{name} must be above 0: fix {_where(type(self), name)}.")
        if self.max_delay < self.first_delay:
            raise BadSetting(f"max_delay must be at least first_delay: fix {_where(type(self), 'max_delay')}.")
        if self.grace < 0:
            raise BadSetting(f"grace must be 0 or more seconds: fix {_where(type(self), 'grace')}.")
        self.allowed_hosts  # noqa: B018 - refuses a malformed entry when the settings are made

    @property
    def group_id(self) -> str:
        return self.group or f"{self.topics.prefix}-webhooks"

    @property
    def allowed_hosts(self) -> tuple[tuple[str, int | None], ...]:
        """`hosts` as (lower-cased host or `*.suffix`, port or None for any port)."""
        return tuple(_host_entry(entry.strip()) for entry in (self.hosts or "").split(",") if entry.strip())


_HOST_ENTRY: Final = re.compile(r"(?P<host>(?:\*\.)?[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>\d{1,5}))?")


def _host_entry(entry: str) -> tuple[str, int | None]:
    match = _HOST_ENTRY.fullmatch(entry)
    if match is None or (match["port"] is not None and int(match["port"]) > 65535):
        raise BadSetting(
            f"webhook host {entry!r} is not host, host:port or *.domain (e.g. hooks.example.com:443): "
            "fix --webhook-hosts or DP_WEBHOOK_HOSTS."
        )
    port = None if match["port"] is None else int(match["port"])
    return match["host"].lower().removeprefix("[").removesuffix("]"), port


def _where(cls: type[Settings], field_name: str) -> str:
    """The flag and variable of a setting, for an error message."""
    (spec,) = (spec for spec in cls.specs() if spec.field == field_name)
    return f"{spec.flag} or {spec.env}"


# --- command line ----------------------------------------------------------------------------------


def add_flags(parser: argparse.ArgumentParser, cls: type[Settings], title: str) -> None:
    """One flag per setting of `cls` (its parts not included). A flag not given falls back, in
    `from_flags`, to its environment variable, then to its declared default: a variable is read (and
    refused when wrong) only by a command that uses it."""
    group = parser.add_argument_group(title)
    for spec in cls.specs():
        shown = "" if spec.default is None else f", default {spec.default}"
        group.add_argument(
            spec.flag,
            dest=spec.name,
            type=spec.parse,
            default=None,
            choices=spec.choices,
            help=f"{spec.help} (env {spec.env}{shown})",
        )


def from_flags(cls: type[S], args: argparse.Namespace) -> S:
    """The settings object whose flags `add_flags` declared, parts included; BadSetting names a wrong
    environment variable."""
    values = {spec.field: _given_or_env(spec, getattr(args, spec.name)) for spec in cls.specs()}
    parts = {name: from_flags(part, args) for name, part in cls.parts().items()}
    return cls(**values, **parts)


def _given_or_env(spec: Spec, given: Any) -> Any:
    return spec.read(os.environ) if given is None else given
