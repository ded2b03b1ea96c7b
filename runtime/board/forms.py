"""What the board's "new run" form needs, torch-free: the FineTuneJob spec's JSON schema (from the
pydantic model the CRD is generated from), LLaMA-Factory's names of our fields (from
`convert.py`'s tables), the presets (the `examples/` files), and validation, plan and memory
estimate by the very functions of `kubetune validate`, `kubetune plan` and `kubetune estimate`.
"""

from __future__ import annotations

import copy
import re
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from ..api.errors import SpecError, UserError

# ------------------------------------------------------------------------------------- schema


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Every `$ref` inlined; `anyOf: [T, null]` (an optional field) becomes T with `nullable`."""
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].split("/")[-1]]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    node = {k: _inline(v, defs) for k, v in node.items()}
    options = node.get("anyOf")
    if isinstance(options, list):
        real = [o for o in options if o.get("type") != "null"]
        if len(real) < len(options) and len(real) == 1:
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            node = {**real[0], **rest, "nullable": True}
    return node


@lru_cache(maxsize=1)
def spec_schema() -> dict[str, Any]:
    """The JSON schema of `spec` of a FineTuneJob, every field with its description and default."""
    from ..api.spec import FineTuneJobSpec

    raw = FineTuneJobSpec.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _inline(raw, defs)


# ---------------------------------------------------------------------- LLaMA-Factory names


@lru_cache(maxsize=1)
def llamafactory_names() -> dict[str, str]:
    """Our field path (relative to spec, `[]` for any list item) → LLaMA-Factory's key, read from
    the tables `kubetune convert` converts with (so the two never disagree)."""
    from .. import convert as cv

    names: dict[str, str] = {}

    def add(prefix: str, table: dict[str, Any]) -> None:
        for lf_key, ours in table.items():
            field = ours[0] if isinstance(ours, tuple) else ours
            names.setdefault(f"{prefix}.{field}", lf_key)

    add("stages[].hyperparameters", cv._LF_HYPERPARAMETERS)
    add("stages[].hyperparameters", cv._LF_ADAM)
    add("stages[].hyperparameters.galore", cv._LF_GALORE)
    add("stages[].hyperparameters.apollo", cv._LF_APOLLO)
    add("stages[].hyperparameters.badam", cv._LF_BADAM)
    add("stages[].lora", cv._LF_LORA)
    add("stages[].lora", cv._LF_LORA_SWITCHES)
    add("stages[].freeze", cv._LF_FREEZE)
    add("stages[].preference", cv._LF_PREF)
    add("checkpoint", cv._LF_CHECKPOINT)
    return names


# ------------------------------------------------------------------------------------ presets

EXAMPLES_DIR_NAME = "examples"


def examples_dir() -> Path:
    """The `examples/` folder: inside the package when built as a wheel (setup.py copies it), else
    the source checkout's (an editable install)."""
    here = Path(__file__).resolve().parent
    for cand in (here / EXAMPLES_DIR_NAME, here.parents[1] / EXAMPLES_DIR_NAME):
        if (cand / "quickstart.yaml").is_file():
            return cand
    raise UserError(f"the examples folder is missing (looked in {here / EXAMPLES_DIR_NAME} and "
                    f"{here.parents[1] / EXAMPLES_DIR_NAME})")


def _example(name: str) -> dict[str, Any]:
    return yaml.safe_load((examples_dir() / name).read_text(encoding="utf-8"))


def presets() -> list[dict[str, Any]]:
    """The form's starting points: the quickstart (LoRA SFT), the same with a 4-bit base (QLoRA
    SFT, the method and quantisation of examples/sft-dpo-export.yaml's first stage) and the
    SFT → DPO → export pipeline, each as the FineTuneJob document of its example file."""
    lora = _example("quickstart.yaml")
    pipeline = _example("sft-dpo-export.yaml")
    qlora = copy.deepcopy(lora)
    qlora["metadata"]["name"] = "quickstart-qlora"
    first = pipeline["spec"]["stages"][0]
    qlora["spec"]["stages"][0].update(method=first["method"], quantization=copy.deepcopy(first["quantization"]))
    return [
        {"id": "lora-sft", "title": "LoRA SFT",
         "description": "Supervised fine-tuning of a LoRA adapter (rank 16) on instruction data "
                        "(examples/quickstart.yaml).", "job": lora},
        {"id": "qlora-sft", "title": "QLoRA SFT",
         "description": "The same adapter trained on a 4-bit (nf4, double-quantised) base: about a quarter "
                        "of the weights' memory.", "job": qlora},
        {"id": "sft-dpo-export", "title": "SFT → DPO → export",
         "description": "QLoRA SFT, then DPO on chosen/rejected pairs continuing the same adapter, then a "
                        "merged standalone model (examples/sft-dpo-export.yaml).", "job": pipeline},
    ]


# --------------------------------------------------------------------------------- validation

_PROBLEM = re.compile(r"^([^\s:]+): (.*)$", re.S)


def split_problem(text: str) -> dict[str, Any]:
    """`spec.stages[0].lora.rank: Input should be ...` → {"field", "message"} (field None when the
    problem names none)."""
    m = _PROBLEM.match(text)
    if m:
        return {"field": m.group(1), "message": m.group(2)}
    return {"field": None, "message": text}


def job_text(body: dict[str, Any]) -> str:
    """The YAML of the request body's `yaml`, or of its `job` document."""
    if isinstance(body.get("yaml"), str):
        return body["yaml"]
    job = body.get("job")
    if job is None:
        raise UserError('give the job as {"job": {...}} or {"yaml": "..."}', "job")
    return yaml.safe_dump(job, sort_keys=False)


def load_text(text: str):
    """Validate YAML text with `kubetune validate`'s own function (`spec.load_job`, through a file,
    so YAML errors read the same too). Returns (job or None, errors)."""
    from ..api.spec import load_job

    with tempfile.TemporaryDirectory(prefix="kubetune-board-") as tmp:
        path = Path(tmp) / "job.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            return load_job(path), []
        except SpecError as err:
            return None, [split_problem(p) for p in err.problems]
        except UserError as err:
            return None, [{"field": err.where if err.where != str(path) else None, "message": err.message}]


def plan_rows(job, output_root: str | None) -> list[dict[str, Any]]:
    """`kubetune plan -o json`'s stages, with the few facts the form shows first."""
    from ..api.plan import plan
    from ..api.stage_types import STAGE_TYPES

    rows = []
    for s in plan(job, output_root):
        io = s.io
        rows.append({
            "name": s.name, "type": s.stage.type,
            "method": s.stage.method if STAGE_TYPES[s.stage.type].trains else None,
            "reads": {"model": io.policy.model, "adapter": io.policy.adapter, "mergeAdapter": io.merge_adapter},
            "reference": io.reference.model_dump(exclude_none=True) if io.reference else None,
            "data": [f"{d.name} ({d.source})" for d in s.data],
            "writes": io.output, "outputKind": io.output_kind,
            "resolved": s.to_yaml_dict(),
        })
    return rows


def estimate_answer(job, params: str | None = None) -> dict[str, Any]:
    """`kubetune estimate`'s figures per stage; {"unavailable": why} when the model's size cannot be
    known here (a hub id without a size in its name, offline)."""
    from ..estimate import GIB, estimate_job

    try:
        arch, ests = estimate_job(job, params)
    except UserError as err:
        return {"unavailable": str(err)}
    return {
        "model": {"params": arch.params, "source": arch.source, "layers": arch.layers, "hidden": arch.hidden},
        "stages": [{"stage": e.stage, "method": e.method, "perDevice": f"{e.total / GIB:.1f} GiB", "bytes": e.total,
                    "breakdown": {k: f"{v / GIB:.1f} GiB" for k, v in e.parts.items()}, "notes": list(e.notes)}
                   for e in ests],
    }


def validate_body(body: dict[str, Any], output_root=None) -> dict[str, Any]:
    """The answer of POST /api/validate."""
    text = job_text(body)
    job, errors = load_text(text)
    answer: dict[str, Any] = {"ok": not errors, "errors": errors, "yaml": text, "plan": [], "estimate": None}
    if job is None:
        return answer
    root = output_root(job) if callable(output_root) else output_root
    try:
        answer["plan"] = plan_rows(job, root)
    except UserError as err:
        answer["ok"] = False
        answer["errors"].append({"field": err.where, "message": err.message})
    answer["estimate"] = estimate_answer(job)
    return answer
