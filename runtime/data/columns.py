"""Column paths of `DatasetSpec.columns`: a column name, then `.key` into a mapping or `[i]` into
a list (negative from the end), e.g. `answers.text[0]` takes the first answer of SQuAD's
`answers: {"text": [...], "answer_start": [...]}`.

The grammar is `spec.COLUMN_PATH` (checked when the spec is validated, offline and by the
apiserver). A column whose whole name is the path (a flat file with a column called `a.b`) is
used as it is, so mappings written before paths existed mean what they meant.
"""

from __future__ import annotations

import re
from typing import Any

_STEP = re.compile(r"\.([^.\[\]]+)|\[(-?[0-9]+)\]")
MISSING = object()


class PathError(ValueError):
    """The record does not have what the path names (the message says where it stopped)."""


def parse(path: str) -> tuple[str, list[str | int]]:
    """`answers.text[0]` → ("answers", ["text", 0])."""
    head = re.match(r"[^.\[\]]+", path)
    if head is None:
        raise ValueError(f"{path!r} is not a column path")
    steps: list[str | int] = []
    at = head.end()
    while at < len(path):
        m = _STEP.match(path, at)
        if m is None:
            raise ValueError(f"{path!r} is not a column path (at character {at + 1})")
        steps.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        at = m.end()
    return head.group(0), steps


def column_of(path: str) -> str:
    """The top-level column a path starts from."""
    try:
        return parse(path)[0]
    except ValueError:
        return path


def resolve(record: dict[str, Any], path: str) -> Any:
    """The value `path` names in `record`; MISSING when its column is absent or null.

    Raises PathError when the column is there but the path does not fit it (a key that is not
    in a mapping, an index past a list's end, a step into a value of another type)."""
    if path in record:
        value = record[path]
        return MISSING if value is None else value
    try:
        column, steps = parse(path)
    except ValueError:
        return MISSING
    value = record.get(column)
    if value is None:
        return MISSING
    walked = column
    for step in steps:
        if isinstance(step, int):
            if not isinstance(value, (list, tuple)):
                raise PathError(f"{walked!r} is {_kind(value)}, not a list: cannot take [{step}]")
            if not -len(value) <= step < len(value):
                raise PathError(f"{walked!r} has {len(value)} item(s): no [{step}]")
            value = value[step]
            walked += f"[{step}]"
        else:
            if not isinstance(value, dict):
                raise PathError(f"{walked!r} is {_kind(value)}, not a mapping: cannot take .{step}")
            if step not in value:
                keys = ", ".join(map(str, value)) or "none"
                raise PathError(f"{walked!r} has no key {step!r} (its keys: {keys})")
            value = value[step]
            walked += f".{step}"
        if value is None:
            return MISSING
    return value


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, str):
        return "text"
    return f"a {type(value).__name__}"
