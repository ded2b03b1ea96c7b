"""Watch-fed caches of the operator's children: one LIST + WATCH per kind, selected server-side.

Each `Informer` lists one kind (Jobs, pods, ConfigMaps, Services, NetworkPolicies) with the label
selector `kubetune.io/job` — the apiserver filters, so the operator never receives another team's
Jobs or pods — then watches from the list's resourceVersion (with bookmarks), re-listing when the
watch expires (410 Gone) and backing off when the apiserver cannot be reached. A reconcile reads
its children from `ChildCache.children()` instead of four LIST calls; the cache is what the
apiserver said last, so a create may meet AlreadyExists (the writes are idempotent, see kube.apply)
and a decision made on an old view is corrected by the next event. `managedFields` are dropped
from every stored object (they are most of a small object's bytes and never read).

What happens to a child (a Job or pod changes; anything is deleted) calls `on_change(namespace,
job_name)` on the informer's thread, which only enqueues a reconcile (workqueue.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Iterator

from kubernetes.client.rest import ApiException

from . import manifests as m

log = logging.getLogger("kubetune.operator")

Key = tuple[str, str]
OnChange = Callable[[str, str, str, str], None]  # (namespace, job name, kind, event type)

WATCH_SECONDS = 300  # the apiserver ends a watch after this; we re-open it from the last resourceVersion
PAGE = 500  # objects per LIST page


class Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


def _strip(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    meta.pop("managedFields", None)
    return obj


def _lines(resp) -> Iterator[bytes]:
    """The lines of a streamed HTTP body (one watch event per line)."""
    buf = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line
    if buf.strip():
        yield buf


class Informer:
    """One kind, in one namespace or all: a dict of its labelled objects kept up to date."""

    def __init__(self, kind: str, list_call: Callable[..., Any], namespace: str | None,
                 selector: str, on_change: OnChange | None = None):
        self.kind = kind
        self._list_call = list_call  # list_namespaced_x (called with namespace) or list_x_for_all_namespaces
        self.namespace = namespace
        self.selector = selector
        self.on_change = on_change
        self.synced = threading.Event()
        self._objects: dict[Key, dict[str, Any]] = {}
        self._by_job: dict[Key, set[str]] = {}  # (namespace, kubetune.io/job) → names
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._resp = None
        self._thread: threading.Thread | None = None
        self.lists = 0  # LIST calls made (the first, and one after each 410)
        self.watches = 0  # WATCH requests opened

    # ---- reading
    def by_job(self, namespace: str, job: str) -> list[dict[str, Any]]:
        with self._guard:
            return [self._objects[(namespace, n)] for n in sorted(self._by_job.get((namespace, job), ()))]

    def __len__(self) -> int:
        with self._guard:
            return len(self._objects)

    # ---- the loop
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"kubetune-informer-{self.kind}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        resp = self._resp
        if resp is not None:
            try:
                resp.close()
            except Exception:  # noqa: BLE001 — closing a dead connection
                pass

    def _call(self, **kw):
        args = (self.namespace,) if self.namespace else ()
        return self._list_call(*args, label_selector=self.selector, _preload_content=False, **kw)

    def _run(self) -> None:
        failures = 0
        rv = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    rv = self._list()
                    self.synced.set()
                rv = self._watch(rv)
                failures = 0
            except Gone:
                rv = None
            except Exception as e:  # noqa: BLE001 — the apiserver restarts, a connection drops: keep trying
                if self._stop.is_set():
                    return
                failures += 1
                wait = min(30.0, 0.5 * 2 ** min(failures, 6))
                log.warning("watch of %s failed (%s); again in %.0fs", self.kind, e, wait)
                rv = None if isinstance(e, ApiException) and e.status == 410 else rv
                self._stop.wait(wait)

    def _list(self) -> str:
        items: list[dict[str, Any]] = []
        cont = None
        while True:
            resp = self._call(limit=PAGE, _request_timeout=60, **({"_continue": cont} if cont else {}))
            page = json.loads(resp.data)
            items += page.get("items") or []
            cont = (page.get("metadata") or {}).get("continue")
            if not cont:
                break
        self.lists += 1
        fresh = {}
        for obj in items:
            meta = obj["metadata"]
            fresh[(meta.get("namespace") or "", meta["name"])] = _strip(obj)
        with self._guard:
            old = self._objects
            self._objects = fresh
            self._by_job = {}
            for key, obj in fresh.items():
                self._index(key, obj, add=True)
        changed = [(k, o, "ADDED") for k, o in fresh.items()
                   if (old.get(k) or {}).get("metadata", {}).get("resourceVersion") != o["metadata"].get("resourceVersion")]
        changed += [(k, o, "DELETED") for k, o in old.items() if k not in fresh]
        for key, obj, typ in changed:
            self._notify(key, obj, typ)
        return (page.get("metadata") or {}).get("resourceVersion") or ""

    def _watch(self, rv: str) -> str:
        self.watches += 1
        resp = self._call(watch=True, resource_version=rv, allow_watch_bookmarks=True,
                          timeout_seconds=WATCH_SECONDS, _request_timeout=(10, WATCH_SECONDS + 30))
        self._resp = resp
        try:
            for line in _lines(resp):
                event = json.loads(line)
                typ, obj = event.get("type"), event.get("object") or {}
                if typ == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone()
                    raise RuntimeError(obj.get("message") or "watch error")
                rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                if typ == "BOOKMARK":
                    continue
                self._apply(typ, _strip(obj))
        finally:
            self._resp = None
            resp.release_conn()
        return rv

    def _apply(self, typ: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        key = (meta.get("namespace") or "", meta["name"])
        if typ == "DELETED":
            self.drop(*key)
        else:
            self.put(obj)
        self._notify(key, obj, typ)

    def put(self, obj: dict[str, Any]) -> None:
        """Store `obj` (a watch event's, or our own write before its watch event arrives)."""
        meta = obj["metadata"]
        key = (meta.get("namespace") or "", meta["name"])
        with self._guard:
            old = self._objects.get(key)
            if old is not None:
                self._index(key, old, add=False)
            self._objects[key] = obj
            self._index(key, obj, add=True)

    def drop(self, namespace: str, name: str) -> None:
        """Forget an object (a watch event's delete, or our own before it arrives)."""
        with self._guard:
            old = self._objects.pop((namespace, name), None)
            if old is not None:
                self._index((namespace, name), old, add=False)

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._guard:
            return self._objects.get((namespace, name))

    def _index(self, key: Key, obj: dict[str, Any], add: bool) -> None:
        job = ((obj.get("metadata") or {}).get("labels") or {}).get(m.LABEL_JOB)
        if not job:
            return
        idx = (key[0], job)
        if add:
            self._by_job.setdefault(idx, set()).add(key[1])
        else:
            names = self._by_job.get(idx)
            if names is not None:
                names.discard(key[1])
                if not names:
                    del self._by_job[idx]

    def _notify(self, key: Key, obj: dict[str, Any], typ: str) -> None:
        job = ((obj.get("metadata") or {}).get("labels") or {}).get(m.LABEL_JOB)
        if job and self.on_change is not None:
            try:
                self.on_change(key[0], job, self.kind, typ)
            except Exception:  # noqa: BLE001 — a callback must not end the watch
                log.exception("on_change for %s %s/%s failed", self.kind, *key)


def merge_patched(obj: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """`obj` with a JSON merge patch (RFC 7386) applied, as a new object."""
    out = dict(obj)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_patched(out[k], v)
        else:
            out[k] = json.loads(json.dumps(v))
    return out


class ChildCache:
    """The informers of every child kind, for the namespaces the operator serves (all: one
    cluster-wide watch per kind)."""

    def __init__(self, namespaces: tuple[str, ...] = (), network_policies: bool = False,
                 on_change: OnChange | None = None):
        import kubernetes

        from . import kube

        client = kube.watch_client()
        core, batch = kubernetes.client.CoreV1Api(client), kubernetes.client.BatchV1Api(client)
        net = kubernetes.client.NetworkingV1Api(client)
        kinds: dict[str, tuple[Callable, Callable]] = {
            "Job": (batch.list_namespaced_job, batch.list_job_for_all_namespaces),
            "Pod": (core.list_namespaced_pod, core.list_pod_for_all_namespaces),
            "ConfigMap": (core.list_namespaced_config_map, core.list_config_map_for_all_namespaces),
            "Service": (core.list_namespaced_service, core.list_service_for_all_namespaces),
        }
        if network_policies:
            kinds["NetworkPolicy"] = (net.list_namespaced_network_policy, net.list_network_policy_for_all_namespaces)
        self.informers: dict[str, list[Informer]] = {}
        for kind, (namespaced, everywhere) in kinds.items():
            if namespaces:
                self.informers[kind] = [Informer(kind, namespaced, ns, m.LABEL_JOB, on_change) for ns in namespaces]
            else:
                self.informers[kind] = [Informer(kind, everywhere, None, m.LABEL_JOB, on_change)]

    def start(self) -> None:
        for infs in self.informers.values():
            for inf in infs:
                inf.start()

    def stop(self) -> None:
        for infs in self.informers.values():
            for inf in infs:
                inf.stop()

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for infs in self.informers.values():
            for inf in infs:
                if not inf.synced.wait(max(0.0, deadline - time.monotonic())):
                    return False
        return True

    @property
    def synced(self) -> bool:
        return all(inf.synced.is_set() for infs in self.informers.values() for inf in infs)

    def children(self, namespace: str, job: str) -> dict[str, list[dict[str, Any]]]:
        """kind → the objects labelled kubetune.io/job=<job> in `namespace`, as last seen."""
        out: dict[str, list[dict[str, Any]]] = {}
        for kind, infs in self.informers.items():
            out[kind] = [o for inf in infs if inf.namespace in (None, namespace) for o in inf.by_job(namespace, job)]
        return out

    def wrote(self, namespace: str, verb: str, kind: str, name: str, body: dict[str, Any] | None) -> None:
        """What this operator just did to a child, so that the next reconcile sees it before the
        watch event does (else it would create the same Job again and warn that it was missing):
        a created manifest as it was sent, a merge patch applied to the cached object, a delete."""
        for inf in self.informers.get(kind, []):
            if inf.namespace not in (None, namespace):
                continue
            if verb == "create" and body is not None:
                obj = json.loads(json.dumps(body))
                obj.setdefault("metadata", {}).update(namespace=namespace, name=name)
                obj["metadata"].pop("resourceVersion", None)
                inf.put(obj)
            elif verb == "patch" and body is not None:
                held = inf.get(namespace, name)
                if held is not None:
                    inf.put(merge_patched(held, body))
            elif verb == "delete" and (body or {}).get("propagationPolicy") == "Foreground":
                held = inf.get(namespace, name)  # it stays, being deleted, until its pods are gone
                if held is not None:
                    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                    inf.put(merge_patched(held, {"metadata": {"deletionTimestamp": stamp}}))
            elif verb == "delete":
                inf.drop(namespace, name)

    def sizes(self) -> dict[str, int]:
        return {f"cache_{kind.lower()}s": sum(len(i) for i in infs) for kind, infs in self.informers.items()}

    def requests(self) -> dict[str, int]:
        return {"lists": sum(i.lists for infs in self.informers.values() for i in infs),
                "watches": sum(i.watches for infs in self.informers.values() for i in infs)}


__all__ = ["ChildCache", "Informer"]
