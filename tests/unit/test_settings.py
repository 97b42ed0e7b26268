"""Settings are declared once: the environment, the flags and the defaults all come from one field."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from dp.kafka import options
from dp.settings import (
    MAX_SUBSCRIPTIONS,
    BadSetting,
    GatewaySettings,
    Kafka,
    ProcessorSettings,
    Topics,
    add_flags,
    from_flags,
)


def parser_for(*classes: type[Kafka | Topics | ProcessorSettings]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    for cls in classes:
        add_flags(parser, cls, cls.__name__)
    return parser


def test_every_setting_has_a_variable_and_a_flag_named_after_it() -> None:
    names = {(spec.env, spec.flag) for cls in (Kafka, Topics, ProcessorSettings) for spec in cls.specs()}
    assert ("DP_BOOTSTRAP_SERVERS", "--bootstrap-servers") in names
    assert ("DP_TOPIC_PREFIX", "--topic-prefix") in names
    assert ("DP_MAX_BATCH", "--max-batch") in names
    assert len({env for env, _ in names}) == len(names)


def test_the_environment_overrides_defaults_and_parts_read_it_too() -> None:
    environ = {"DP_MAX_BATCH": "17", "DP_BOOTSTRAP_SERVERS": "kafka:9093", "DP_TOPIC_PREFIX": "orders", "DP_GROUP": ""}
    settings = ProcessorSettings.from_env(environ)
    assert settings.max_batch == 17
    assert settings.group == "dp"  # empty means unset
    assert settings.kafka.bootstrap_servers == "kafka:9093"
    assert settings.topics.commands == "orders.commands" and settings.topics.dlq == "orders.dlq"
    assert settings.data_dir == Path("data")


def test_given_fields_win_over_the_environment() -> None:
    kafka = Kafka.from_env({"DP_BOOTSTRAP_SERVERS": "a:1"}, bootstrap_servers="b:2")
    assert kafka.bootstrap_servers == "b:2"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DP_MAX_BATCH", "lots", "DP_MAX_BATCH='lots' is not a whole number: fix or unset it."),
        ("DP_LOG_LEVEL", "LOUD", "DP_LOG_LEVEL='LOUD' is not one of DEBUG, INFO, WARNING, ERROR: fix or unset it."),
    ],
)
def test_a_bad_variable_is_one_sentence_naming_it(variable: str, value: str, message: str) -> None:
    with pytest.raises(BadSetting) as raised:
        ProcessorSettings.from_env({variable: value})
    assert str(raised.value) == message


def test_flags_default_to_the_environment_and_build_the_same_object(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DP_DATA_DIR", "/var/lib/dp")
    parser = parser_for(Kafka, Topics, ProcessorSettings)
    args = parser.parse_args(["--max-batch", "5", "--topic-prefix", "x"])
    settings = from_flags(ProcessorSettings, args)
    assert settings == ProcessorSettings(topics=Topics("x"), data_dir=Path("/var/lib/dp"), max_batch=5)
    assert settings.limits.max_record_bytes == ProcessorSettings.max_record_bytes


def test_a_bad_variable_concerns_only_the_commands_that_read_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DP_MAX_BATCH", "lots")
    monkeypatch.setenv("DP_LOG_LEVEL", "info")  # any case will do
    args = parser_for(Kafka, Topics, ProcessorSettings).parse_args([])
    assert from_flags(Kafka, args) == Kafka()
    with pytest.raises(BadSetting, match="DP_MAX_BATCH='lots' is not a whole number"):
        from_flags(ProcessorSettings, args)
    assert ProcessorSettings.from_env({"DP_LOG_LEVEL": "debug"}).log_level == "DEBUG"


def test_a_flag_refuses_a_value_of_the_wrong_kind() -> None:
    with pytest.raises(argparse.ArgumentError, match="invalid int value"):
        parser_for(ProcessorSettings).parse_args(["--max-batch", "many"])


def test_a_password_never_shows_in_a_repr() -> None:
    kafka = Kafka(security_protocol="SASL_SSL", sasl_username="me", sasl_password="hunter2")
    assert "hunter2" not in repr(kafka) and "hunter2" not in repr(ProcessorSettings(kafka=kafka))


def test_client_options_carry_sasl_only_when_asked() -> None:
    assert "sasl_plain_password" not in options(Kafka())
    sasl = options(Kafka(security_protocol="SASL_PLAINTEXT", sasl_username="me", sasl_password="pw"))
    assert sasl["sasl_plain_username"] == "me" and sasl["sasl_plain_password"] == "pw"
    assert sasl["security_protocol"] == "SASL_PLAINTEXT" and "ssl_context" not in sasl


def test_gateway_settings_read_their_variables_and_keep_secrets_out_of_reprs() -> None:
    settings = GatewaySettings.from_env(
        {
            "DP_LISTEN": "[::1]:9000",
            "DP_GATEWAY_TOKENS": " t0ken-a, t0ken-b ,",
            "DP_CURSOR_KEY": "k3y",
            "DP_MAX_WAIT": "60",
        }
    )
    assert settings.address == ("::1", 9000) and settings.token_list == ("t0ken-a", "t0ken-b")
    assert settings.max_wait == 60.0 and settings.reply_timeout == 30.0
    assert "t0ken" not in repr(settings) and "k3y" not in repr(settings)
    assert GatewaySettings().address == ("127.0.0.1", 8001) and GatewaySettings().token_list == ()


@pytest.mark.parametrize("listen", ["8001", "localhost", ":8001", "host:port", "host:70000", "host:"])
def test_a_listen_address_that_is_not_host_port_is_one_sentence(listen: str) -> None:
    with pytest.raises(BadSetting) as raised:
        GatewaySettings.from_env({"DP_LISTEN": listen})
    assert str(raised.value) == f"listen {listen!r} is not host:port (e.g. 127.0.0.1:8001): fix --listen or DP_LISTEN."


def test_gateway_durations_must_be_positive() -> None:
    with pytest.raises(BadSetting, match="DP_REPLY_TIMEOUT"):
        GatewaySettings.from_env({"DP_REPLY_TIMEOUT": "0"})
    with pytest.raises(BadSetting, match="DP_MAX_WAIT='soon' is not a number"):
        GatewaySettings.from_env({"DP_MAX_WAIT": "soon"})


def test_the_subscription_bound_keeps_a_record_within_what_kafka_takes() -> None:
    assert ProcessorSettings(max_subscriptions=7).limits.max_subscriptions == 7
    with pytest.raises(BadSetting, match="--max-subscriptions"):
        ProcessorSettings(max_subscriptions=MAX_SUBSCRIPTIONS + 1)


def test_retention_and_the_block_cache_are_checked_when_settings_are_made() -> None:
    assert ProcessorSettings(retention="7d").retention_ms == 7 * 86_400_000
    assert ProcessorSettings().retention_ms is None
    for wrong in ("a week", "0", "0s"):
        with pytest.raises(BadSetting, match="--retention"):
            ProcessorSettings(retention=wrong)
    with pytest.raises(BadSetting, match="--block-cache-mb"):
        ProcessorSettings(block_cache_mb=0)
