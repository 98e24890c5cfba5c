"""Validation errors in words a person reads: `field.path: message`, never the input.

One formatter for every place a pydantic `ValidationError` reaches a person: the relay's
`--check-config` and reload errors, the users file, and the operator's conditions and
Events for an invalid MailRelay or MailRoute spec. It never shows:

- input values (`input_value=...`): a users file holds password hashes, and a mistake can
  put a plaintext password where a hash belongs;
- pydantic internals: union member tags in paths (`lax-or-strict[...]`,
  `function-after[...]`, model class names, the discriminator's value), `For further
  information visit ...`, Python type names.

Validators that want to show a value (a CIDR with host bits, a domain pattern) put it in
their own message; those fields are never secret. YAML syntax errors are reported by line
and column only (`yaml_problem`), since PyYAML's snippet of the offending line would print
a secret from a secret file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

__all__ = ["format_path", "validation_problems", "yaml_problem"]

# Names pydantic-core gives union members in an error's `loc` (smart unions).
_SCHEMA_NAMES = frozenset(
    {"str", "int", "float", "bool", "none", "bytes", "list", "dict", "set", "tuple", "any"}
)
_DISCRIMINATORS = ("type",)
_PREFIXES = (
    ("Input should be", "must be"),
    ("String should", "must"),
    ("List should", "must"),
    ("Value should", "must"),
    ("Dictionary should", "must"),
    ("Tuple should", "must"),
    ("Set should", "must"),
    ("Value error, ", ""),
    ("Assertion failed, ", ""),
)
# Messages by error type where pydantic's words name Python types or show the input.
_MESSAGES = {
    "missing": "is required",
    "extra_forbidden": "is not a known setting; check its spelling and indentation",
    "model_type": "must be a mapping of settings (key: value)",
    "model_attributes_type": "must be a mapping of settings (key: value)",
    "dict_type": "must be a mapping (key: value)",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "set_type": "must be a list",
    "string_type": "must be a string",
    "string_unicode": "must be a string",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "is_instance_of": "has the wrong type",
    "is_subclass_of": "has the wrong type",
    "path_type": "must be a file path",
    "none_required": "must be empty (null)",
}


def _is_tag(part: str, node: object) -> bool:
    """Whether a `loc` element names a union member rather than a field of the input."""
    if any(c in part for c in "[(-") or part in _SCHEMA_NAMES or part[:1].isupper():
        return True
    # A discriminated union's member is named by its tag, the input's discriminator value
    # (`type: smtp` puts `smtp` in the path).
    return isinstance(node, Mapping) and any(node.get(key) == part for key in _DISCRIMINATORS)


def _input_path(loc: Sequence[int | str], data: object) -> list[int | str]:
    """`loc` without union member tags, found by walking the input alongside it."""
    path: list[int | str] = []
    node: object = data
    for part in loc:
        if isinstance(part, int):
            path.append(part)
            is_list = isinstance(node, Sequence) and not isinstance(node, str | bytes)
            node = (
                node[part]
                if isinstance(node, Sequence) and is_list and 0 <= part < len(node)
                else None
            )
        elif isinstance(node, Mapping) and part in node:
            path.append(part)
            node = node[part]
        elif _is_tag(part, node) or not (isinstance(node, Mapping) or node is None):
            continue  # a union member's name, not a place in the file
        else:
            path.append(part)  # a missing field (or one under a missing parent)
            node = None
    return path


def format_path(path: Sequence[int | str], *, root: str = "") -> str:
    """`routes[0].match.sender_domains`: dots between fields, brackets for list items."""
    text = root
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def _message(error: ErrorDetails) -> tuple[str, str | None]:
    """The message, and the field it is about when that is not the error's own path."""
    kind = error["type"]
    ctx: dict[str, Any] = dict(error.get("ctx") or {})
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        field = str(ctx.get("discriminator", "type")).strip("'\"")
        expected = ctx.get("expected_tags")
        if kind == "union_tag_not_found":
            return "is required" + (f" (one of {expected})" if expected else ""), field
        return f"must be one of {expected}", field
    if kind in _MESSAGES:
        return _MESSAGES[kind], None
    message = error["msg"]
    for prefix, replacement in _PREFIXES:
        if message.startswith(prefix):
            message = replacement + message[len(prefix) :]
            break
    return message, None


def validation_problems(error: ValidationError, data: object, *, root: str = "") -> list[str]:
    """One `field.path: message` line per problem, in the order pydantic found them.

    `data` is the input that was validated: the path is found by walking it, which tells
    the fields a person wrote from the names pydantic gives union members. Problems a union
    reports once per member (an address that is neither an IPv4 nor an IPv6 network) become
    one line.
    """
    by_path: dict[str, list[str]] = {}
    for problem in error.errors(include_url=False, include_input=False):
        path = _input_path(problem["loc"], data)
        message, field = _message(problem)
        if field is not None:
            path = [*path, field]
        messages = by_path.setdefault(format_path(path, root=root), [])
        if message not in messages:
            messages.append(message)
    return [f"{where}: {' or '.join(messages)}" for where, messages in by_path.items()]


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML syntax error by position and kind, without the snippet of the line."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        return f"{where}{_NON_PRINTABLE.sub('?', what)}"
    return "not valid YAML"


_NON_PRINTABLE = re.compile(r"[^\x20-\x7e]")
