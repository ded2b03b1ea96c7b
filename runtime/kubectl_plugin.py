"""`kubetune get/describe/logs/watch` (also `kubectl kubetune …`): thin views over the
Kubernetes API of FineTuneJobs, their status (which the operator writes), events and the
rank-0 pod of the running stage.

The `kubernetes` client is imported here, lazily, so `kubetune --help` stays light. The
kubeconfig comes from --kubeconfig, $KUBECONFIG, ~/.kube/config, or the in-cluster service
account; the namespace from -n, the kubeconfig context, or `default`.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from typing import Any

from .api.contract import CONTAINER_NAME as CONTAINER
from .api.contract import LABEL_JOB, LABEL_STAGE, rank0_pod
from .api.errors import UserError
from .api.spec import API_GROUP, API_VERSION, PLURAL
from .api.stage_types import stage_kind


DONE = ("Succeeded", "Failed")


class Cluster:
    """The API clients and the namespace to use."""

    def __init__(self, kubeconfig: str | None = None, namespace: str | None = None, context: str | None = None):
        try:
            from kubernetes import client, config
        except ImportError:  # pragma: no cover - the `operator` extra installs it
            raise UserError("the kubernetes Python client is not installed: pip install 'kubetune[operator]'") from None
        self.client = client
        ns = None
        try:
            config.load_kube_config(config_file=kubeconfig, context=context)
            _, active = config.list_kube_config_contexts(config_file=kubeconfig)
            ns = ((active or {}).get("context") or {}).get("namespace")
        except config.ConfigException as err:
            try:
                config.load_incluster_config()
                with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
                    ns = f.read().strip()
            except (config.ConfigException, OSError):
                raise UserError(f"no usable kubeconfig ({err}); pass --kubeconfig or set KUBECONFIG") from None
        self.namespace = namespace or ns or "default"
        self.custom = client.CustomObjectsApi()
        self.core = client.CoreV1Api()

    def _call(self, fn, *args, **kw):
        from kubernetes.client.exceptions import ApiException

        try:
            return fn(*args, **kw)
        except ApiException as err:
            if err.status == 404:
                what = kw.get("name") or (args[-1] if args else "")
                raise UserError(f"not found: {what} in namespace {self.namespace} "
                                f"({API_GROUP} CRD installed? `kubetune crd | kubectl apply -f -`)") from None
            reason = err.reason
            try:
                reason = json.loads(err.body).get("message") or reason
            except (TypeError, ValueError):
                pass
            raise UserError(f"the Kubernetes API said {err.status}: {reason}") from None
        except OSError as err:  # connection refused, DNS, TLS
            raise UserError(f"cannot reach the Kubernetes API: {err}") from None

    def job(self, name: str) -> dict[str, Any]:
        return self._call(self.custom.get_namespaced_custom_object, API_GROUP, API_VERSION, self.namespace, PLURAL, name)

    def jobs(self, all_namespaces: bool = False) -> list[dict[str, Any]]:
        if all_namespaces:
            out = self._call(self.custom.list_cluster_custom_object, API_GROUP, API_VERSION, PLURAL)
        else:
            out = self._call(self.custom.list_namespaced_custom_object, API_GROUP, API_VERSION, self.namespace, PLURAL)
        return sorted(out.get("items", []), key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))

    def events(self, name: str) -> list[Any]:
        ev = self._call(self.core.list_namespaced_event, self.namespace,
                        field_selector=f"involvedObject.name={name},involvedObject.kind=FineTuneJob")
        return sorted(ev.items, key=lambda e: _ts(e.last_timestamp or e.event_time or e.first_timestamp
                                                  or e.metadata.creation_timestamp))

    def pods(self, job: str, stage: str | None) -> list[Any]:
        sel = f"{LABEL_JOB}={job}" + (f",{LABEL_STAGE}={stage}" if stage else "")
        return self._call(self.core.list_namespaced_pod, self.namespace, label_selector=sel).items


# ------------------------------------------------------------------------------- formatting


def _ts(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, dt.datetime):
        return value.timestamp()
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def age(value: Any, now: float | None = None) -> str:
    if not value:
        return "<unknown>"
    s = int((now or time.time()) - _ts(value))
    if s < 0:
        s = 0
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def _stage_text(st: dict[str, Any]) -> str:
    ref = st.get("stage") or {}
    if not ref:
        return "-"
    return f"{ref.get('name')} ({ref.get('index', 0) + 1}/{ref.get('count', '?')})"


def progress_text(st: dict[str, Any]) -> str:
    p = st.get("progress") or {}
    if p.get("percent") is None and p.get("step") is None:
        return st.get("progressText") or "-"
    pct = p.get("percent")
    if pct is None and p.get("step") is not None and p.get("totalSteps"):
        pct = 100.0 * p["step"] / p["totalSteps"]
    steps = f"{p.get('step', 0)}/{p.get('totalSteps', '?')}"
    return f"{pct:.0f}% {steps}" if pct is not None else steps


def _fmt(v: Any, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def get_table(items: list[dict[str, Any]], all_namespaces: bool = False, now: float | None = None) -> str:
    head = (["NAMESPACE"] if all_namespaces else []) + ["NAME", "PHASE", "STAGE", "PROGRESS", "LOSS", "ETA", "AGE"]
    rows = [head]
    for o in items:
        st = o.get("status") or {}
        p = st.get("progress") or {}
        eta = st.get("eta") or (duration(p.get("etaSeconds")) if p.get("etaSeconds") is not None else "-")
        row = [o["metadata"]["name"], st.get("phase") or "Pending", _stage_text(st), progress_text(st),
               _fmt(p.get("loss")), eta if st.get("phase") not in DONE else "-", age(o["metadata"].get("creationTimestamp"), now)]
        rows.append(([o["metadata"].get("namespace", "")] if all_namespaces else []) + row)
    return _table(rows)


def describe_text(obj: dict[str, Any], events: list[Any], now: float | None = None) -> str:
    meta, spec, st = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    out = [f"Name:         {meta['name']}", f"Namespace:    {meta.get('namespace', '')}",
           f"Created:      {meta.get('creationTimestamp', '')} ({age(meta.get('creationTimestamp'), now)} ago)",
           f"Model:        {(spec.get('model') or {}).get('name', '')}"]
    stages = spec.get("stages") or []
    out.append("Stages:       " + " → ".join(
        f"{s.get('name')} ({stage_kind(s.get('type'), s.get('method', 'lora'))})"
        for s in stages))
    if (spec.get("storage") or {}).get("uri"):
        out.append(f"Storage:      {spec['storage']['uri']}")
    if spec.get("suspend"):
        out.append("Suspend:      true")
    out.append(f"Phase:        {st.get('phase') or 'Pending'}")
    out.append(f"Stage:        {_stage_text(st)}")
    p = st.get("progress") or {}
    if p:
        bits = [progress_text(st)]
        if p.get("epoch") is not None:
            bits.append(f"epoch {p['epoch']:.2f}")
        if p.get("loss") is not None:
            bits.append(f"loss {p['loss']:.4g}")
        if p.get("learningRate") is not None:
            bits.append(f"lr {p['learningRate']:.3g}")
        if p.get("tokensPerSecond") is not None:
            bits.append(f"{p['tokensPerSecond']:.0f} tok/s")
        if p.get("etaSeconds") is not None:
            bits.append(f"ETA {duration(p['etaSeconds'])}")
        out.append("Progress:     " + ", ".join(bits))
    if st.get("checkpoint"):
        c = st["checkpoint"]
        out.append(f"Checkpoint:   {c.get('uri')}" + (f" (step {c['step']})" if c.get("step") is not None else ""))
    if st.get("output"):
        out.append(f"Output:       {st['output'].get('uri')}")
    if st.get("restartCount"):
        out.append(f"Restarts:     {st['restartCount']}")
    if st.get("startTime"):
        out.append(f"Started:      {st['startTime']}")
    if st.get("completionTime"):
        out.append(f"Completed:    {st['completionTime']}")
    out.append("Conditions:")
    conds = st.get("conditions") or []
    if conds:
        rows = [["  TYPE", "STATUS", "REASON", "AGE", "MESSAGE"]]
        for c in conds:
            rows.append([f"  {c.get('type')}", c.get("status", ""), c.get("reason", ""),
                         age(c.get("lastTransitionTime"), now), c.get("message", "")])
        out.append(_table(rows))
    else:
        out.append("  <none>")
    out.append("Stage history:")
    hist = st.get("stages") or []
    if hist:
        rows = [["  STAGE", "TYPE", "PHASE", "STARTED", "DURATION", "RESTARTS", "OUTPUT / MESSAGE"]]
        for s in hist:
            start, end = s.get("startTime"), s.get("completionTime")
            dur = duration(_ts(end) - _ts(start)) if start and end else (duration((now or time.time()) - _ts(start)) if start else "-")
            detail = s.get("message") or (s.get("output") or {}).get("uri") or (s.get("checkpoint") or {}).get("uri") or ""
            if s.get("eval") and not s.get("message"):  # an eval stage's scores before its output
                scores = ", ".join(f"{k} {v:g}" for k, v in s["eval"].items() if k != "samples")
                detail = f"{scores} → {detail}" if detail else scores
            rows.append([f"  {s.get('name')}", s.get("type", ""), s.get("phase", ""), start or "-", dur,
                         str(s.get("restarts", 0)), detail])
        out.append(_table(rows))
    else:
        out.append("  <none>")
    out.append("Events:")
    if events:
        rows = [["  TYPE", "REASON", "AGE", "FROM", "MESSAGE"]]
        for e in events:
            when = e.last_timestamp or e.event_time or e.first_timestamp or e.metadata.creation_timestamp
            src = (e.source.component if e.source and e.source.component else None) or e.reporting_component or ""
            rows.append([f"  {e.type or ''}", e.reason or "", age(when, now), src, (e.message or "").strip()])
        out.append(_table(rows))
    else:
        out.append("  <none>")
    return "\n".join(out)


# ----------------------------------------------------------------------------------- commands


def _cluster(args) -> Cluster:
    return Cluster(args.kubeconfig, args.namespace, getattr(args, "context", None))


def cmd_get(args) -> int:
    c = _cluster(args)
    items = [c.job(args.name)] if args.name else c.jobs(args.all_namespaces)
    if args.output in ("json", "yaml"):
        body: Any = items[0] if args.name else {"apiVersion": "v1", "kind": "List", "items": items}
        if args.output == "json":
            print(json.dumps(body, indent=2))
        else:
            import yaml

            print(yaml.safe_dump(body, sort_keys=False), end="")
        return 0
    if not items:
        where = "any namespace" if args.all_namespaces else f"namespace {c.namespace}"
        print(f"No FineTuneJobs found in {where}.", file=sys.stderr)
        return 0
    print(get_table(items, args.all_namespaces and not args.name))
    return 0


def cmd_describe(args) -> int:
    c = _cluster(args)
    obj = c.job(args.name)
    print(describe_text(obj, c.events(args.name)))
    return 0


def cmd_logs(args) -> int:
    c = _cluster(args)
    obj = c.job(args.name)
    st = obj.get("status") or {}
    stage = args.stage or (st.get("stage") or {}).get("name")
    if stage is None:
        stages = (obj.get("spec") or {}).get("stages") or []
        stage = stages[0]["name"] if stages else None
    pod = rank0_pod(c.pods(args.name, stage))
    if pod is None:
        raise UserError(f"no pod of FineTuneJob {args.name!r} stage {stage!r} yet (phase {st.get('phase') or 'Pending'}); "
                        f"`kubetune describe {args.name}` shows why")
    if args.follow:  # a pod still starting has no log yet: wait for it (as `kubectl logs -f` users expect)
        deadline = time.monotonic() + 300
        while (pod.status is None or pod.status.phase == "Pending") and time.monotonic() < deadline:
            time.sleep(1)
            pod = c._call(c.core.read_namespaced_pod, pod.metadata.name, c.namespace)
    containers = [ct.name for ct in pod.spec.containers]
    container = args.container or (CONTAINER if CONTAINER in containers else containers[0])
    print(f"==> pod {pod.metadata.name} (stage {stage}, rank 0) <==", file=sys.stderr)
    kw: dict[str, Any] = {"container": container}
    if args.tail is not None and args.tail >= 0:
        kw["tail_lines"] = args.tail
    if not args.follow:
        # raw bytes: some client versions hand back the repr of the bytes ("b'...'") as a str
        resp = c._call(c.core.read_namespaced_pod_log, pod.metadata.name, c.namespace, _preload_content=False, **kw)
        try:
            sys.stdout.write(resp.data.decode("utf-8", "replace"))
        finally:
            resp.release_conn()
        return 0
    resp = c._call(c.core.read_namespaced_pod_log, pod.metadata.name, c.namespace, follow=True,
                   _preload_content=False, **kw)
    try:
        for chunk in resp.stream(1024):
            sys.stdout.write(chunk.decode("utf-8", "replace"))
            sys.stdout.flush()
    finally:
        resp.release_conn()
    return 0


def watch_line(obj: dict[str, Any]) -> str:
    st = obj.get("status") or {}
    p = st.get("progress") or {}
    parts = [obj["metadata"]["name"], st.get("phase") or "Pending", _stage_text(st), progress_text(st)]
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.4g}")
    if p.get("tokensPerSecond") is not None:
        parts.append(f"{p['tokensPerSecond']:.0f} tok/s")
    if p.get("etaSeconds") is not None and st.get("phase") not in DONE:
        parts.append(f"ETA {duration(p['etaSeconds'])}")
    return "  ".join(parts)


def cmd_watch(args) -> int:
    """Print a line whenever the progress changes, until the job succeeds or fails.
    Exit 0 on Succeeded, 1 on Failed, 2 on --timeout."""
    c = _cluster(args)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    last = None
    while True:
        obj = c.job(args.name)
        line = watch_line(obj)
        if line != last:
            print(f"{time.strftime('%H:%M:%S')}  {line}", flush=True)
            last = line
        phase = (obj.get("status") or {}).get("phase")
        if phase in DONE:
            if phase == "Failed":
                failed = next((x for x in (obj.get("status") or {}).get("conditions") or [] if x.get("type") == "Failed"), {})
                if failed.get("message"):
                    print(f"failed: {failed['message']}", file=sys.stderr)
                return 1
            out = ((obj.get("status") or {}).get("output") or {}).get("uri")
            if out:
                print(f"output: {out}")
            return 0
        if deadline and time.monotonic() > deadline:
            print(f"still {phase or 'Pending'} after {args.timeout}s", file=sys.stderr)
            return 2
        time.sleep(args.interval)
