"""Run argocd/health.lua the way Argo CD does (a Lua VM with the object as the global `obj`, the
script's returned table is the health) through lupa, the Python binding of the Lua runtime.
Argo CD uses gopher-lua (Lua 5.1); lupa's Lua 5.4 runs the same script: it only uses 5.1's
subset (no goto, no integer division, no bit operators)."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
ARGOCD = REPO / "argocd"
HEALTH_LUA = ARGOCD / "health.lua"


def _to_lua(lua, value):
    if isinstance(value, dict):
        t = lua.table()
        for k, v in value.items():
            t[k] = _to_lua(lua, v)
        return t
    if isinstance(value, list):
        t = lua.table()
        for i, v in enumerate(value, start=1):  # Lua arrays start at 1, as Argo CD's JSON → Lua does
            t[i] = _to_lua(lua, v)
        return t
    return value


def health(obj: dict, script: str | None = None) -> dict:
    import lupa

    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = _to_lua(lua, obj)
    hs = lua.execute(script if script is not None else HEALTH_LUA.read_text())
    return {k: hs[k] for k in ("status", "message") if hs[k] is not None}


def cases() -> list[dict]:
    """argocd/health_test.yaml: Argo CD's own test layout (tests: [{healthStatus, inputPath}])."""
    return yaml.safe_load((ARGOCD / "health_test.yaml").read_text())["tests"]
