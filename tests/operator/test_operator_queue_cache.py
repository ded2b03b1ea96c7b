"""The operator's machinery for scale: the work queue, the ticks, the event limiter, the watch-fed
cache (against scripted LIST/WATCH answers; the e2e tier runs it against a real apiserver)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from kubetune.operator import handlers
from kubetune.operator.cache import Informer
from kubetune.operator.config import OperatorConfig
from kubetune.operator.events import EventLimiter
from kubetune.operator.workqueue import Ticks, WorkQueue


def wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# ------------------------------------------------------------------ the queue
def test_a_key_is_queued_once_and_never_worked_on_twice_at_once():
    inside, seen, peak, release = {}, [], [0], threading.Event()
    guard = threading.Lock()

    def handler(key, poll):
        with guard:
            inside[key] = inside.get(key, 0) + 1
            peak[0] = max(peak[0], inside[key])
        seen.append((key, poll))
        if key == ("ns", "a") and len(seen) == 1:
            release.wait(5)
        with guard:
            inside[key] -= 1

    q = WorkQueue(handler, workers=4)
    q.start()
    try:
        q.add(("ns", "a"))
        wait(lambda: seen)  # a is being worked on
        for _ in range(50):  # a storm of triggers while it runs: one more reconcile after it
            q.add(("ns", "a"), poll=False)
        q.add(("ns", "a"), poll=True)
        for i in range(10):
            q.add(("ns", f"b{i}"))
            q.add(("ns", f"b{i}"))  # a duplicate while queued: merged
        wait(lambda: len(seen) == 11)  # the b's run on the other workers meanwhile
        release.set()
        wait(lambda: len(seen) == 12)
        time.sleep(0.1)
        assert len(seen) == 12 and peak[0] == 1
        assert seen[-1] == (("ns", "a"), True)  # the poll wish of a merged trigger is kept
    finally:
        q.stop()


def test_add_after_requeues_later():
    seen = []
    q = WorkQueue(lambda key, poll: seen.append((time.monotonic(), key)), workers=1)
    q.start()
    try:
        t0 = time.monotonic()
        q.add_after(("ns", "late"), 0.3)
        q.add(("ns", "now"))
        wait(lambda: len(seen) == 2)
        assert seen[0][1] == ("ns", "now") and seen[1][1] == ("ns", "late")
        assert seen[1][0] - t0 >= 0.3
        assert q.delayed() == 0 and q.depth() == 0
    finally:
        q.stop()


# ------------------------------------------------------------------ the ticks
class Stopped:
    """kopf's DaemonStopped as an async daemon sees it: truthy once set, awaitable wait()."""

    def __init__(self):
        self.event = asyncio.Event()

    def __bool__(self):
        return self.event.is_set()

    def wait(self):
        return self.event.wait()


def test_a_daemon_enqueues_at_start_then_at_each_tick_and_is_woken_when_the_tick_moves():
    ticks, got = Ticks(), []
    key = ("ns", "job")

    async def scenario():
        stopped = Stopped()
        task = asyncio.create_task(ticks.run(key, stopped, lambda k, poll: got.append((time.monotonic(), poll))))
        await asyncio.sleep(0.05)
        assert ticks.attached(key) and len(got) == 1 and got[0][1] is False  # the start
        ticks.set(key, 30.0, poll=True)  # far away...
        await asyncio.sleep(0.1)
        assert len(got) == 1
        t0 = time.monotonic()
        ticks.set(key, 0.2, poll=True)  # ...moved closer from another thread: the daemon wakes
        await asyncio.sleep(0.5)
        assert len(got) == 2 and got[1][1] is True and got[1][0] - t0 >= 0.19
        assert ticks.due_in(key) is None  # taken; the reconcile sets the next one
        ticks.set(key, None)
        stopped.event.set()
        await asyncio.wait_for(task, 2)
        assert not ticks.attached(key)

    thread = threading.Thread(target=lambda: asyncio.run(scenario()))
    thread.start()
    thread.join(10)
    assert len(got) == 2


def _status(phase="Running", **progress):
    return {"phase": phase, "stage": {"name": "sft", "index": 0, "count": 1}, "progress": progress}


@pytest.fixture
def clean_tables(monkeypatch):
    monkeypatch.setattr(handlers, "_polled", set())
    monkeypatch.setattr(handlers, "_cleaned", set())


def test_next_tick_follows_the_step_time_and_the_number_of_running_jobs(clean_tables):
    cfg = OperatorConfig(poll_interval=5, max_poll_interval=60, status_writes_per_second=10)
    body = {"metadata": {"namespace": "ns", "name": "a", "uid": "u", "generation": 1}}
    # fast steps: the poll interval; slow steps (20 s each): once per step; very slow: the cap
    assert handlers.next_tick(body, _status(step=10, totalSteps=100, etaSeconds=9), has_pod=True, config=cfg) == (5, True)
    assert handlers.next_tick(body, _status(step=10, totalSteps=100, etaSeconds=1800), has_pod=True, config=cfg) == (20, True)
    assert handlers.next_tick(body, _status(step=1, totalSteps=3, etaSeconds=600), has_pod=True, config=cfg) == (60, True)
    # 200 running jobs at 10 status writes/s: each every 20 s
    for i in range(199):
        handlers._polled.add(("ns", f"other-{i}"))
    assert handlers.next_tick(body, _status(step=10, totalSteps=100, etaSeconds=9), has_pod=True, config=cfg) == (20, True)
    # a starting pod: the poll interval; waiting (no pod, queued, suspended): the resync interval
    assert handlers.next_tick(body, _status("Pending"), has_pod=True, config=cfg) == (5, True)
    assert handlers.next_tick(body, _status("Pending"), has_pod=False, config=cfg) == (30, False)
    assert handlers.next_tick(body, _status("Suspended"), has_pod=True, config=cfg) == (30, False)
    assert ("ns", "a") not in handlers._polled  # only running jobs count


def test_a_finished_job_ticks_only_for_its_ttl_clean_up(clean_tables):
    cfg = OperatorConfig(poll_interval=1)
    done = {"phase": "Succeeded", "completionTime": "2020-01-01T00:00:00Z", "observedGeneration": 1,
            "conditions": [{"type": "Succeeded", "status": "True"}]}
    body = {"metadata": {"namespace": "ns", "name": "a", "uid": "u", "generation": 1}, "spec": {}}
    assert handlers.next_tick(body, done, has_pod=False, config=cfg) == (None, False)  # no TTL: never
    body["spec"] = {"runPolicy": {"ttlSecondsAfterFinished": 60}}
    assert handlers.next_tick(body, done, has_pod=False, config=cfg) == (0.0, False)  # long due: once more
    assert handlers.next_tick(body, done, has_pod=False, config=cfg) == (None, False)  # ...then never
    handlers._cleaned.clear()
    soon = dict(done, completionTime=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    delay, poll = handlers.next_tick(body, soon, has_pod=False, config=cfg)
    assert 55 < delay <= 61 and poll is False


# ------------------------------------------------------------------ events
def test_events_are_limited_per_object_and_repeats_are_held_back():
    lim = EventLimiter(burst=3, every=10, repeat_after=60)
    a, b = ("ns", "a"), ("ns", "b")
    assert lim.allow(a, "X", "1", now=0) and not lim.allow(a, "X", "1", now=1)  # a repeat
    assert lim.allow(a, "X", "2", now=1) and lim.allow(a, "Y", "3", now=1)
    assert not lim.allow(a, "Z", "4", now=1)  # the burst is spent
    assert lim.allow(b, "Z", "4", now=1)  # another object has its own
    assert lim.allow(a, "Z", "4", now=11)  # one more after `every` seconds
    assert lim.allow(a, "X", "1", now=70)  # the same again after repeat_after
    lim.forget(a)
    lim.forget(b)
    assert len(lim) == 0


# ------------------------------------------------------------------ the informer
class Resp:
    def __init__(self, data=b"", lines=()):
        self.data = data
        self._lines = list(lines)
        self.closed = False

    def stream(self, amt=None, decode_content=False):
        # events split across chunks at odd places, as HTTP delivers them
        blob = b"".join(json.dumps(e).encode() + b"\n" for e in self._lines)
        for i in range(0, len(blob), 7):
            yield blob[i:i + 7]

    def release_conn(self):
        pass

    def close(self):
        self.closed = True


def _obj(name, job, rv, **extra):
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": str(rv),
                         "labels": {"kubetune.io/job": job}, "managedFields": [{"big": "x" * 100}]}, **extra}


def test_the_informer_lists_watches_and_lists_again_after_410():
    calls, changes = [], []
    script = [
        ("list", {"metadata": {"resourceVersion": "10", "continue": "p2"}, "items": [_obj("a-sft", "a", 5)]}),
        ("list", {"metadata": {"resourceVersion": "10"}, "items": [_obj("b-sft", "b", 6)]}),
        ("watch", [{"type": "MODIFIED", "object": _obj("a-sft", "a", 11, status={"active": 1})},
                   {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "12"}}},
                   {"type": "DELETED", "object": _obj("b-sft", "b", 13)}]),
        ("watch", [{"type": "ERROR", "object": {"code": 410, "message": "too old"}}]),
        ("list", {"metadata": {"resourceVersion": "20"}, "items": [_obj("a-sft", "a", 11), _obj("c-sft", "c", 19)]}),
    ]
    done = threading.Event()

    def list_call(namespace, **kw):
        calls.append((namespace, kw))
        if not script:
            done.set()
            raise ConnectionError("no more")
        kind, payload = script.pop(0)
        assert ("watch" in kw) == (kind == "watch")
        return Resp(lines=payload) if kind == "watch" else Resp(data=json.dumps(payload).encode())

    inf = Informer("Job", list_call, "ns", "kubetune.io/job", on_change=lambda *a: changes.append(a))
    inf.start()
    try:
        assert done.wait(5)
        wait(lambda: len(inf) == 2)
    finally:
        inf.stop()
    assert all(ns == "ns" and kw["label_selector"] == "kubetune.io/job" for ns, kw in calls)
    assert calls[1][1]["_continue"] == "p2"  # paged
    assert calls[2][1]["resource_version"] == "10" and calls[2][1]["allow_watch_bookmarks"]
    assert calls[3][1]["resource_version"] == "13"  # the watch goes on from the last event
    assert "resource_version" not in calls[4][1]  # 410: listed again
    assert [o["metadata"]["name"] for o in inf.by_job("ns", "a")] == ["a-sft"]
    assert inf.by_job("ns", "b") == [] and inf.by_job("ns", "c")[0]["metadata"]["resourceVersion"] == "19"
    assert "managedFields" not in inf.by_job("ns", "a")[0]["metadata"]
    assert inf.by_job("ns", "a")[0]["metadata"]["resourceVersion"] == "11"  # (the re-list's copy)
    # every change named its job; the re-list announced only what changed (c appeared)
    assert changes[:2] == [("ns", "a", "Job", "ADDED"), ("ns", "b", "Job", "ADDED")]
    assert ("ns", "a", "Job", "MODIFIED") in changes and ("ns", "b", "Job", "DELETED") in changes
    assert changes[-1] == ("ns", "c", "Job", "ADDED") and inf.lists == 2 and inf.watches == 3  # (the third found the script ended)


def test_our_own_writes_are_seen_before_their_watch_events():
    from kubetune.operator.cache import ChildCache, merge_patched

    assert merge_patched({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": None, "e": [1]}, "d": 4}) == \
        {"a": {"c": 2, "e": [1]}, "d": 4}
    jobs = Informer("Job", None, None, "kubetune.io/job")
    cache = ChildCache.__new__(ChildCache)
    cache.informers = {"Job": [jobs]}
    manifest = {"metadata": {"name": "a-sft", "labels": {"kubetune.io/job": "a"}}, "spec": {"suspend": True}}
    cache.wrote("ns", "create", "Job", "a-sft", manifest)
    assert cache.children("ns", "a")["Job"][0]["spec"] == {"suspend": True}
    cache.wrote("ns", "patch", "Job", "a-sft", {"spec": {"suspend": False}})
    assert cache.children("ns", "a")["Job"][0]["spec"] == {"suspend": False}
    # the watch event replaces the placeholder
    jobs._apply("ADDED", _obj("a-sft", "a", 30, spec={"suspend": False}))
    assert cache.children("ns", "a")["Job"][0]["metadata"]["resourceVersion"] == "30"
    # a foreground delete leaves it there, being deleted; a background one removes it
    cache.wrote("ns", "delete", "Job", "a-sft", {"propagationPolicy": "Foreground"})
    assert cache.children("ns", "a")["Job"][0]["metadata"]["deletionTimestamp"]
    cache.wrote("ns", "delete", "Job", "a-sft", {"propagationPolicy": "Background"})
    assert cache.children("ns", "a")["Job"] == [] and len(jobs) == 0
