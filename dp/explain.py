"""Why a record did not decode, in dp's own words.

msgspec says *that* a record is malformed; how it words the reason is its own business and changes
between releases. So on the error path (never on the hot path) dp looks again for itself: the JSON
position from the standard library's structured error, and the first field that breaks the schema
from walking the target type's `msgspec.inspect` description over the plain decoded JSON. Anything
this walk does not recognise still gets a sentence of ours, never a library's.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from msgspec import inspect

_KINDS: Final[dict[type, str]] = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


_BASE64: Final = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


def malformed_json(data: bytes) -> str:
    """Why `data` is not a JSON document."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"not valid JSON: not UTF-8 at byte {error.start}"
    try:
        document = _parse(text)
    except _NotJson:
        return "not valid JSON: NaN and Infinity are not JSON numbers"
    except RecursionError:
        return "not valid JSON: nested too deeply"
    except json.JSONDecodeError as error:
        if not text[error.pos :].strip():
            return "not valid JSON: the text ends before the document does"
        return f"not valid JSON at byte {len(text[: error.pos].encode())}"
    except ValueError:
        return "not valid JSON"
    if _has_lone_surrogate(document):
        return "not valid JSON: a string holds an unpaired surrogate escape (\\ud800 to \\udfff)"
    return "not valid JSON"


def invalid_document(data: bytes, target: Any) -> str:
    """Why `data`, well-formed JSON, is not a `target` (a msgspec type: a struct or a tagged union)."""
    try:
        document = _parse(data.decode("utf-8"))
    except (ValueError, RecursionError):  # msgspec can refuse the type before it reads the rest
        return malformed_json(data)
    return _problem(document, inspect.type_info(target), "") or "not a valid document: see docs/wire.md"


class _NotJson(ValueError):
    """A constant the standard library accepts but JSON (and msgspec) does not."""


class _Object(dict[str, Any]):
    """A JSON object that remembers every value of a repeated key (msgspec checks each of them)."""

    repeats: dict[str, list[Any]]

    def occurrences(self, key: str) -> list[Any]:
        return self.repeats.get(key) or [self[key]]


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    found = _Object(pairs)
    found.repeats = {}
    if len(found) < len(pairs):
        for key, value in pairs:
            found.repeats.setdefault(key, []).append(value)
    return found


def _refuse_constant(name: str) -> Any:
    raise _NotJson(name)


def _bounded_int(digits: str) -> int:
    """Integers past any 64-bit range read as just past it: Python refuses over 4,300 digits outright."""
    return int(digits) if len(digits) < 40 else (-(2**64) if digits.startswith("-") else 2**64)


def _parse(text: str) -> Any:
    return json.loads(text, parse_constant=_refuse_constant, parse_int=_bounded_int, object_pairs_hook=_object)


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(char) <= 0xDFFF for char in value)
    if isinstance(value, dict):
        return any(_has_lone_surrogate(key) or _has_lone_surrogate(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(item) for item in value)
    return False


def _problem(value: Any, expected: inspect.Type, path: str) -> str | None:
    """The first way `value` breaks `expected`, as "`path`: what is wrong"; None when it fits."""
    if isinstance(expected, inspect.UnionType):
        structs = tuple(option for option in expected.types if isinstance(option, inspect.StructType))
        if structs and len(structs) == len(expected.types):
            return _tagged(value, structs, path)
    if isinstance(expected, inspect.StructType):
        return _struct(value, expected, path)
    if isinstance(expected, inspect.UnionType):
        fitting = [option for option in expected.types if _has_type(value, option)]
        if fitting:
            return _problem(value, fitting[0], path)
        return _at(path, f"expected {' or '.join(_name(t) for t in expected.types)}, got {_kind(value)}")
    if not _has_type(value, expected):
        return _at(path, f"expected {_name(expected)}, got {_kind(value)}")
    if isinstance(expected, inspect.DictType):
        for key, item in value.items():
            found = _problem(item, expected.value_type, f'{path}["{key}"]')
            if found:
                return found
        return None
    return _at(path, broken) if (broken := _constraint(value, expected)) else None


def _tagged(value: Any, options: tuple[inspect.StructType, ...], path: str) -> str | None:
    if not isinstance(value, dict):
        return f"not a JSON object: got {_kind(value)}"
    tag_field = options[0].tag_field or ""
    tags = {str(option.tag): option for option in options}
    listing = ", ".join(tags)
    if tag_field not in value:
        return _at(_join(path, tag_field), f"required, one of {listing}")
    for tag in _occurrences(value, tag_field):
        if not isinstance(tag, str):
            return _at(_join(path, tag_field), f"expected one of {listing}, got {_kind(tag)}")
        if tag not in tags:
            return _at(_join(path, tag_field), f"unknown {tag_field} {tag!r}, expected one of {listing}")
    return _struct(value, tags[_occurrences(value, tag_field)[0]], path)


def _struct(value: Any, expected: inspect.StructType, path: str) -> str | None:
    if not isinstance(value, dict):
        return (
            _at(path, f"expected an object, got {_kind(value)}") if path else f"not a JSON object: got {_kind(value)}"
        )
    for field in expected.fields:
        where = _join(path, field.encode_name)
        if field.encode_name not in value:
            if field.required:
                return _at(where, f"required for {expected.tag}" if expected.tag else "required")
            continue
        for occurrence in _occurrences(value, field.encode_name):
            found = _problem(occurrence, field.type, where)
            if found:
                return found
    return None


def _occurrences(value: dict[str, Any], key: str) -> list[Any]:
    return value.occurrences(key) if isinstance(value, _Object) else [value[key]]


def _has_type(value: Any, expected: inspect.Type) -> bool:
    if isinstance(expected, inspect.IntType):
        return type(value) is int
    if isinstance(expected, inspect.StrType | inspect.BytesType):
        return type(value) is str
    if isinstance(expected, inspect.BoolType):
        return type(value) is bool
    if isinstance(expected, inspect.NoneType):
        return value is None
    if isinstance(expected, inspect.DictType | inspect.StructType):
        return isinstance(value, dict)
    return True


def _constraint(value: Any, expected: inspect.Type) -> str | None:
    if isinstance(expected, inspect.IntType):
        if expected.ge is not None and value < expected.ge:
            return f"must be at least {expected.ge}"
        if expected.le is not None and value > expected.le:
            return f"must be at most {expected.le}"
    if isinstance(expected, inspect.StrType) and expected.min_length and len(value) < expected.min_length:
        return "must not be empty" if expected.min_length == 1 else f"needs at least {expected.min_length} characters"
    if isinstance(expected, inspect.BytesType) and not _BASE64.fullmatch(value):
        return "not valid base64"
    return None


def _name(expected: inspect.Type) -> str:
    names = {
        inspect.IntType: "an integer",
        inspect.StrType: "a string",
        inspect.BytesType: "base64 text",
        inspect.BoolType: "true or false",
        inspect.NoneType: "null",
        inspect.DictType: "an object",
        inspect.StructType: "an object",
    }
    return names.get(type(expected), "a valid value")


def _kind(value: Any) -> str:
    return "an object" if isinstance(value, dict) else _KINDS.get(type(value), "a value")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _at(path: str, problem: str) -> str:
    return f"`{path}`: {problem}"
