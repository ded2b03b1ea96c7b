"""NeMo-style dotted overrides: `--set stages.0.hyperparameters.maxSteps=100`.

The value is parsed as YAML (so `100`, `1e-4`, `true`, `[q_proj, v_proj]` get their types) and
set on the raw document before validation, so an override is validated exactly like the file.
Paths are relative to `spec` unless they start with `spec.` or `metadata.`.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from .errors import SpecError


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(doc: dict[str, Any], overrides: list[str], source: str | None = None) -> dict[str, Any]:
    """Return a copy of `doc` with every `path=value` applied. Raises SpecError on a bad path."""
    out = copy.deepcopy(doc)
    problems = []
    for item in overrides:
        path, sep, raw = item.partition("=")
        path = path.strip()
        if not sep or not path:
            problems.append(f"--set {item!r}: expected PATH=VALUE, e.g. stages.0.hyperparameters.maxSteps=100")
            continue
        parts = path.split(".")
        if parts[0] not in ("spec", "metadata"):
            parts = ["spec", *parts]
        try:
            _set(out, parts, _parse_value(raw))
        except (KeyError, IndexError, TypeError) as err:
            problems.append(f"--set {path}: {err.args[0] if err.args else err}")
    if problems:
        raise SpecError(problems, source)
    return out


def _set(node: Any, parts: list[str], value: Any) -> None:
    walked = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        walked.append(part)
        here = ".".join(walked)
        if isinstance(node, list):
            if not part.isdigit():
                raise TypeError(f"{here}: a list needs a numeric index")
            idx = int(part)
            if idx >= len(node):
                raise IndexError(f"{here}: index {idx} is out of range (the list has {len(node)} items)")
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if part not in node or node[part] is None:
                    node[part] = {}
                node = node[part]
        else:
            raise TypeError(f"{here}: cannot set a field inside a {type(node).__name__}")
