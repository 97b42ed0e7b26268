"""Generate the wire contract's JSON Schema from the msgspec types: `python -m dp.schema [PATH]`.

The schema is derived, never edited by hand; a test checks that the committed copy is current.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import msgspec

from dp.wire import Command, Event, Notification, Promise, Reply

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "docs" / "wire.schema.json"


def generate() -> str:
    """The schema document: one `$defs` entry per wire type, `Command` being the union tagged by `op`."""
    (command, reply, event, promise, notification), defs = msgspec.json.schema_components(
        (Command, Reply, Event, Promise, Notification), ref_template="#/$defs/{name}"
    )
    document = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "dp wire contract v1",
        "description": "Commands (dp.commands), replies, events (dp.events), promise records "
        "(dp.changelog) and notifications. Unknown fields are ignored. See docs/wire.md.",
        "$defs": {"Command": command, **defs},
        "anyOf": [{"$ref": "#/$defs/Command"}, reply, event, promise, notification],
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def write_generated(text: str, argv: list[str], default: Path) -> None:
    """Write a generated document to the path given on the command line, else to its committed place."""
    path = Path(argv[0]) if argv else default
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")


def main(argv: list[str]) -> None:
    write_generated(generate(), argv, DEFAULT_PATH)


if __name__ == "__main__":
    main(sys.argv[1:])
