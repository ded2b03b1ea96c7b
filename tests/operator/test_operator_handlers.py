"""reconcile_object's plumbing with the API calls replaced: trigger coalescing and the echo of
our own status writes (the e2e tier runs the same code against a real apiserver)."""

from __future__ import annotations

import threading
import time

import kopf
import pytest
from operator_builders import ftj

from kubetune.operator import handlers, kube
from kubetune.operator.reconcile import Observed


@pytest.fixture
def fake_api(monkeypatch):
    """kube.* as counters; get_finetunejob of `llama` blocks while `gate` is clear."""
    calls = {"get": 0, "observe": 0, "apply": [], "patch": 0, "poll": 0}
    gate = threading.Event()
    gate.set()
    body = ftj()

    def get(ns, name):
        calls["get"] += 1
        if name == "llama":
            gate.wait(10)
        return body

    def patch(ns, name, rv, patch):
        calls["patch"] += 1
        body["status"] = {**(body.get("status") or {}), **patch}
        body["metadata"]["resourceVersion"] = str(int(body["metadata"]["resourceVersion"]) + 1)
        return {"metadata": {"resourceVersion": body["metadata"]["resourceVersion"]}}

    monkeypatch.setattr(kube, "get_finetunejob", get)
    monkeypatch.setattr(kube, "observe", lambda ns, name: calls.__setitem__("observe", calls["observe"] + 1) or Observed())
    monkeypatch.setattr(kube, "apply", lambda ns, action: calls["apply"].append(action.verb) or "created")
    monkeypatch.setattr(kube, "patch_status", patch)
    monkeypatch.setattr(kube, "poll_progress", lambda *a: calls.__setitem__("poll", calls["poll"] + 1))
    monkeypatch.setattr(handlers, "_own_writes", {})
    monkeypatch.setattr(handlers, "_inside", {})
    monkeypatch.setattr(kopf, "info", lambda *a, **k: None)
    monkeypatch.setattr(kopf, "warn", lambda *a, **k: None)
    return calls, gate, body


def test_a_third_trigger_while_one_runs_and_one_waits_is_dropped(fake_api, config):
    calls, gate, _ = fake_api
    gate.clear()  # the first reconcile hangs in its GET until released
    results: list = []
    first = threading.Thread(target=lambda: results.append(
        handlers.reconcile_object("ml", "llama", poll=False, config=config)))
    first.start()
    while calls["get"] < 1:
        time.sleep(0.01)
    second = threading.Thread(target=lambda: results.append(
        handlers.reconcile_object("ml", "llama", poll=False, config=config)))
    second.start()
    while handlers._inside.get(("ml", "llama"), [0])[0] < 2:
        time.sleep(0.01)
    # a third (a timer tick, asking for a /progress poll) returns at once...
    assert handlers.reconcile_object("ml", "llama", poll=True, config=config) is None
    # ...and an unrelated object is not held up
    assert handlers.reconcile_object("ml", "other", poll=False, config=config) is not None
    gate.set()
    first.join(10)
    second.join(10)
    assert calls["get"] == 3  # first, second (after the first), other; not the third
    assert all(r is not None for r in results) and len(results) == 2
    assert ("ml", "llama") not in handlers._inside


def test_the_echo_of_our_own_status_write_is_recognised(fake_api, config):
    calls, _, body = fake_api
    d = handlers.reconcile_object("ml", "llama", poll=False, config=config)
    assert d.status["phase"] == "Pending" and calls["patch"] == 1 and calls["apply"] == ["create", "create"]
    written = body["metadata"]["resourceVersion"]
    assert handlers.own_echo("ml", "llama", written)
    assert not handlers.own_echo("ml", "llama", str(int(written) + 1))  # someone else's change after ours
    assert not handlers.own_echo("ml", "other", written) and not handlers.own_echo("ml", "llama", None)
