"""reconcile_object's plumbing with the API calls replaced: trigger coalescing and the echo of
our own status writes (the e2e tier runs the same code against a real apiserver)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import kopf
import pytest
from operator_builders import ftj

from kubetune.operator import handlers, kube, metrics
from kubetune.operator.events import EventLimiter
from kubetune.operator.reconcile import Observed
from kubetune.operator.workqueue import Ticks


@pytest.fixture
def fake_api(monkeypatch):
    """kube.* as counters; get_finetunejob of `llama` blocks while `gate` is clear."""
    calls = {"get": 0, "observe": 0, "apply": [], "patch": 0, "poll": 0, "events": []}
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
    monkeypatch.setattr(kube, "observe", lambda ns, name, **_: calls.__setitem__("observe", calls["observe"] + 1) or Observed())
    monkeypatch.setattr(kube, "apply", lambda ns, action: calls["apply"].append(action.verb) or "created")
    monkeypatch.setattr(kube, "patch_status", patch)
    monkeypatch.setattr(kube, "probe_progress",
                        lambda *a: calls.__setitem__("poll", calls["poll"] + 1) or (None, False))
    monkeypatch.setattr(handlers, "_own_writes", {})
    monkeypatch.setattr(handlers, "_inside", {})
    monkeypatch.setattr(handlers, "_bodies", {})
    monkeypatch.setattr(handlers, "_polled", set())
    monkeypatch.setattr(handlers, "_from_event", set())
    monkeypatch.setattr(handlers, "ticks", Ticks())
    monkeypatch.setattr(handlers, "events", EventLimiter())
    # (each event with the number of status writes before it)
    monkeypatch.setattr(kube, "post_event", lambda *a, **k: calls["events"].append((a[3], calls["patch"])))
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
    # the event is posted before the status that goes with it is written: an operator killed
    # right after a transition has told it (kopf's asynchronous poster lost it then)
    assert calls["events"] == [("StageStarted", 0)]
    written = body["metadata"]["resourceVersion"]
    assert handlers.own_echo("ml", "llama", written)
    assert not handlers.own_echo("ml", "llama", str(int(written) + 1))  # someone else's change after ours
    assert not handlers.own_echo("ml", "other", written) and not handlers.own_echo("ml", "llama", None)


# ----------------------------------------------------- /progress off the reconcile threads, state


def _running(body, port_pod_ip="127.0.0.1"):
    """`body` at its stage sft with a Job and a running rank-0 pod at 127.0.0.1."""
    from operator_builders import k8s_job, pod

    body["status"] = {"phase": "Running", "stage": {"name": "sft", "index": 0, "count": 1}}
    return Observed(jobs={"llama-sft": k8s_job("llama-sft", active=1)},
                    pods={"llama-sft": [pod("llama-sft", "Running", ip=port_pod_ip)]})


@pytest.fixture
def real_poll(fake_api, monkeypatch):
    """fake_api, but kube.probe_progress is the real one and a fresh ProgressPoller."""
    monkeypatch.setattr(kube, "probe_progress", _real_poll)
    monkeypatch.setattr(handlers, "poller", handlers.ProgressPoller(workers=2))
    monkeypatch.setattr(handlers, "_cleaned", set())
    monkeypatch.setattr(metrics, "_phase", {})
    return fake_api


_real_poll = kube.probe_progress


def test_a_dripping_progress_server_never_holds_a_reconcile(real_poll, config, monkeypatch):
    from test_operator_progress import Server, drip, ok

    calls, _, body = real_poll
    obs = _running(body)
    monkeypatch.setattr(kube, "observe", lambda ns, name, **_: obs)
    cfg = dataclasses.replace(config, progress_timeout=1.5)
    slow = Server(drip)
    try:
        cfg = dataclasses.replace(cfg, runtime_metrics_port=slow.port)
        t0 = time.monotonic()
        handlers.reconcile_object("ml", "llama", poll=True, config=cfg)
        assert time.monotonic() - t0 < 0.5  # the poll runs on a poller thread
        # the poller gives up at the deadline and backs off
        deadline = time.monotonic() + 5
        while handlers.poller.sizes()["progress_inflight"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert time.monotonic() - t0 < cfg.progress_timeout + 0.7
        assert handlers.poller.sizes() == {"progress": 0, "progress_inflight": 0, "progress_backoff": 1}
        assert not handlers.poller.request(("ml", "llama"), obs.pods["llama-sft"][0], slow.port, 1.5)
    finally:
        slow.close()
    # a good report reaches the status without waiting for a timer tick
    good = Server(ok(b'{"stage": "sft", "step": 3, "totalSteps": 6}'))
    try:
        handlers.poller._backoff.clear()
        cfg = dataclasses.replace(cfg, runtime_metrics_port=good.port)
        handlers.reconcile_object("ml", "llama", poll=True, config=cfg)
        deadline = time.monotonic() + 5
        while (body["status"].get("progress") or {}).get("step") != 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert body["status"]["progress"]["step"] == 3 and body["status"]["progressText"] == "50%"
    finally:
        good.close()


def test_per_object_state_is_released_when_objects_are_deleted(real_poll, config, monkeypatch):
    """N objects reconciled (locks, echoes, progress reports, TTL marks, phase gauge), then their
    DELETED events through the registered kopf handler: every table is empty again."""
    from test_operator_progress import Server, ok

    calls, _, body = real_poll
    n = 20
    good = Server(ok(b'{"stage": "sft", "step": 1, "totalSteps": 6}'))
    cfg = dataclasses.replace(config, runtime_metrics_port=good.port)
    registry = handlers.register(cfg, kopf.OperatorRegistry())
    on_event = next(h.fn for h in registry._watching.get_all_handlers() if h.fn.__name__ == "finetunejob_event")
    monkeypatch.setattr(kube, "get_finetunejob", lambda ns, name: body)
    obs = _running(body)
    monkeypatch.setattr(kube, "observe", lambda ns, name, **_: Observed(
        jobs={f"{name}-sft": obs.jobs["llama-sft"]}, pods={f"{name}-sft": obs.pods["llama-sft"]}))
    try:
        for i in range(n):
            body["status"] = {"phase": "Running", "stage": {"name": "sft", "index": 0, "count": 1}}
            handlers.reconcile_object("ml", f"job-{i}", poll=True, config=cfg)
            handlers._cleaned.add(f"uid-{i}")
        deadline = time.monotonic() + 10
        while handlers.state_sizes()["progress"] < n and time.monotonic() < deadline:
            time.sleep(0.05)
        sizes = handlers.state_sizes()
        # (one shared fake body: a reconcile that finds nothing to change writes nothing)
        assert sizes["progress"] == n and sizes["own_writes"] > n // 2 and sizes["phases"] >= n, sizes
        assert sizes["ttl_cleaned"] == n and sizes["locks"] == 0  # a lock lives only while a trigger is inside
        assert sizes["ticks"] == n  # each job's next look is scheduled
        for i in range(n):
            meta = {"name": f"job-{i}", "namespace": "ml", "uid": f"uid-{i}"}
            asyncio.run(on_event(type="DELETED", body=kopf.Body({"metadata": meta})))
        handlers.forget("ml", "llama", body["metadata"]["uid"])  # the fake_api's own object
        assert handlers.state_sizes() == {"locks": 0, "own_writes": 0, "ttl_cleaned": 0, "bodies": 0, "polled": 0,
                                          "progress": 0, "progress_inflight": 0, "progress_backoff": 0,
                                          "ticks": 0, "daemons": 0, "event_limits": 0, "phases": 0}
    finally:
        good.close()


def test_a_reconcile_that_finds_the_object_gone_forgets_it(real_poll, config, monkeypatch):
    handlers._own_writes[("ml", "gone")] = "5"
    handlers.poller._latest[("ml", "gone")] = ("pod", {})
    monkeypatch.setattr(kube, "get_finetunejob", lambda ns, name: None)
    assert handlers.reconcile_object("ml", "gone", poll=True, config=config) is None
    assert ("ml", "gone") not in handlers._own_writes and not handlers.poller._latest


def test_the_state_tables_are_exported_as_a_metric():
    from prometheus_client import REGISTRY, generate_latest

    metrics.export_state(handlers.state_sizes)
    text = generate_latest(REGISTRY).decode()
    for table in ("locks", "own_writes", "ttl_cleaned", "progress", "progress_inflight", "progress_backoff", "phases"):
        assert f'kubetune_operator_object_state_entries{{table="{table}"}}' in text


def test_a_name_conflict_stops_the_creates_and_is_the_status(fake_api, config, monkeypatch):
    """The ConfigMap's name is taken by an object this FineTuneJob does not own: the Job (which
    would mount that ConfigMap) is not created, and the status says NameConflict."""
    calls, _, body = fake_api
    tried = []

    def apply(ns, action):
        tried.append((action.verb, action.kind))
        if action.kind == "ConfigMap":
            raise kube.NameConflict("ConfigMap", action.name, f"ConfigMap {action.name} already exists and is not owned")
        return "created"

    monkeypatch.setattr(kube, "apply", apply)
    d = handlers.reconcile_object("ml", "llama", poll=False, config=config)
    assert tried == [("create", "ConfigMap")]
    running = next(c for c in d.status["conditions"] if c["type"] == "Running")
    assert running["reason"] == "NameConflict" and "ConfigMap llama-sft already exists" in running["message"]
    assert body["status"]["phase"] == "Pending"


def test_a_starting_pod_is_polled_at_every_tick_and_its_first_report_is_used(real_poll, config, monkeypatch):
    """The runtime answers 503 until its stage starts (a model download can take minutes): the
    poller never backs off from that, so the first report after the start is read at the next
    tick, however long the start took. (Counted as failures, 30 such misses once pushed the next
    poll a minute away, past the end of a short stage.)"""
    from types import SimpleNamespace

    from kubetune.runtime.metrics import MetricsServer
    from kubetune.runtime.api.progress import ProgressReport

    key = ("ml", "llama")
    _, _, body = real_poll
    obs = _running(body)
    pod = obs.pods["llama-sft"][0]
    with MetricsServer(0, "127.0.0.1") as server:
        for _ in range(30):
            assert handlers.poller.request(key, pod, server.port, 1.0)
            deadline = time.monotonic() + 5
            while handlers.poller.sizes()["progress_inflight"] and time.monotonic() < deadline:
                time.sleep(0.01)
        assert handlers.poller.sizes() == {"progress": 0, "progress_inflight": 0, "progress_backoff": 0}
        server.attach(SimpleNamespace(progress=SimpleNamespace(snapshot=lambda: {"stage": "sft", "step": 4})))
        assert handlers.poller.request(key, pod, server.port, 1.0)
        deadline = time.monotonic() + 5
        while handlers.poller.latest(key, pod["metadata"]["name"]) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert handlers.poller.latest(key, pod["metadata"]["name"]) == ProgressReport(stage="sft", step=4)
