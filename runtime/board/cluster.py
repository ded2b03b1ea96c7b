"""The board's cluster mode: FineTuneJobs of one namespace, through the user's own kubeconfig.

Every call is made with the credentials of the kubeconfig's context (never in-cluster, never an
operator ServiceAccount), so the board can do exactly what `kubectl` could: an apiserver refusal
(403, 404, 409, 422 …) is passed back with its status code and message.

The status carries only the latest loss, so the board keeps the (step, loss, learningRate) points
it sees while it runs (a poller thread, and every read), in memory per job; the history answer
adds the progress lines the stage pod prints in its log (`kubetune run`'s `format_progress`
lines, one per logging step), and says which source the points came from.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from ..api.contract import CONTAINER_NAME, LABEL_JOB, LABEL_STAGE, rank0_pod
from ..kubectl_plugin import _ts
from ..api.spec import API_GROUP, API_VERSION, PLURAL
from .common import BoardError, parse_progress_lines, row


def kubeconfig_usable(kubeconfig: str | None, context: str | None) -> tuple[bool, str]:
    """Whether a kubeconfig (file, $KUBECONFIG or ~/.kube/config) loads; (ok, why not)."""
    try:
        from kubernetes import config
    except ImportError:
        return False, "the kubernetes Python client is not installed (pip install 'kubetune[board]')"
    try:  # a client of its own: no global configuration changes
        config.new_client_from_config(config_file=kubeconfig, context=context, persist_config=False)
    except Exception as err:  # noqa: BLE001 - ConfigException, a missing file, a bad YAML
        return False, str(err).splitlines()[0] if str(err) else type(err).__name__
    return True, ""


class ClusterBackend:
    mode = "cluster"

    def __init__(self, kubeconfig: str | None = None, context: str | None = None, namespace: str | None = None,
                 poll_seconds: float = 5.0):
        from kubernetes import client, config

        try:
            api = config.new_client_from_config(config_file=kubeconfig, context=context, persist_config=False)
            contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
        except Exception as err:  # noqa: BLE001
            raise BoardError(500, f"no usable kubeconfig: {err}") from None
        if context:
            active = next((c for c in contexts if c.get("name") == context), active)
        self.context = (active or {}).get("name")
        self.namespace = namespace or ((active or {}).get("context") or {}).get("namespace") or "default"
        self.client = client
        self.api = api
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.observed: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def info(self) -> dict[str, Any]:
        return {"mode": "cluster", "namespace": self.namespace, "context": self.context, "saves": None}

    # --- calls
    def _call(self, fn, *args, **kw):
        from kubernetes.client.exceptions import ApiException

        try:
            return fn(*args, **kw)
        except ApiException as err:
            message = err.reason or "error"
            field = None
            try:
                body = json.loads(err.body)
                message = body.get("message") or message
                causes = (body.get("details") or {}).get("causes") or []
                field = causes[0].get("field") if causes else None
            except (TypeError, ValueError, AttributeError):
                pass
            raise BoardError(int(err.status or 502), message, field) from None
        except OSError as err:
            raise BoardError(502, f"cannot reach the Kubernetes API: {err}") from None
        except Exception as err:  # urllib3's connection errors
            if type(err).__module__.startswith("urllib3"):
                raise BoardError(502, f"cannot reach the Kubernetes API: {err}") from None
            raise

    def _job(self, name: str) -> dict[str, Any]:
        obj = self._call(self.custom.get_namespaced_custom_object, API_GROUP, API_VERSION, self.namespace, PLURAL, name)
        self._observe(obj)
        return obj

    def _jobs(self) -> list[dict[str, Any]]:
        out = self._call(self.custom.list_namespaced_custom_object, API_GROUP, API_VERSION, self.namespace, PLURAL)
        items = sorted(out.get("items", []), key=lambda o: o["metadata"]["name"])
        for o in items:
            self._observe(o)
        return items

    # --- observed loss points
    def _observe(self, obj: dict[str, Any]) -> None:
        st = obj.get("status") or {}
        p = st.get("progress") or {}
        stage = (st.get("stage") or {}).get("name")
        if p.get("step") is None or p.get("loss") is None:
            return
        key = f"{obj['metadata']['name']}/{obj['metadata'].get('uid', '')}"
        point = {"stage": stage, "step": int(p["step"]), "loss": p["loss"]}
        if p.get("learningRate") is not None:
            point["learning_rate"] = p["learningRate"]
        if p.get("epoch") is not None:
            point["epoch"] = p["epoch"]
        with self._lock:
            self.observed.setdefault(key, {})[(stage or "", int(p["step"]))] = point

    def start(self) -> None:
        """Poll the namespace's jobs in the background, so the loss curve grows while the board runs."""
        if self._thread is not None or self.poll_seconds <= 0:
            return

        def loop():
            while not self._stop.wait(self.poll_seconds):
                try:
                    self._jobs()
                except Exception:  # noqa: BLE001 - the next read reports it
                    pass

        self._thread = threading.Thread(target=loop, name="kubetune-board-observer", daemon=True)
        self._thread.start()

    def stop_all(self) -> None:
        self._stop.set()

    # --- the API
    def list_runs(self) -> list[dict[str, Any]]:
        return [row(o["metadata"]["name"], o["metadata"].get("namespace"), o.get("status") or {},
                    o["metadata"].get("creationTimestamp")) for o in self._jobs()]

    def _events(self, name: str) -> list[dict[str, Any]]:
        ev = self._call(self.core.list_namespaced_event, self.namespace,
                        field_selector=f"involvedObject.name={name},involvedObject.kind=FineTuneJob")
        out = []
        for e in sorted(ev.items, key=lambda e: _ts(e.last_timestamp or e.event_time or e.first_timestamp
                                                     or e.metadata.creation_timestamp)):
            when = e.last_timestamp or e.event_time or e.first_timestamp or e.metadata.creation_timestamp
            out.append({"type": e.type, "reason": e.reason, "message": (e.message or "").strip(),
                        "time": when.strftime("%Y-%m-%dT%H:%M:%SZ") if hasattr(when, "strftime") else when,
                        "count": e.count or 1})
        return out

    def get_run(self, name: str) -> dict[str, Any]:
        import yaml

        obj = self._job(name)
        st = obj.get("status") or {}
        meta = obj["metadata"]
        shown = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
                 "metadata": {k: v for k, v in meta.items() if k in ("name", "namespace", "labels", "annotations")},
                 "spec": obj.get("spec")}
        stages = [{"name": s.get("name"), "type": s.get("type"), "phase": s.get("phase"),
                   "startTime": s.get("startTime"), "completionTime": s.get("completionTime"),
                   "output": s.get("output"), "checkpoint": s.get("checkpoint"),
                   **({"message": s["message"]} if s.get("message") else {})}
                  for s in st.get("stages") or []]
        return {
            "name": name, "namespace": meta.get("namespace"), "phase": st.get("phase") or "Pending",
            "spec": obj.get("spec") or {}, "yaml": yaml.safe_dump(shown, sort_keys=False), "status": st,
            "stages": stages, "conditions": st.get("conditions") or [], "events": self._events(name),
            "checkpoint": st.get("checkpoint"), "output": st.get("output"),
            "chatAvailable": self._chat_path(obj)[0] is not None,
        }

    def _pod_log(self, obj: dict[str, Any], tail: int | None) -> tuple[str | None, str]:
        name = obj["metadata"]["name"]
        st = obj.get("status") or {}
        stage = (st.get("stage") or {}).get("name")
        if stage is None:
            stages = (obj.get("spec") or {}).get("stages") or []
            stage = stages[0].get("name") if stages else None
        sel = f"{LABEL_JOB}={name}" + (f",{LABEL_STAGE}={stage}" if stage else "")
        pods = self._call(self.core.list_namespaced_pod, self.namespace, label_selector=sel).items
        pod = rank0_pod(pods)
        if pod is None:
            return None, ""
        containers = [c.name for c in pod.spec.containers]
        kw: dict[str, Any] = {"container": CONTAINER_NAME if CONTAINER_NAME in containers else containers[0]}
        if tail is not None and tail > 0:
            kw["tail_lines"] = tail
        try:
            resp = self._call(self.core.read_namespaced_pod_log, pod.metadata.name, self.namespace,
                              _preload_content=False, **kw)
        except BoardError as err:
            if err.status == 400:  # the container has not started yet
                return pod.metadata.name, ""
            raise
        try:
            return pod.metadata.name, resp.data.decode("utf-8", "replace")
        finally:
            resp.release_conn()

    def logs(self, name: str, tail: int = 200) -> dict[str, Any]:
        pod, text = self._pod_log(self._job(name), tail)
        return {"pod": pod, "text": text}

    def history(self, name: str) -> dict[str, Any]:
        obj = self._job(name)
        key = f"{name}/{obj['metadata'].get('uid', '')}"
        with self._lock:
            observed = dict(self.observed.get(key, {}))
        try:
            _, text = self._pod_log(obj, None)
        except BoardError:
            text = ""
        from_log = {(p["stage"], p["step"]): p for p in parse_progress_lines(text)}
        if from_log:
            for k, p in observed.items():  # the learning rate the status carried, where it was seen
                if k in from_log:
                    from_log[k] = {**p, **from_log[k]}
                else:
                    from_log[k] = p
            points, source = from_log, "pod-log"
        else:
            points, source = observed, "observed"
        return {"source": source, "points": sorted(points.values(), key=lambda p: (p.get("stage") or "", p["step"]))}

    def _patch_suspend(self, name: str, value: bool) -> None:
        self._call(self.custom.patch_namespaced_custom_object, API_GROUP, API_VERSION, self.namespace, PLURAL, name,
                   {"spec": {"suspend": value}})

    def suspend(self, name: str) -> None:
        self._patch_suspend(name, True)

    def resume(self, name: str) -> None:
        self._patch_suspend(name, False)

    def delete(self, name: str) -> None:
        self._call(self.custom.delete_namespaced_custom_object, API_GROUP, API_VERSION, self.namespace, PLURAL, name)
        with self._lock:
            for key in [k for k in self.observed if k.startswith(f"{name}/")]:
                del self.observed[key]

    def create(self, doc: dict[str, Any]) -> str:
        body = json.loads(json.dumps(doc))
        body.setdefault("apiVersion", f"{API_GROUP}/{API_VERSION}")
        body.setdefault("kind", "FineTuneJob")
        ns = (body.get("metadata") or {}).get("namespace")
        if ns and ns != self.namespace:
            raise BoardError(422, f"metadata.namespace is {ns!r} but the board works in namespace {self.namespace!r}",
                             "metadata.namespace")
        body["metadata"]["namespace"] = self.namespace
        out = self._call(self.custom.create_namespaced_custom_object, API_GROUP, API_VERSION, self.namespace, PLURAL, body)
        return out["metadata"]["name"]

    # --- chat
    def _chat_path(self, obj: dict[str, Any]) -> tuple[str | None, str]:
        from pathlib import Path

        st = obj.get("status") or {}
        uri = (st.get("output") or {}).get("uri")
        if not uri:
            done = [s for s in st.get("stages") or [] if (s.get("output") or {}).get("uri") and s.get("type") != "eval"]
            uri = done[-1]["output"]["uri"] if done else None
        if not uri:
            return None, "no stage has committed a model or adapter yet"
        if uri.startswith("s3://"):
            return None, (f"the output is in object storage ({uri}); the board chats only with a folder this "
                          "machine can read — download it (e.g. `aws s3 sync`) and run `kubetune chat --model <folder>`")
        local = Path(uri.removeprefix("file://")).expanduser()
        if not local.exists():
            return None, f"the output {uri} is a path on the cluster's storage, not readable from this machine"
        return str(local), ""

    def chat_source(self, name: str, quiet: bool = False) -> dict[str, Any] | None:
        obj = self._job(name)
        path, why = self._chat_path(obj)
        if path is None:
            if quiet:
                return None
            raise BoardError(409, f"cannot chat with FineTuneJob {name!r}: {why}")
        return {"path": path, "template": (obj.get("spec") or {}).get("template")}
