"""Stage implementations, one thin module per family, looked up by stage type."""

from __future__ import annotations

from importlib import import_module
from typing import Callable

from ..api.errors import UserError
from ..api.stage_types import STAGE_TYPES

# stage type → module under kubetune.runtime.stages (imported lazily: each pulls in torch/trl)
STAGE_MODULES: dict[str, str] = {t: info.module for t, info in STAGE_TYPES.items()}


def stage_runner(stage_type: str, where: str = "type") -> Callable:
    module = STAGE_MODULES.get(stage_type)
    if module is None:
        raise UserError(f"unknown stage type {stage_type!r}; valid: {', '.join(STAGE_MODULES)}", where)
    try:
        return import_module(f"{__name__}.{module}").run
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{module}":
            raise
        raise UserError(f"stage type {stage_type!r} is not available in this version of kubetune", where) from None
