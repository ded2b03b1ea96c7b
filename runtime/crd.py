"""Generate the FineTuneJob CustomResourceDefinition from the pydantic spec model.

The OpenAPI v3 schema is made structural (every `$ref` inlined, no `anyOf` with null, types on
every node), keeps each field's description for `kubectl explain`, and carries the `CelRule`s
declared on the models as `x-kubernetes-validations`. `crds/finetunejob.yaml` is this output;
a test fails when they differ.
"""

from __future__ import annotations

from typing import Any

import yaml

from .api import spec as api

_DROP = {"title", "default"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = defs[node["$ref"].split("/")[-1]]
            merged = {**_resolve(target, defs), **{k: v for k, v in node.items() if k != "$ref"}}
            return _resolve(merged, defs)
        return {k: _resolve(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, defs) for v in node]
    return node


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    """pydantic JSON schema node → Kubernetes structural schema node."""
    node = {k: v for k, v in node.items() if k not in _DROP}
    # Optional[X] is `anyOf: [X, {type: null}]`: keep X (absence is how YAML says "unset").
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) == 1:
            inner = _structural(options[0])
            node = {**inner, **node}
        elif {o.get("type") for o in options} <= {"integer", "number"}:
            node["type"] = "number"
        else:
            raise ValueError(f"cannot express union {options} structurally")
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "enum" in node and "type" not in node:
        node["type"] = "integer" if all(isinstance(v, int) for v in node["enum"]) else "string"
    if node.get("type") == "object":
        props = node.get("properties")
        if props is not None:
            node["properties"] = {k: _structural(v) for k, v in props.items()}
            node.pop("additionalProperties", None)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            if extra:
                node["additionalProperties"] = _structural(extra)
            else:
                node.pop("additionalProperties")
                node["x-kubernetes-preserve-unknown-fields"] = True
        elif props is None:
            node["x-kubernetes-preserve-unknown-fields"] = True
        if node.get("required") == []:
            node.pop("required")
        for key in ("maxLength", "minLength"):  # pydantic puts a dict's size bound here
            if key in node:
                node[key.replace("Length", "Properties")] = node.pop(key)
    if node.get("type") == "array" and "items" in node:
        node["items"] = _structural(node["items"])
    if "exclusiveMinimum" in node and not isinstance(node["exclusiveMinimum"], bool):
        node["minimum"] = node.pop("exclusiveMinimum")
        node["exclusiveMinimum"] = True
    if "exclusiveMaximum" in node and not isinstance(node["exclusiveMaximum"], bool):
        node["maximum"] = node.pop("exclusiveMaximum")
        node["exclusiveMaximum"] = True
    return node


def _attach_rules(schema: dict[str, Any], model: type[api.Spec]) -> None:
    """Walk schema and model together, adding each model's CEL rules to its node."""
    rules = [
        {
            "rule": r.rule,
            "message": r.message,
            **({"fieldPath": r.field_path} if r.field_path else {}),
            "reason": "FieldValueInvalid",
        }
        for r in model.cel_rules
    ]
    if rules:
        schema["x-kubernetes-validations"] = rules
    for name, field in model.model_fields.items():
        sub_model = api._model_of(field.annotation)
        if sub_model is None or not issubclass(sub_model, api.Spec):
            continue
        node = schema.get("properties", {}).get(field.alias or name)
        if node is None:
            continue
        if node.get("type") == "array":
            node = node["items"]
        _attach_rules(node, sub_model)


def _schema_of(model: type[api.Spec]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    schema = _structural(_resolve(raw, defs))
    _attach_rules(schema, model)
    return schema


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Stage", "type": "string", "jsonPath": ".status.stage.name"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progressText"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "ETA", "type": "string", "jsonPath": ".status.eta"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    """The FineTuneJob CustomResourceDefinition as a mapping."""
    spec_schema = _schema_of(api.FineTuneJobSpec)
    spec_schema["description"] = api.FineTuneJobSpec.__doc__ or "What to fine-tune, on what, and how."
    status_schema = _schema_of(api.FineTuneJobStatus)
    status_schema["description"] = "Observed state, written by the operator only."
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.API_GROUP}",
            "labels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": api.API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.KIND.lower(),
                "shortNames": ["ftj"],
                "categories": ["all", "kubetune", "ml"],
            },
            "versions": [
                {
                    "name": api.API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": (api.FineTuneJob.__doc__ or "").strip(),
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `kubetune crd` from kubetune/runtime/api/spec.py. Do not edit by hand.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)
