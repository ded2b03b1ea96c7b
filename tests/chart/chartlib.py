"""Helpers shared by the chart tests (tests/chart, tests/e2e/test_chart*.py): find helm, render
charts/kubetune with values, index the rendered objects."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"


def helm_binary() -> str | None:
    """helm v3 from the test control plane's build cache (tests/cluster/build.py), else PATH."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from cluster.build import bin_dir

        candidate = bin_dir() / "helm"
        if candidate.is_file():
            return str(candidate)
    except Exception:  # noqa: BLE001 - the build module needs Go only to build, not to locate
        pass
    return os.environ.get("HELM") or shutil.which("helm")


def set_args(values: dict | None) -> list[str]:
    """Values as one --set-json per top-level key (exact types, no --set string parsing)."""
    args: list[str] = []
    for k, v in (values or {}).items():
        args += ["--set-json", f"{k}={json.dumps(v)}"]
    return args


def template(helm: str, values: dict | None = None, release: str = "kt", namespace: str = "kubetune-system",
             check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([helm, "template", release, str(CHART), "-n", namespace, "--include-crds", *set_args(values)],
                       capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def objects(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def render(helm: str, values: dict | None = None, **kw) -> list[dict]:
    return objects(template(helm, values, **kw).stdout)


def find(objs: list[dict], kind: str, name: str | None = None, namespace: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
            and (namespace is None or o["metadata"].get("namespace") == namespace)]


def one(objs: list[dict], kind: str, name: str | None = None, namespace: str | None = None) -> dict:
    found = find(objs, kind, name, namespace)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def rule_set(rules: list[dict]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples: compare RBAC rules without caring how they are grouped."""
    return {(g, r, v) for rule in rules for g in rule.get("apiGroups", []) for r in rule.get("resources", [])
            for v in rule.get("verbs", [])}
