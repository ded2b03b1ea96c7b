"""The operator's thin I/O layer: read a FineTuneJob and its children, apply a Decision.

Uses the official kubernetes client (synchronous; kopf runs sync handlers in threads). Every
write is idempotent: creating what already exists is treated as done, deleting what is gone too.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from pydantic import ValidationError

from kubetune.runtime.api.contract import rank0_pod
from kubetune.runtime.api.progress import ProgressReport
from kubetune.runtime.api.spec import API_GROUP, API_VERSION, PLURAL

from . import manifests as m
from . import status as s
from .reconcile import Action, Observed

log = logging.getLogger("kubetune.operator")

TIMEOUT = 30  # seconds per API request: a stuck connection must not stall a handler forever
# HTTP connections kept per client: one per reconcile worker and progress poller, and more (the
# client's default is 5 × CPUs; 16 workers sharing 10 connections opened a new TLS connection for
# most requests under load)
POOL_SIZE = 48
_api_client: kubernetes.client.ApiClient | None = None
_watch_client: kubernetes.client.ApiClient | None = None


def _client() -> kubernetes.client.ApiClient:
    cfg = kubernetes.client.Configuration.get_default_copy()
    cfg.connection_pool_maxsize = POOL_SIZE
    return kubernetes.client.ApiClient(cfg)


def api_client() -> kubernetes.client.ApiClient:
    """In-cluster config when running in a pod, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    global _api_client
    if _api_client is None:
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()
        _api_client = _client()
    return _api_client


def watch_client() -> kubernetes.client.ApiClient:
    """A client of its own for the caches' long-lived watches, which would otherwise hold
    connections of the reconcile workers' pool."""
    global _watch_client
    if _watch_client is None:
        api_client()  # loads the configuration
        _watch_client = _client()
    return _watch_client


def _core() -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api_client())


def _batch() -> kubernetes.client.BatchV1Api:
    return kubernetes.client.BatchV1Api(api_client())


def _networking() -> kubernetes.client.NetworkingV1Api:
    return kubernetes.client.NetworkingV1Api(api_client())


def _custom() -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api_client())


def _json(api_call, *args, **kw) -> Any:
    """Call a client method and return the raw JSON (skips the client's model deserialisation)."""
    resp = api_call(*args, _preload_content=False, _request_timeout=TIMEOUT, **kw)
    return json.loads(resp.data)


def get_finetunejob(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return _custom().get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name,
                                                      _request_timeout=TIMEOUT)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def observe(namespace: str, job_name: str, network_policies: bool = False, cache=None) -> Observed:
    """The children labelled kubetune.io/job=<name>, and their pods grouped by Job (NetworkPolicies
    only when the operator makes them): from the watch-fed `cache` (cache.ChildCache) when given,
    else LISTed."""
    sel = f"{m.LABEL_JOB}={job_name}"
    if cache is not None:
        kids = cache.children(namespace, job_name)
        jobs, cms, svcs, pods = kids["Job"], kids["ConfigMap"], kids["Service"], kids["Pod"]
        nps = kids.get("NetworkPolicy", [])
    else:
        jobs = _json(_batch().list_namespaced_job, namespace, label_selector=sel)["items"]
        cms = _json(_core().list_namespaced_config_map, namespace, label_selector=sel)["items"]
        svcs = _json(_core().list_namespaced_service, namespace, label_selector=sel)["items"]
        # pods are read by their Job: none to read before the first stage Job exists (a new job)
        pods = _json(_core().list_namespaced_pod, namespace, label_selector=sel)["items"] if jobs else []
        nps = (_json(_networking().list_namespaced_network_policy, namespace, label_selector=sel)["items"]
               if network_policies else [])
    by_job: dict[str, list[dict[str, Any]]] = {}
    for p in pods:
        labels = (p.get("metadata") or {}).get("labels") or {}
        owner = labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")
        if owner:
            by_job.setdefault(owner, []).append(p)
    # A Job without pods may be one whose pods cannot be created (quota, Pod Security, a missing
    # PriorityClass): the Job controller says so only in a FailedCreate event on the Job.
    podless = {j["metadata"].get("uid"): j["metadata"]["name"] for j in jobs
               if j["metadata"]["name"] not in by_job and not s.job_complete(j) and not s.job_failed(j)
               and not (j.get("spec") or {}).get("suspend")}
    events: dict[str, list[dict[str, Any]]] = {}
    if podless:
        try:
            listed = _json(_core().list_namespaced_event, namespace,
                           field_selector="involvedObject.kind=Job,reason=FailedCreate")["items"]
        except ApiException as e:
            if e.status != 403:
                raise
            # a chart from before the `list events` rule: the reason stays unknown, nothing breaks
            log.warning("cannot list events in %s (403): grant the operator `list` on events to see why pods "
                        "cannot be created", namespace)
            listed = []
        for e in listed:
            name = podless.get((e.get("involvedObject") or {}).get("uid"))
            if name:
                events.setdefault(name, []).append(e)
    return Observed(
        workloads=kueue_workloads(namespace, [j for j in jobs if (j.get("spec") or {}).get("suspend")
                                              and m.KUEUE_QUEUE_LABEL in ((j.get("metadata") or {}).get("labels") or {})]),
        jobs={j["metadata"]["name"]: j for j in jobs},
        configmaps={c["metadata"]["name"]: c for c in cms},
        services={v["metadata"]["name"]: v for v in svcs},
        network_policies={n["metadata"]["name"]: n for n in nps},
        pods=by_job,
        job_events=events,
    )


KUEUE_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
_kueue_missing_until = 0.0  # Kueue's Workload API was not there: do not ask again before this


def kueue_workloads(namespace: str, jobs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The Kueue Workload of each queued (suspended) Job, by Job name: only asked for Jobs that
    wait, one LIST by Kueue's job-uid label each. Without Kueue's API (not installed, or no right
    to read it) the reason stays unknown: nothing breaks, and it is asked again in 5 minutes."""
    global _kueue_missing_until
    if not jobs or time.monotonic() < _kueue_missing_until:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for j in jobs:
        meta = j.get("metadata") or {}
        try:
            items = _custom().list_namespaced_custom_object(
                "kueue.x-k8s.io", "v1beta2", namespace, "workloads",
                label_selector=f"{KUEUE_JOB_UID_LABEL}={meta.get('uid')}", _request_timeout=TIMEOUT)["items"]
        except ApiException as e:
            if e.status in (403, 404):
                log.info("cannot read Kueue Workloads in %s (%s): the Queued status will not say Kueue's reason",
                         namespace, e.status)
                _kueue_missing_until = time.monotonic() + 300
                return {}
            raise
        if items:
            out[meta["name"]] = max(items, key=lambda w: (w.get("metadata") or {}).get("creationTimestamp") or "")
    return out


PROGRESS_MAX_BYTES = 64 * 1024  # a /progress report is ~1 KiB; anything past this is not one
PROGRESS_MAX_DEPTH = 16  # the report nests 2 levels; json's recursive parser must not meet 100k


class ProgressError(Exception):
    """Why a /progress answer was not used (a deadline, a size, a body that is not a report)."""


class ProgressNotReady(ProgressError):
    """The runtime answered 503: its process has no stage running yet (it is still starting)."""


def _nesting(body: bytes, limit: int) -> int:
    """The deepest [ / { nesting of a JSON text (strings skipped), stopping early past `limit`."""
    depth = deepest = 0
    in_str = esc = False
    for ch in body:
        if in_str:
            if esc:
                esc = False
            elif ch == 0x5C:  # backslash
                esc = True
            elif ch == 0x22:  # quote
                in_str = False
        elif ch == 0x22:
            in_str = True
        elif ch in (0x5B, 0x7B):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif ch in (0x5D, 0x7D):
            depth -= 1
    return deepest


def fetch_progress(host: str, port: int, deadline: float, max_bytes: int = PROGRESS_MAX_BYTES,
                   path: str = "/progress") -> ProgressReport:
    """GET http://host:port/progress within `deadline` seconds in all (connect, headers, body).

    A plain HTTP/1.0 exchange on a socket whose timeout is, before every read, what is left of
    the deadline: a server that drips a byte a second, or never ends its body, costs `deadline`
    and no more; more than `max_bytes` of body, a body nested deeper than PROGRESS_MAX_DEPTH,
    or anything but a ProgressReport raise ProgressError (so do connection errors, as OSError).
    Keys the model does not know (a newer runtime's) are ignored.
    """
    end = time.monotonic() + deadline

    def left() -> float:
        r = end - time.monotonic()
        if r <= 0:
            raise ProgressError(f"no complete answer within {deadline:g}s")
        return r

    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    buf = bytearray()
    head: bytes | None = None
    length: int | None = None
    try:
        with socket.create_connection((host, port), timeout=left()) as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {authority}\r\nAccept: application/json\r\n"
                         "Connection: close\r\n\r\n".encode())
            while True:
                sock.settimeout(left())
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if head is None:
                    at = buf.find(b"\r\n\r\n")
                    if at < 0:
                        if len(buf) > 16384:
                            raise ProgressError("HTTP headers longer than 16 KiB")
                        continue
                    head, buf = bytes(buf[:at]), buf[at + 4:]
                    length = _content_length(head, max_bytes)
                if len(buf) > max_bytes:
                    raise ProgressError(f"answer larger than {max_bytes} bytes")
                if length is not None and len(buf) >= length:
                    break  # all of it (a keep-alive server need not close)
    except TimeoutError:
        raise ProgressError(f"no complete answer within {deadline:g}s") from None
    if head is None:
        raise ProgressError("not an HTTP answer")
    if length is not None and len(buf) < length:
        raise ProgressError(f"answer cut short ({len(buf)} of {length} bytes)")
    body = bytes(buf[:length] if length is not None else buf)
    if _nesting(body, PROGRESS_MAX_DEPTH) > PROGRESS_MAX_DEPTH:
        raise ProgressError(f"JSON nested deeper than {PROGRESS_MAX_DEPTH} levels")
    try:
        report = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ProgressError(f"not JSON: {str(e)[:100]}") from None
    if not isinstance(report, dict):
        raise ProgressError(f"not a JSON object but {type(report).__name__}")
    try:
        return ProgressReport.model_validate(report)
    except ValidationError as e:
        raise ProgressError(f"not a progress report: {str(e)[:300]}") from None


def _content_length(head: bytes, max_bytes: int) -> int | None:
    lines = head.split(b"\r\n")
    status = lines[0].split()
    if len(status) >= 2 and status[0].startswith(b"HTTP/") and status[1] == b"503":
        raise ProgressNotReady(f"HTTP status {lines[0][:60].decode('latin-1')!r}")
    if len(status) < 2 or not status[0].startswith(b"HTTP/") or status[1] != b"200":
        raise ProgressError(f"HTTP status {lines[0][:60].decode('latin-1')!r}")
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding" and value.strip().lower() != b"identity":
            raise ProgressError("a chunked answer to an HTTP/1.0 request")
        if name == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                raise ProgressError("a malformed Content-Length") from None
            if length > max_bytes:
                raise ProgressError(f"answer larger than {max_bytes} bytes (Content-Length {length})")
    return length


def poll_progress(pods: list[dict[str, Any]], port: int, timeout: float) -> ProgressReport | None:
    """The rank-0 pod's /progress report (fetch_progress within `timeout` seconds in all); None
    when no pod runs, it does not answer yet, or its answer is not a report (logged, never raised)."""
    return probe_progress(pods, port, timeout)[0]


def probe_progress(pods: list[dict[str, Any]], port: int, timeout: float) -> tuple[ProgressReport | None, bool]:
    """`poll_progress`, and whether a miss was only the pod still starting: its runtime answered
    503 ("no stage running yet") or nothing listens on the port yet (connection refused). Such a
    miss cost next to nothing and is no reason to poll less often; anything else (a deadline
    used up, an answer that is not a report) is."""
    pod = rank0_pod(pods, running=True)
    ip = ((pod or {}).get("status") or {}).get("podIP")
    if not ip:
        return None, True
    name = pod["metadata"].get("name")
    try:
        return fetch_progress(ip, port, timeout), False
    except ProgressNotReady as e:
        log.debug("progress of pod %s not ready: %s", name, e, extra={"pod": name})
        return None, True
    except ProgressError as e:
        log.warning("progress of pod %s not used: %s", name, e, extra={"pod": name})
    except ConnectionRefusedError as e:
        log.debug("progress of pod %s not available yet: %s", name, e)
        return None, True
    except OSError as e:
        log.debug("progress of pod %s not available: %s", name, e)
    except Exception as e:  # noqa: BLE001 — a tenant's server must never break a reconcile
        log.warning("progress of pod %s not used: %r", name, e, extra={"pod": name})
    return None, False


class NameConflict(Exception):
    """A child's name is taken by an object the FineTuneJob does not own."""

    def __init__(self, kind: str, name: str, message: str):
        super().__init__(message)
        self.kind, self.name, self.message = kind, name, message


def _existing(namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    fn = {"Job": _batch().read_namespaced_job, "ConfigMap": _core().read_namespaced_config_map,
          "Service": _core().read_namespaced_service,
          "NetworkPolicy": _networking().read_namespaced_network_policy}[kind]
    try:
        return _json(fn, name, namespace)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def _check_owner(namespace: str, action: Action) -> str:
    """A create met 409: 'exists' when the object there is ours (a lost race with ourselves),
    else NameConflict naming what is there — never "already exists = success"."""
    want = {r.get("uid") for r in ((action.body or {}).get("metadata") or {}).get("ownerReferences") or []}
    there = _existing(namespace, action.kind, action.name)
    if there is None:
        raise ApiException(status=409, reason="Conflict")  # gone again: the next reconcile retries
    refs = (there.get("metadata") or {}).get("ownerReferences") or []
    if want & {r.get("uid") for r in refs}:
        return "exists"
    owners = ", ".join(f"{r.get('kind')} {r.get('name')}" for r in refs) or "no owner"
    raise NameConflict(action.kind, action.name,
                       f"{action.kind} {action.name} already exists and is not owned by this FineTuneJob "
                       f"(owned by {owners}); delete or rename it, or rename this FineTuneJob or stage")


def apply(namespace: str, action: Action) -> str:
    """Carry out one action; returns what happened ('created', 'exists', 'patched', 'deleted', 'gone').
    Raises NameConflict when a create finds the name taken by an object this FineTuneJob does not own."""
    core, batch = _core(), _batch()
    try:
        if action.verb == "create":
            fn = {"Job": batch.create_namespaced_job, "ConfigMap": core.create_namespaced_config_map,
                  "Service": core.create_namespaced_service,
                  "NetworkPolicy": _networking().create_namespaced_network_policy}[action.kind]
            fn(namespace, action.body, _request_timeout=TIMEOUT)
            return "created"
        if action.verb == "patch":
            fn = {"Job": batch.patch_namespaced_job, "ConfigMap": core.patch_namespaced_config_map,
                  "Service": core.patch_namespaced_service,
                  "NetworkPolicy": _networking().patch_namespaced_network_policy}[action.kind]
            fn(action.name, namespace, action.body, _content_type="application/merge-patch+json",
               _request_timeout=TIMEOUT)
            return "patched"
        fn = {"Job": batch.delete_namespaced_job, "ConfigMap": core.delete_namespaced_config_map,
              "Service": core.delete_namespaced_service,
              "NetworkPolicy": _networking().delete_namespaced_network_policy}[action.kind]
        # Background (default): the Job goes now, the garbage collector removes its pods.
        # Foreground (a gang restart): the Job stays until its pods are gone, so no new pod
        # meets an old one at the rendezvous.
        policy = (action.body or {}).get("propagationPolicy", "Background")
        fn(action.name, namespace, body=kubernetes.client.V1DeleteOptions(propagation_policy=policy),
           _request_timeout=TIMEOUT)
        return "deleted"
    except ApiException as e:
        if action.verb == "create" and e.status == 409:
            return _check_owner(namespace, action)
        if action.verb == "delete" and e.status == 404:
            return "gone"
        raise


REPORTING_COMPONENT = "kubetune-operator"


def post_event(namespace: str, ref: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """One core/v1 Event about `ref`, posted now (before the status that goes with it is written,
    so an operator that dies right after a transition has told it). A failure is logged, never
    raised: an event is never worth a failed reconcile."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    body = {
        "metadata": {"generateName": f"{(ref.get('metadata') or {}).get('name', 'kubetune')}."[:200],
                     "namespace": namespace},
        "type": type_, "reason": reason, "message": message[:1024], "action": "Reconcile",
        "involvedObject": {"apiVersion": ref.get("apiVersion"), "kind": ref.get("kind"),
                           "name": (ref.get("metadata") or {}).get("name"), "namespace": namespace,
                           "uid": (ref.get("metadata") or {}).get("uid")},
        "source": {"component": REPORTING_COMPONENT}, "reportingComponent": REPORTING_COMPONENT,
        "reportingInstance": socket.gethostname()[:128],
        "firstTimestamp": now + "Z", "lastTimestamp": now + "Z", "eventTime": now + ".000000Z", "count": 1,
    }
    try:
        _json(_core().create_namespaced_event, namespace, body)
    except ApiException as e:
        log.warning("event %s about %s/%s not posted: %s %s", reason, namespace,
                    (ref.get("metadata") or {}).get("name"), e.status, e.reason)


def patch_status(namespace: str, name: str, resource_version: str | None, patch: dict[str, Any]) -> dict[str, Any]:
    """Merge-patch the status subresource; the resourceVersion makes it fail (409) on a stale read."""
    body: dict[str, Any] = {"status": patch}
    if resource_version:
        body["metadata"] = {"resourceVersion": resource_version}
    return _custom().patch_namespaced_custom_object_status(
        API_GROUP, API_VERSION, namespace, PLURAL, name, body,
        _content_type="application/merge-patch+json", _request_timeout=TIMEOUT,
    )
