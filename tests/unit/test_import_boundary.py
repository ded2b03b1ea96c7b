"""The torch-free boundary is a folder: nothing in `operator/` or `runtime/api/` imports the training stack
(torch, transformers, peft, trl, bitsandbytes, datasets, ...), directly or through another kubetune module.

Read from the source, so an import inside a function counts as much as one at the top (the operator imports
lazily in places, and a lazy `import torch` would only fail on the cluster, in the operator's slim image).
`if TYPE_CHECKING:` blocks do not count. A second test imports every such module in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCH_FREE = ("operator", "runtime/api")
TRAINING_STACK = frozenset({"torch", "torchvision", "transformers", "peft", "trl", "bitsandbytes", "datasets",
                            "accelerate", "deepspeed", "safetensors", "tokenizers", "liger_kernel"})


def module_of(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["kubetune", *parts])


def source_of(module: str, root: Path = REPO) -> Path | None:
    rel = Path(*module.split(".")[1:])
    for p in (root / rel.with_suffix(".py"), root / rel / "__init__.py"):
        if p.is_file():
            return p
    return None


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(path: Path, root: Path = REPO) -> set[str]:
    """Every module `path` imports, by absolute name (a kubetune package brings its __init__ too)."""
    module = module_of(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.add(target)
                found.update(f"{target}.{a.name}" for a in child.names if source_of(f"{target}.{a.name}", root))
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    out = set()
    for name in found:
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if parts[0] == "kubetune")
        if parts[0] != "kubetune":
            out.add(name)
    return out - {"kubetune"}


def stack_chains(roots: list[Path], root: Path = REPO) -> list[list[str]]:
    """For each training-stack module reachable from `roots`: one chain of imports that reaches it."""
    chains, seen = [], set()
    todo = [[module_of(p, root)] for p in roots]
    while todo:
        chain = todo.pop()
        here = chain[-1]
        if here in seen:
            continue
        seen.add(here)
        if here.split(".")[0] in TRAINING_STACK:
            chains.append(chain)
            continue
        src = source_of(here, root) if here.startswith("kubetune.") else None
        if src is not None:
            todo.extend(chain + [n] for n in sorted(imports_of(src, root)) if n not in seen)
    return chains


def torch_free_files(root: Path = REPO) -> list[Path]:
    return sorted(p for folder in TORCH_FREE for p in (root / folder).rglob("*.py"))


def test_the_torch_free_folders_never_reach_the_training_stack():
    files = torch_free_files()
    assert len(files) > 15 and any(p.name == "spec.py" for p in files)
    chains = stack_chains(files)
    assert not chains, "the torch-free boundary is crossed:\n" + "\n".join(" → ".join(c) for c in chains)


def test_the_check_sees_a_crossing_through_a_lazy_import_and_another_module(tmp_path):
    (tmp_path / "operator").mkdir()
    (tmp_path / "runtime" / "api").mkdir(parents=True)
    (tmp_path / "runtime" / "__init__.py").write_text("")
    (tmp_path / "runtime" / "api" / "__init__.py").write_text("")
    (tmp_path / "runtime" / "models.py").write_text("import json\n\ndef load():\n    import transformers\n")
    (tmp_path / "runtime" / "api" / "plan.py").write_text("from typing import TYPE_CHECKING\n"
                                                          "if TYPE_CHECKING:\n    import torch\n")
    (tmp_path / "operator" / "handlers.py").write_text("from ..runtime.api import plan\n"
                                                      "def f():\n    from kubetune.runtime import models\n")
    assert stack_chains(torch_free_files(tmp_path), tmp_path) == [
        ["kubetune.operator.handlers", "kubetune.runtime.models", "transformers"]]
    # the same walk from a training stage finds torch
    assert any(c[-1] == "torch" for c in stack_chains([REPO / "runtime" / "stages" / "sft.py"]))


@pytest.mark.parametrize("folder", TORCH_FREE)
def test_the_torch_free_modules_import_without_the_training_stack(folder):
    names = [module_of(p) for p in torch_free_files() if p.is_relative_to(REPO / folder) and p.name != "__main__.py"]
    code = (f"import importlib, sys\nfor n in {names!r}:\n    importlib.import_module(n)\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(TRAINING_STACK)!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"{folder}: importing its modules loaded {r.stdout.strip()}"
