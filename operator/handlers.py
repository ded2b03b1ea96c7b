"""kopf handlers: thin triggers around one level-based reconcile.

Every trigger — a FineTuneJob event, a child Job event, the periodic timer — ends in
`reconcile_object()`: read the FineTuneJob and its children fresh from the API, ask the pure
`reconcile()` what should exist, make it so, post the events, write the status. Only the timer
asks for the rank-0 pod's /progress (so our own status writes never start a polling loop), and
the poll runs off the reconcile threads (`ProgressPoller`): a tenant's pod that answers slowly
holds one poller thread for at most `progress_timeout` seconds, never a kopf worker or an
object's lock. A lock per object keeps concurrent triggers from interleaving; a status patch
carries the resourceVersion it was computed from, so a stale decision is refused (409) and retried.

Per-object state in this process lives only as long as its object: the lock exists while a
trigger of the object is inside `reconcile_object`; the echo table, the TTL clean-up marks, the
progress cache and the phase gauge's entry are dropped by `forget()` when the object is deleted
(its DELETED event, or a reconcile that finds it gone). `state_sizes()` counts them (exported
as kubetune_operator_object_state_entries{table}).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import kopf
from kubernetes.client.rest import ApiException

from kubetune.runtime.spec import API_GROUP, API_VERSION, PLURAL

from . import kube, metrics
from . import manifests as m
from . import status as s
from .config import OperatorConfig
from .reconcile import Decision, _terminal, merge_patch, next_check_seconds, reconcile, stage_names

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
        self._latest: dict[Key, tuple[str, dict[str, Any]]] = {}  # key → (pod name, report)
        self._busy: set[Key] = set()
        self._backoff: dict[Key, tuple[float, int]] = {}  # key → (not before, failures)

    def latest(self, key: Key, pod: str) -> dict[str, Any] | None:
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
    with _locks_guard:
        _own_writes.pop(key, None)
        if uid:
            _cleaned.discard(uid)


def state_sizes() -> dict[str, int]:
    """Entries in each per-object table of this process (0 everywhere once all objects are gone)."""
    with _locks_guard:
        out = {"locks": len(_inside), "own_writes": len(_own_writes), "ttl_cleaned": len(_cleaned)}
    out.update(poller.sizes())
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


def _reconcile_locked(namespace: str, name: str, *, poll: bool, config: OperatorConfig) -> Decision | None:
    started = time.monotonic()
    body = kube.get_finetunejob(namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        forget(namespace, name, (body or {}).get("metadata", {}).get("uid"))
        return None
    observed = kube.observe(namespace, name, network_policies=bool(config.network_policy))
    stage = ((body.get("status") or {}).get("stage") or {}).get("name")
    if stage and not _terminal(body.get("status") or {}):
        # the last report of the rank-0 pod (polled off this thread); a timer tick asks for a new one
        uid = body["metadata"].get("uid") or ""
        pod = s.rank0_pod(observed.pods.get(stage_names(observed, name, stage, uid)[0], []))
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
        log.info("%s %s %s: %s (%s)", action.verb, action.kind, action.name, result, action.why,
                 extra={**ctx, "verb": action.verb, "kind": action.kind, "child": action.name, "result": result})
    if conflicts:
        # decide again knowing which names are taken: the status says so (NameConflict); the
        # actions of that decision are the ones just tried, so they are not repeated
        observed.conflicts = conflicts
        decision = reconcile(body, observed, config)
    ref = _ref(body)
    for ev in decision.events:
        (kopf.info if ev.type == "Normal" else kopf.warn)(ref, reason=ev.reason, message=ev.message)
        log.info("event %s: %s", ev.reason, ev.message, extra={**ctx, "reason": ev.reason, "eventType": ev.type})
    for err in errors:
        kopf.warn(ref, reason="ChildError", message=err)

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
        except ApiException as e:
            if e.status in (404, 409):
                raise kopf.TemporaryError(f"status not written ({e.status}); will reconcile again", delay=1)
            raise
        if decision.status.get("phase") != old.get("phase"):
            log.info("phase %s → %s", old.get("phase"), decision.status.get("phase"),
                     extra={**ctx, "phase": decision.status.get("phase")})
    metrics.observe(namespace, name, decision.status, time.monotonic() - started,
                    old=old, created=body["metadata"].get("creationTimestamp"))
    if errors:
        metrics.ERRORS.inc()
        raise kopf.TemporaryError("; ".join(errors), delay=max(5.0, config.poll_interval))
    return decision


def _after_report(key: Key, config: OperatorConfig) -> None:
    """A new /progress report arrived (on a poller thread): put it into the status now."""
    try:
        reconcile_object(*key, poll=False, config=config)
    except kopf.TemporaryError as e:
        log.debug("reconcile of %s/%s after a progress report deferred: %s", *key, e)


def configure_settings(settings: kopf.OperatorSettings) -> None:
    """kopf's settings for this operator (called at startup)."""
    settings.persistence.finalizer = "kubetune.io/finalizer"
    settings.posting.enabled = True  # kopf.info/kopf.warn: one event per transition
    settings.posting.level = logging.INFO
    settings.posting.loggers = False  # ...and not every log line
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.execution.max_workers = 8
    # The timer puts kopf's finalizer on every FineTuneJob; on deletion kopf stops the timer and
    # removes it. A timer call still queued for a worker thread does not stop at once, and kopf
    # then looks again only after cancellation_polling (60 s by default): `kubectl delete` hung
    # for a minute on a busy operator. Look again within a second.
    settings.background.cancellation_polling = 1.0
    settings.background.instant_exit_timeout = 0.1


def register(config: OperatorConfig, registry: kopf.OperatorRegistry | None = None) -> kopf.OperatorRegistry:
    """Register the handlers for `config` (the timer's interval comes from it)."""
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

    @kopf.on.probe(id="finetunejobs", registry=registry)
    def probe(**_: Any) -> int:
        return metrics.tracked()

    @kopf.on.event(API_GROUP, API_VERSION, PLURAL, registry=registry)
    def finetunejob_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        if type == "DELETED":
            forget(body.metadata.namespace, body.metadata.name, body.metadata.uid)
            return
        if own_echo(body.metadata.namespace, body.metadata.name, body.metadata.get("resourceVersion")):
            return  # the echo of our own status write
        reconcile_object(body.metadata.namespace, body.metadata.name, poll=False, config=config)

    @kopf.timer(API_GROUP, API_VERSION, PLURAL, interval=config.poll_interval, registry=registry)
    def finetunejob_timer(body: kopf.Body, **_: Any) -> None:
        b = dict(body)
        st = b.get("status") or {}
        uid = body.metadata.uid
        if _terminal(st) and st.get("observedGeneration") == body.metadata.get("generation"):
            left = next_check_seconds(b)
            if left is None or left > 0 or uid in _cleaned:
                return  # finished and nothing (more) scheduled: no API traffic
            reconcile_object(body.metadata.namespace, body.metadata.name, poll=False, config=config)
            with _locks_guard:
                _cleaned.add(uid)  # the TTL clean-up ran; a restart runs it once more, harmlessly
            return
        reconcile_object(body.metadata.namespace, body.metadata.name, poll=True, config=config)

    @kopf.on.event("batch", "v1", "jobs", labels={m.LABEL_JOB: kopf.PRESENT}, registry=registry)
    def child_job_event(body: kopf.Body, **_: Any) -> None:
        owners = [r for r in body.metadata.get("ownerReferences") or [] if r.get("kind") == "FineTuneJob"]
        parent = owners[0]["name"] if owners else body.metadata.labels.get(m.LABEL_JOB)
        if parent:
            try:
                reconcile_object(body.metadata.namespace, parent, poll=False, config=config)
            except kopf.TemporaryError as e:
                log.debug("reconcile of %s after a Job event deferred: %s", parent, e)

    return registry


__all__ = ["ProgressPoller", "forget", "register", "reconcile_object", "state_sizes"]
