"""kopf handlers: thin triggers around one level-based reconcile.

Every trigger — a FineTuneJob event, a child Job event, the periodic timer — ends in
`reconcile_object()`: read the FineTuneJob and its children fresh from the API, ask the pure
`reconcile()` what should exist, make it so, post the events, write the status. Only the timer
polls the rank-0 pod's /progress (so our own status writes never start a polling loop). A lock
per object keeps concurrent triggers from interleaving; a status patch carries the
resourceVersion it was computed from, so a stale decision is refused (409) and retried.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import kopf
from kubernetes.client.rest import ApiException

from kubetune.runtime.spec import API_GROUP, API_VERSION, PLURAL

from . import kube, metrics
from . import manifests as m
from .config import OperatorConfig
from .reconcile import Decision, _terminal, merge_patch, next_check_seconds, reconcile

log = logging.getLogger("kubetune.operator")

_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()
_cleaned: set[str] = set()  # finished jobs whose TTL clean-up has run (in this process)
# Triggers of one object inside reconcile_object (running + waiting), and whether a waiting one
# was asked to poll /progress. A third trigger is dropped: the one waiting has not read anything
# yet, so it will see whatever change this trigger was about.
_inside: dict[tuple[str, str], list] = {}
# The resourceVersion of each object's last status write by this process: its watch event is the
# echo of our own decision, and reconciling it again would only repeat that decision.
_own_writes: dict[tuple[str, str], str] = {}


def _lock(namespace: str, name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault((namespace, name), threading.Lock())


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
        inside = _inside.setdefault(key, [0, False])
        if inside[0] >= 2:
            inside[1] = inside[1] or poll
            return None
        inside[0] += 1
    try:
        with _lock(namespace, name):
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
        metrics.forget(namespace, name)
        return None
    observed = kube.observe(namespace, name)
    stage = ((body.get("status") or {}).get("stage") or {}).get("name")
    if poll and stage and not _terminal(body.get("status") or {}):
        pods = observed.pods.get(m.child_name(name, stage), [])
        observed.progress = kube.poll_progress(pods, config.runtime_metrics_port, config.progress_timeout)
    decision = reconcile(body, observed, config)
    ctx = {"namespace": namespace, "finetunejob": name}
    errors = []
    for action in decision.actions:
        try:
            result = kube.apply(namespace, action)
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
            metrics.forget(body.metadata.namespace, body.metadata.name)
            _own_writes.pop((body.metadata.namespace, body.metadata.name), None)
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


__all__ = ["register", "reconcile_object"]
