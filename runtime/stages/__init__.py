"""Stage implementations, one thin module per family, looked up by stage type."""

from __future__ import annotations

from importlib import import_module
from typing import Callable

from ..errors import UserError

# stage type → module (imported lazily: each pulls in torch/trl)
STAGE_MODULES: dict[str, str] = {
    "pt": "sft",
    "sft": "sft",
    "export": "export",
}


def stage_runner(stage_type: str, where: str = "type") -> Callable:
    module = STAGE_MODULES.get(stage_type)
    if module is None:
        raise UserError(
            f"stage type {stage_type!r} cannot run in this version yet; runnable: {', '.join(sorted(STAGE_MODULES))}",
            where,
        )
    return import_module(f"{__name__}.{module}").run
