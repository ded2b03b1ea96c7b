"""kopf handlers: thin triggers around one level-based reconcile.

Every trigger ends in `reconcile_object()`: read the FineTuneJob and its children, ask the pure
`reconcile()` what should exist, make it so, post the events, write the status. At scale
(thousands of FineTuneJobs, most finished or queued) nothing here costs in proportion to the
objects that are quiet:

- Triggers only queue work (`workqueue.WorkQueue`, `--workers` threads): a FineTuneJob event
  (kopf's watch), a child's event (`cache.ChildCache`: Jobs, pods, ConfigMaps, Services watched
  with a server-side label selector, so the operator never receives other teams' Jobs), a new
  /progress report, or the job's tick.
- Reads come from memory: the FineTuneJob as its last event (or our last write) showed it, the
  children from the watch-fed cache. A reconcile's API requests are its writes.
- Each job's next tick is decided after each reconcile (`next_tick`): a running stage at the pace
  of its training steps, a waiting one at the resync interval, a finished one only when its TTL
  clean-up is due. The ticks are driven by one kopf daemon per FineTuneJob (an idle asyncio task),
  so they stop with the object and while a peering replica of higher priority leads.
- Only a tick asks for the rank-0 pod's /progress (our own status writes never start a polling
  loop), and the poll runs off the reconcile threads (`ProgressPoller`): a tenant's pod that
  answers slowly holds one poller thread for at most `progress_timeout` seconds. A status patch
  carries the resourceVersion it was computed from, so a decision made on a stale view is refused
  (409) and retried.

Per-object state in this process lives only as long as its object; `forget()` drops it when the
object is deleted, and `state_sizes()` counts it (kubetune_operator_object_state_entries{table}).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import kopf
from kubernetes.client.rest import ApiException

from kubetune.runtime.api.contract import rank0_pod
from kubetune.runtime.api.progress import ProgressReport
from kubetune.runtime.api.spec import API_GROUP, API_VERSION, PLURAL

from . import kube, metrics
from .cache import ChildCache
from .config import OperatorConfig
from .events import EventLimiter
from .reconcile import Decision, _terminal, merge_patch, next_check_seconds, reconcile, stage_names
from .workqueue import Ticks, WorkQueue

log = logging.getLogger("kubetune.operator")

Key = tuple[str, str]  # (namespace, name)

_locks_guard = threading.Lock()
_cleaned: set[str] = set()  # uids of finished jobs whose TTL clean-up has run (in this process)
# Triggers of one object inside reconcile_object (running + waiting): [count, poll asked, lock].
# A third trigger is dropped: the one waiting has not read anything yet, so it will see whatever
# change this trigger was about. The entry (and its lock) goes when the last trigger leaves.
_inside: dict[Key, list] = {}
# The resourceVersion of each object's last status write by this process: its watch event is the
# echo of our own decision, and reconciling it again would only repeat that decision.
_own_writes: dict[Key, str] = {}
# The FineTuneJobs as their last watch event or our last status write showed them (the newer).
_bodies: dict[Key, dict[str, Any]] = {}
_polled: set[Key] = set()  # jobs whose stage is running (their ticks poll /progress)
_from_event: set[Key] = set()  # queued by kopf's own FineTuneJob watch (which pauses with peering)

ticks = Ticks()
events = EventLimiter()
queue: WorkQueue | None = None  # started by the operator's startup handler
children: ChildCache | None = None  # ditto; None (tests, tools): children are LISTed


class ProgressPoller:
    """Polls rank-0 pods' /progress on its own few threads, never on a reconcile's.

    `request()` starts a poll of an object's pod unless one is in flight or the object is backing
    off, and returns at once; a reconcile uses `latest()`, the last report that pod gave. When a
    report differs from the one before, `on_new(key)` runs (the handlers reconcile the object
    again, so status follows progress without waiting for the next timer tick). A poll that
    fails backs off: the next one waits min(60 s, seconds the failed poll took × 2^failures),
    so a pod that always uses the whole deadline costs a poller thread a few seconds a minute.
    A pod that is only starting (its runtime answers 503, or nothing listens yet) costs a poll
    next to nothing and is polled again at the next tick (counted as failures, the misses of a
    slow start grew the wait to up to a minute, and a short stage then ran unpolled).
    """

    MAX_BACKOFF = 60.0

    def __init__(self, workers: int = 4):
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._guard = threading.Lock()
        self._latest: dict[Key, tuple[str, ProgressReport]] = {}  # key → (pod name, report)
        self._busy: set[Key] = set()
        self._backoff: dict[Key, tuple[float, int]] = {}  # key → (not before, failures)

    def latest(self, key: Key, pod: str) -> ProgressReport | None:
        with self._guard:
            got = self._latest.get(key)
        return got[1] if got and got[0] == pod else None

    def request(self, key: Key, pod: dict[str, Any], port: int, timeout: float,
                on_new: Callable[[Key], None] | None = None) -> bool:
        with self._guard:
            if key in self._busy or time.monotonic() < self._backoff.get(key, (0.0, 0))[0]:
                return False
            self._busy.add(key)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="kubetune-progress")
        self._pool.submit(self._poll, key, pod, port, timeout, on_new)
        return True

    def _poll(self, key: Key, pod: dict[str, Any], port: int, timeout: float, on_new) -> None:
        name = (pod.get("metadata") or {}).get("name") or ""
        started = time.monotonic()
        try:
            report, starting = kube.probe_progress([pod], port, timeout)
        except Exception:  # noqa: BLE001 — probe_progress raises nothing; a poller thread must survive
            log.exception("progress poll of %s failed", name)
            report, starting = None, False
        took = time.monotonic() - started
        changed = False
        with self._guard:
            if key not in self._busy:
                return  # forgotten meanwhile: the object is gone
            self._busy.discard(key)
            if report is None and starting:
                self._backoff.pop(key, None)
            elif report is None:
                failures = self._backoff.get(key, (0.0, 0))[1] + 1
                wait = min(self.MAX_BACKOFF, took * 2 ** failures)
                self._backoff[key] = (time.monotonic() + wait, failures)
            else:
                self._backoff.pop(key, None)
                old = self._latest.get(key)
                changed = old != (name, report)
                self._latest[key] = (name, report)
        if changed and on_new is not None:
            try:
                on_new(key)
            except Exception as e:  # noqa: BLE001 — retried by the next timer tick
                log.debug("reconcile of %s/%s after a progress report deferred: %s", *key, e)

    def forget(self, key: Key) -> None:
        with self._guard:
            self._latest.pop(key, None)
            self._busy.discard(key)
            self._backoff.pop(key, None)

    def sizes(self) -> dict[str, int]:
        with self._guard:
            return {"progress": len(self._latest), "progress_inflight": len(self._busy),
                    "progress_backoff": len(self._backoff)}


poller = ProgressPoller()


def forget(namespace: str, name: str, uid: str | None = None) -> None:
    """Drop everything this process keeps about an object that is gone."""
    key = (namespace, name)
    metrics.forget(namespace, name)
    poller.forget(key)
    ticks.forget(key)
    events.forget(key)
    with _locks_guard:
        _own_writes.pop(key, None)
        _bodies.pop(key, None)
        _polled.discard(key)
        _from_event.discard(key)
        if uid:
            _cleaned.discard(uid)


def state_sizes() -> dict[str, int]:
    """Entries in each per-object table of this process (0 everywhere once all objects are gone)."""
    with _locks_guard:
        out = {"locks": len(_inside), "own_writes": len(_own_writes), "ttl_cleaned": len(_cleaned),
               "bodies": len(_bodies), "polled": len(_polled)}
    out.update(poller.sizes())
    out.update(ticks.sizes())
    out["event_limits"] = len(events)
    out["phases"] = metrics.tracked()
    return out


def own_echo(namespace: str, name: str, resource_version: str | None) -> bool:
    """Whether this FineTuneJob event is the echo of this process's own last status write."""
    return resource_version is not None and _own_writes.get((namespace, name)) == resource_version


def _ref(body: dict[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "FineTuneJob",
            "metadata": {"name": meta["name"], "namespace": meta.get("namespace"), "uid": meta.get("uid")}}


def _api_message(e: ApiException) -> str:
    import json

    try:
        return json.loads(e.body).get("message") or str(e.reason)
    except (TypeError, ValueError):
        return f"{e.status} {e.reason}"


def reconcile_object(namespace: str, name: str, *, poll: bool, config: OperatorConfig) -> Decision | None:
    """Read, decide, act, record. Raises kopf.TemporaryError when something should be retried.

    Coalesces triggers: while one reconcile of an object runs and another waits, a further
    trigger returns None at once (its poll request passes to the waiting one).
    """
    key = (namespace, name)
    with _locks_guard:
        inside = _inside.setdefault(key, [0, False, threading.Lock()])
        if inside[0] >= 2:
            inside[1] = inside[1] or poll
            return None
        inside[0] += 1
    try:
        with inside[2]:
            with _locks_guard:
                poll, inside[1] = poll or inside[1], False
            return _reconcile_locked(namespace, name, poll=poll, config=config)
    finally:
        with _locks_guard:
            inside[0] -= 1
            if not inside[0]:
                _inside.pop(key, None)


def _newer(rv: str | None, than: str | None) -> bool:
    """Whether resourceVersion `rv` is newer than `than` (etcd's are integers; else trust the newcomer)."""
    if not than:
        return True
    if rv and rv.isdigit() and than.isdigit():
        return int(rv) >= int(than)
    return True


def remember(body: dict[str, Any]) -> None:
    """Keep a FineTuneJob as an event or our own write showed it, unless we hold a newer one."""
    meta = body.get("metadata") or {}
    key = (meta.get("namespace") or "", meta.get("name") or "")
    body = copy.deepcopy(body)
    body["metadata"].pop("managedFields", None)
    with _locks_guard:
        held = _bodies.get(key)
        if held is None or _newer(meta.get("resourceVersion"), held["metadata"].get("resourceVersion")):
            _bodies[key] = body


def _read(namespace: str, name: str) -> dict[str, Any] | None:
    """The FineTuneJob from memory (a private copy: reconcile may change it), else from the API."""
    with _locks_guard:
        held = _bodies.get((namespace, name))
    if held is not None:
        return copy.deepcopy(held)
    body = kube.get_finetunejob(namespace, name)
    if body is not None and queue is not None:
        remember(body)
    return body


def _drop_body(key: Key) -> None:
    with _locks_guard:
        _bodies.pop(key, None)


def _reconcile_locked(namespace: str, name: str, *, poll: bool, config: OperatorConfig) -> Decision | None:
    started = time.monotonic()
    body = _read(namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        forget(namespace, name, (body or {}).get("metadata", {}).get("uid"))
        return None
    observed = kube.observe(namespace, name, network_policies=bool(config.network_policy), cache=children)
    stage = ((body.get("status") or {}).get("stage") or {}).get("name")
    pod = None
    if stage and not _terminal(body.get("status") or {}):
        # the last report of the rank-0 pod (polled off this thread); a tick asks for a new one
        uid = body["metadata"].get("uid") or ""
        pod = rank0_pod(observed.pods.get(stage_names(observed, name, stage, uid)[0], []), running=True)
        if pod is not None:
            key = (namespace, name)
            observed.progress = poller.latest(key, pod["metadata"].get("name") or "")
            if poll:
                poller.request(key, pod, config.runtime_metrics_port, config.progress_timeout,
                               lambda k: _after_report(k, config))
    decision = reconcile(body, observed, config)
    ctx = {"namespace": namespace, "finetunejob": name}
    errors = []
    conflicts: dict[str, str] = {}
    for action in decision.actions:
        if conflicts and action.verb == "create":
            continue  # never a Job next to a ConfigMap (or Service) someone else put there
        try:
            result = kube.apply(namespace, action)
        except kube.NameConflict as e:
            conflicts[e.name] = e.message
            metrics.ACTIONS.labels(action.verb, action.kind, "conflict").inc()
            log.warning("%s %s %s: %s", action.verb, action.kind, action.name, e.message,
                        extra={**ctx, "verb": action.verb, "kind": action.kind, "child": action.name})
            continue
        except ApiException as e:
            msg = _api_message(e)
            errors.append(f"{action.verb} {action.kind} {action.name}: {msg}")
            metrics.ACTIONS.labels(action.verb, action.kind, "error").inc()
            log.error("%s %s %s failed: %s", action.verb, action.kind, action.name, msg,
                      extra={**ctx, "verb": action.verb, "kind": action.kind, "child": action.name})
            continue
        metrics.ACTIONS.labels(action.verb, action.kind, result).inc()
        if children is not None and result in ("created", "patched", "deleted", "gone"):
            children.wrote(namespace, action.verb, action.kind, action.name, action.body)
        log.info("%s %s %s: %s (%s)", action.verb, action.kind, action.name, result, action.why,
                 extra={**ctx, "verb": action.verb, "kind": action.kind, "child": action.name, "result": result})
    if conflicts:
        # decide again knowing which names are taken: the status says so (NameConflict); the
        # actions of that decision are the ones just tried, so they are not repeated
        observed.conflicts = conflicts
        decision = reconcile(body, observed, config)
    ref = _ref(body)
    key = (namespace, name)
    posts = [(ev.type, ev.reason, ev.message) for ev in decision.events] + [("Warning", "ChildError", e) for e in errors]
    for type_, reason, message in posts:
        log.info("event %s: %s", reason, message, extra={**ctx, "reason": reason, "eventType": type_})
        if events.allow(key, reason, message):
            kube.post_event(namespace, ref, type_, reason, message)
        else:
            metrics.EVENTS_DROPPED.inc()

    old = dict(body.get("status") or {})
    old.pop("kopf", None)
    patch = merge_patch(old, decision.status)
    if patch:
        try:
            written = kube.patch_status(namespace, name, body["metadata"].get("resourceVersion"), patch)
            rv = ((written or {}).get("metadata") or {}).get("resourceVersion")
            if rv:
                with _locks_guard:
                    _own_writes[(namespace, name)] = rv
                if queue is not None and (written or {}).get("metadata", {}).get("name"):
                    remember(written)
        except ApiException as e:
            _drop_body(key)  # read it fresh next time
            if e.status in (404, 409):
                raise kopf.TemporaryError(f"status not written ({e.status}); will reconcile again", delay=1)
            raise
        if decision.status.get("phase") != old.get("phase"):
            log.info("phase %s → %s", old.get("phase"), decision.status.get("phase"),
                     extra={**ctx, "phase": decision.status.get("phase")})
    metrics.observe(namespace, name, decision.status, time.monotonic() - started,
                    old=old, created=body["metadata"].get("creationTimestamp"))
    delay, wants_poll = next_tick(body, decision.status, has_pod=pod is not None, config=config)
    ticks.set(key, delay, wants_poll)
    if errors:
        metrics.ERRORS.inc()
        raise kopf.TemporaryError("; ".join(errors), delay=max(5.0, config.poll_interval))
    return decision


def _after_report(key: Key, config: OperatorConfig) -> None:
    """A new /progress report arrived (on a poller thread): put it into the status now."""
    if queue is not None:
        queue.add(key)
        return
    try:
        reconcile_object(*key, poll=False, config=config)
    except kopf.TemporaryError as e:
        log.debug("reconcile of %s/%s after a progress report deferred: %s", *key, e)


def seconds_per_step(progress: dict[str, Any] | None) -> float | None:
    """One training step's seconds, from the status' progress (ETA over the steps left)."""
    p = progress or {}
    step, total, eta = p.get("step"), p.get("totalSteps"), p.get("etaSeconds")
    if not isinstance(eta, (int, float)) or not total or step is None or total <= step or eta <= 0:
        return None
    return float(eta) / (total - step)


def next_tick(body: dict[str, Any], status: dict[str, Any], *, has_pod: bool,
              config: OperatorConfig) -> tuple[float | None, bool]:
    """When to reconcile a job again without an event (seconds, or None: only on an event), and
    whether that tick polls the rank-0 pod's /progress.

    - finished: only when its runPolicy.ttlSecondsAfterFinished clean-up is due (once);
    - a stage running with a pod: every step's seconds, at least the poll interval, and slower
      when many run — together they write at most `status_writes_per_second` progress updates —,
      at most the max poll interval;
    - a stage whose pod is starting: the poll interval (its first report is shown at once);
    - anything else (queued, suspended, waiting for a Job to go, a pod that cannot be created):
      the resync interval, for what no watch event announces (a Job's FailedCreate events).
    """
    key = ((body.get("metadata") or {}).get("namespace") or "", (body.get("metadata") or {}).get("name") or "")
    uid = (body.get("metadata") or {}).get("uid") or ""
    with _locks_guard:
        _polled.discard(key)
    if _terminal(status):
        left = next_check_seconds({**body, "status": status})
        with _locks_guard:
            if left is None or uid in _cleaned:
                return None, False
            if left > 0:
                return left + 0.5, False
            _cleaned.add(uid)  # due: one more reconcile runs the clean-up (a restart runs it again, harmlessly)
        return 0.0, False
    phase = status.get("phase")
    if phase != "Suspended" and has_pod:
        if phase != "Running":
            return config.poll_interval, True
        with _locks_guard:
            _polled.add(key)
            running = len(_polled)
        pace = max(config.poll_interval, seconds_per_step(status.get("progress")) or 0.0,
                   running / config.status_writes_per_second)
        return min(pace, max(config.poll_interval, config.max_poll_interval)), True
    return config.resync_seconds, False


def _work(key: Key, poll: bool, config: OperatorConfig) -> None:
    """A queue worker's reconcile of one job (only while the job's daemon runs: not while a
    peering replica of higher priority leads, nor after the object went away)."""
    if children is not None and not children.synced and not children.wait_synced(60):
        log.warning("the child caches are not filled after 60 s; reconciling %s/%s later", *key)
        if queue is not None:
            queue.add_after(key, 5.0, poll)
        return
    with _locks_guard:
        announced = key in _from_event
        _from_event.discard(key)
    if not announced and not ticks.attached(key):
        return
    try:
        reconcile_object(*key, poll=poll, config=config)
    except kopf.TemporaryError as e:
        if queue is not None:
            queue.add_after(key, float(e.delay or 1.0), poll)
    except ApiException as e:
        log.warning("reconcile of %s/%s failed (%s %s); again in 5s", *key, e.status, e.reason)
        _drop_body(key)
        if queue is not None:
            queue.add_after(key, 5.0, poll)
    except Exception:  # noqa: BLE001 — a bug or a broken connection: logged, tried again later
        log.exception("reconcile of %s/%s failed; again in 10s", *key)
        _drop_body(key)
        if queue is not None:
            queue.add_after(key, 10.0, poll)
    finally:
        if queue is not None:
            metrics.QUEUE_DEPTH.set(queue.depth())


def _child_changed(namespace: str, job: str, kind: str, typ: str) -> None:
    """A child's watch event: a Job or pod changed, or anything was deleted → reconcile its job."""
    if queue is not None and (kind in ("Job", "Pod") or typ == "DELETED"):
        queue.add((namespace, job))


def start(config: OperatorConfig) -> None:
    """Start the child caches and the queue workers (the operator's startup)."""
    global children, queue
    if queue is not None:
        return
    children = ChildCache(config.namespaces, network_policies=bool(config.network_policy), on_change=_child_changed)
    children.start()
    queue = WorkQueue(lambda key, poll: _work(key, poll, config), workers=config.workers)
    queue.start()


def stop() -> None:
    global queue, children
    if queue is not None:
        queue.stop()
    if children is not None:
        children.stop()
    queue = children = None


def configure_settings(settings: kopf.OperatorSettings) -> None:
    """kopf's settings for this operator (called at startup)."""
    settings.persistence.finalizer = "kubetune.io/finalizer"
    settings.posting.enabled = True  # kopf's own events (a handler that failed); ours: kube.post_event
    settings.posting.level = logging.INFO
    settings.posting.loggers = False  # ...and not every log line
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.execution.max_workers = 4  # only login/startup/probe run on kopf's threads
    # The daemon puts kopf's finalizer on every FineTuneJob; on deletion kopf stops the daemon
    # (it returns at once) and removes it. Should one not return at once, kopf would look again
    # only after cancellation_polling (60 s by default): `kubectl delete` hung for a minute on a
    # busy operator when the ticks were kopf timers. Look again within a second.
    settings.background.cancellation_polling = 1.0
    settings.background.instant_exit_timeout = 0.1


def register(config: OperatorConfig, registry: kopf.OperatorRegistry | None = None) -> kopf.OperatorRegistry:
    """Register the handlers for `config`."""
    registry = registry if registry is not None else kopf.get_default_registry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # the same credentials as the kubernetes client: in-cluster, else KUBECONFIG
        return kopf.login_via_client(**kwargs)

    # here, not in the startup activity below: registering a collector from inside it (a sync
    # handler on kopf's executor) left the activity unfinished, and the operator never started
    metrics.export_state(state_sizes)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_settings(settings)
        if config.metrics_port:
            metrics.serve(config.metrics_port)
        start(config)

    @kopf.on.cleanup(registry=registry)
    def shutdown(**_: Any) -> None:
        stop()

    @kopf.on.probe(id="finetunejobs", registry=registry)
    def probe(**_: Any) -> int:
        return metrics.tracked()

    @kopf.on.event(API_GROUP, API_VERSION, PLURAL, registry=registry)
    async def finetunejob_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        ns, name = body.metadata.namespace, body.metadata.name
        if type == "DELETED":
            forget(ns, name, body.metadata.uid)
            return
        if own_echo(ns, name, body.metadata.get("resourceVersion")):
            return  # the echo of our own status write (already remembered)
        remember(dict(body))
        if queue is not None:
            with _locks_guard:
                _from_event.add((ns, name))
            queue.add((ns, name))

    @kopf.daemon(API_GROUP, API_VERSION, PLURAL, cancellation_timeout=5.0, registry=registry)
    async def finetunejob_ticks(stopped: kopf.DaemonStopped, body: kopf.Body, **_: Any) -> None:
        # an idle asyncio task per FineTuneJob: wakes at the job's next tick (next_tick), or
        # never for a finished one; kopf stops it on deletion and while the operator is paused
        def enqueue(key: Key, poll: bool) -> None:
            if queue is not None:
                queue.add(key, poll)

        await ticks.run((body.metadata.namespace, body.metadata.name), stopped, enqueue)

    return registry


__all__ = ["ProgressPoller", "forget", "next_tick", "register", "reconcile_object", "remember", "start",
           "state_sizes", "stop"]
