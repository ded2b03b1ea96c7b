"""Stage implementations, one thin module per family, looked up by stage type."""

from __future__ import annotations

from importlib import import_module
from typing import Callable

from ..errors import UserError

# stage type → module under kubetune.runtime.stages (imported lazily: each pulls in torch/trl)
STAGE_MODULES: dict[str, str] = {
    "pt": "sft",
    "sft": "sft",
    "rm": "reward",
    "dpo": "preference",
    "orpo": "preference",
    "simpo": "preference",
    "kto": "kto",
    "grpo": "online_rl",
    "rloo": "online_rl",
    "ppo": "ppo",
    "distill": "distill",
    "export": "export",
    "eval": "evaluate",
}


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
