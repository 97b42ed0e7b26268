"""The `dp` client subcommands: output, `--json` as the wire types, exit codes and one-sentence errors."""

from __future__ import annotations

import asyncio
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dp.cli.main import main
from dp.client import target_id
from dp.partitioning import partition_for
from dp.settings import Kafka, Topics
from dp.wire import (
    Reply,
    TopicTarget,
    WebhookTarget,
    decode_event,
    decode_notification,
    decode_promise,
    decode_reply,
)
from tests.support import REPO, ServeProcess, free_port, unique
from tests.test_commit_path import make_topic
from tests.wire_client import read_topic

CLIENT_COMMANDS = ("create", "resolve", "reject", "cancel", "get", "wait", "subscribe", "watch")


class Dp:
    """Runs `dp` in this process against the test's broker and topics, capturing its output."""

    def __init__(self, bootstrap_servers: str, topics: Topics, capsys: pytest.CaptureFixture[str]) -> None:
        self.options = ["--bootstrap-servers", bootstrap_servers, "--topic-prefix", topics.prefix]
        self.capsys = capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        """Exit code, stdout and stderr; argparse's usage errors exit too, with code 2."""
        try:
            code = main([args[0], *self.options, *args[1:]])  # the call's own options come last and win
        except SystemExit as exit:
            code = int(exit.code or 0)
        out, err = self.capsys.readouterr()
        return code, out, err

    def reply(self, *args: str) -> tuple[int, Reply]:
        code, out, _ = self(*args, "--json")
        assert len(out.splitlines()) == 1, out
        return code, decode_reply(out.encode())


@pytest.fixture
def dp(bootstrap_servers: str, topics: Topics, capsys: pytest.CaptureFixture[str]) -> Dp:
    return Dp(bootstrap_servers, topics, capsys)


def one_sentence(err: str) -> bool:
    return err.startswith("dp: ") and err.rstrip().endswith(".") and err.count("\n") == 1 and "Traceback" not in err


def test_commands_print_wire_json_and_exit_0_when_ok_1_when_refused(
    dp: Dp, spawn: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    spawn()
    order, other = unique("order"), unique("other")
    param = tmp_path / "param.json"
    param.write_bytes(b'{"item": 7}')
    code, created = dp.reply(
        "create", order, "--timeout", "1h", "--data", f"@{param}", "--header", "a=b", "--tag", "t=1",
        "--idempotency-key", "ik",
    )  # fmt: skip
    assert code == 0 and created.status == "created" and created.promise is not None
    assert created.promise.param.data == b'{"item": 7}' and created.promise.param.headers == {"a": "b"}
    assert created.promise.tags == {"t": "1"} and created.promise.idempotency_key_for_create == "ik"
    assert dp.reply("create", order, "--timeout", "1h", "--idempotency-key", "ik")[1].status == "deduplicated"

    code, out, err = dp("create", order, "--timeout", "2030-01-01T00:00:00Z")
    assert code == 1 and out.startswith(f"already_pending {order}\n  state     PENDING") and one_sentence(err)
    assert "already exists" in err

    code, out, err = dp("resolve", order, "--data", '"shipped"')
    assert (code, err) == (0, "") and out.startswith(f"resolved {order}") and 'value     "shipped"' in out
    code, rejected = dp.reply("reject", order)
    assert (code, rejected.status, rejected.ok) == (1, "already_resolved", False)
    assert dp("create", other, "--timeout", "90s")[0] == 0
    code, canceled = dp.reply("cancel", other, "--strict")
    assert (code, canceled.status) == (0, "canceled")

    code, found = dp.reply("get", order)
    assert (code, found.status) == (0, "found") and found.promise is not None and found.promise.state == "RESOLVED"
    code, missing = dp.reply("get", unique("missing"))
    assert (code, missing.status, missing.promise) == (1, "not_found", None)

    code, out, _ = dp("wait", order, "--json")
    assert code == 0 and decode_promise(out.encode()).value.data == b'"shipped"'
    code, out, _ = dp("wait", other)
    assert code == 1 and "REJECTED_CANCELED" in out
    code, _, err = dp("wait", unique("missing"))
    assert code == 1 and one_sentence(err) and "does not exist" in err
    pending = unique("pending")
    dp("create", pending, "--timeout", "1h")
    code, _, err = dp("wait", pending, "--timeout", "500ms")
    assert code == 2 and one_sentence(err) and "did not complete within 0.5s" in err


def test_watch_streams_events_until_interrupted(
    bootstrap_servers: str, topics: Topics, dp: Dp, spawn: Callable[..., ServeProcess]
) -> None:
    spawn()
    shown, hidden = unique("shown/a"), unique("hidden")
    for promise_id in (shown, hidden):
        dp("create", promise_id, "--timeout", "1h")
    dp("resolve", shown)
    with subprocess.Popen(  # leaving the block closes both pipes (else a ResourceWarning fails the test)
        [sys.executable, "-m", "dp.cli", "watch", "--json", "--from-beginning", "--prefix", "shown/", *dp.options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,  # unbuffered: `read_lines` selects on the pipe, so nothing may sit in a buffer
        cwd=REPO,
        preexec_fn=interruptible,
    ) as watch:
        try:
            events = [decode_event(line) for line in read_lines(watch, 2, seconds=30)]
            assert [(e.type, e.promise.id) for e in events] == [("created", shown), ("resolved", shown)]
            watch.send_signal(signal.SIGINT)
            assert watch.wait(10) == 130
            assert watch.stderr is not None and watch.stderr.read() == b""
        finally:
            watch.kill()


def interruptible() -> None:
    """Give the child Ctrl-C's default even when this suite runs with SIGINT ignored, as every command a
    script starts with `&` does: Python (so `dp watch`) leaves an inherited "ignore" alone."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def read_lines(process: subprocess.Popen[bytes], count: int, seconds: float) -> list[bytes]:
    """The first `count` lines a process prints, or TimeoutError once `seconds` pass."""
    assert process.stdout is not None
    deadline = time.monotonic() + seconds
    lines: list[bytes] = []
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while len(lines) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise TimeoutError(f"{len(lines)} of {count} lines after {seconds}s: {lines}")
            lines.append(process.stdout.readline())
    return lines


def test_usage_and_connection_problems_exit_2_with_one_sentence(dp: Dp) -> None:
    for bad in (
        ["create", "x"],
        ["create", "x", "--timeout", "soon"],
        ["create", "x", "--timeout", "2030-01-01T00:00:00"],
        ["resolve", "x", "--header", "no-equals-sign"],
        ["resolve", "x", "--data", "@/no/such/file"],
        ["watch", "--type", "exploded"],
    ):
        code, _, err = dp(*bad)
        assert code == 2 and err.splitlines()[-1].startswith(f"dp {bad[0]}: error: "), bad
    code, _, err = dp("create", "x", "--timeout", "1h", "--reply-timeout", "300ms")
    assert code == 2 and one_sentence(err) and "is `dp serve` running?" in err and "may still be applied" in err
    code, _, err = dp("get", "x", "--bootstrap-servers", f"127.0.0.1:{free_port()}")
    assert code == 2 and one_sentence(err) and "no Kafka broker answered" in err
    code, _, err = dp("get", "x", "--topic-prefix", unique("nothing"))
    assert code == 2 and one_sentence(err) and "dp topics create" in err


def test_every_subcommand_explains_itself(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    overview = capsys.readouterr().out
    for command in CLIENT_COMMANDS:
        assert re.search(rf"^    {command}\b", overview, re.MULTILINE), command
        with pytest.raises(SystemExit) as exit:
            main([command, "--help"])
        assert exit.value.code == 0
        text = capsys.readouterr().out
        assert "--bootstrap-servers" in text and "--json" in text and "exit status" in text


def test_subscribe_sends_one_notification_to_a_topic_and_says_what_it_did(
    dp: Dp, spawn: Callable[..., ServeProcess], kafka: Kafka
) -> None:
    spawn()
    inbox, order = f"inbox-{unique('cli')}", unique("order")
    asyncio.run(make_topic(kafka, inbox, partitions=2))
    assert dp("create", order, "--timeout", "1h")[0] == 0
    code, out, _ = dp("subscribe", order, "--topic", inbox, "--partition", "1")
    by_topic = target_id(TopicTarget(inbox, 1))
    assert code == 0 and f"subscription {by_topic!r} waits for the completion" in out
    code, again = dp.reply("subscribe", order, "--topic", inbox, "--partition", "1")
    assert code == 0 and again.status == "deduplicated" and again.subscription is not None
    code, hook = dp.reply("subscribe", order, "--url", "https://hooks.example/done", "--header", "X-Token=t")
    hook_id = target_id(WebhookTarget("https://hooks.example/done", {"X-Token": "t"}))
    assert code == 0 and hook.subscription is not None and hook.subscription.id == hook_id
    assert dp("resolve", order)[0] == 0
    code, out, _ = dp("subscribe", order, "--topic", inbox, "--subscription", "late")
    assert code == 0 and "subscription 'late' has been notified" in out
    records = asyncio.run(read_topic(kafka, inbox))
    notes = sorted((record.partition, decode_notification(record.value).subscription) for record in records)
    assert notes == sorted([(partition_for(order.encode(), 2), "late"), (1, by_topic)])

    code, _, err = dp("subscribe", order, "--url", "https://x/", "--key", "k")
    assert code == 2 and one_sentence(err) and "--key" in err
    code, _, err = dp("subscribe", unique("missing"), "--topic", inbox)
    assert code == 1 and one_sentence(err)
    code, _, err = dp("subscribe", order, "--topic", "no-such-topic")
    assert code == 1 and "does not exist" in err
