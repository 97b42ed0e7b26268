"""`dp webhooks`: the launcher of the webhook poster, a third place the library starts what `consumers/` runs."""

from __future__ import annotations

import argparse

from dp.cli.options import EXIT_OK, Subcommands, add_connection_flags, service_logs
from dp.settings import WebhookSettings, add_flags, from_flags


def register(commands: Subcommands[argparse.ArgumentParser]) -> None:
    webhooks = commands.add_parser(
        "webhooks",
        help="post the notifications of webhook subscriptions to their URLs (docs/webhooks.md)",
        description="Read the notifications topic as a consumer group and POST each notification to its "
        "webhook's URL, at least once, with an Idempotency-Key that is the same on every retry; after the last "
        "attempt it goes to the DLQ. Only hosts in --webhook-hosts are posted to. Run any number with the same "
        "--webhook-group to share the work. SIGTERM/SIGINT finish the POSTs in flight (up to --webhook-grace), "
        "commit and exit 0.",
    )
    add_flags(webhooks, WebhookSettings, "webhooks")
    add_connection_flags(webhooks)
    webhooks.set_defaults(handler=run_webhooks)


async def run_webhooks(args: argparse.Namespace) -> int:
    from consumers.webhooks import serve

    settings = from_flags(WebhookSettings, args)
    service_logs(settings.log_level)
    await serve(settings)
    return EXIT_OK
