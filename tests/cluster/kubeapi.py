"""A small, dependency-free Kubernetes REST client (stdlib http.client + ssl).

Enough for the process kubelet and for tests: JSON requests with client-certificate or bearer
authentication read from a kubeconfig, typed errors, and streaming watches.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import tempfile
import threading
import urllib.parse
from typing import Any, Iterator

import yaml


class ApiError(Exception):
    def __init__(self, status: int, body: Any, method: str = "", path: str = ""):
        self.status = status
        self.body = body
        msg = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{method} {path}: {status} {msg}")

    @property
    def reason(self) -> str:
        return self.body.get("reason", "") if isinstance(self.body, dict) else ""


def _materialize(data_b64: str | None, path: str | None, tmpdir: str, name: str) -> str | None:
    if path:
        return path
    if data_b64:
        p = os.path.join(tmpdir, name)
        with open(p, "wb") as f:
            f.write(base64.b64decode(data_b64))
        return p
    return None


class KubeClient:
    """JSON over HTTPS to one apiserver; one connection per thread."""

    def __init__(self, server: str, ca_file: str | None = None, cert_file: str | None = None,
                 key_file: str | None = None, token: str | None = None, timeout: float = 30.0):
        u = urllib.parse.urlparse(server)
        self.server = server.rstrip("/")
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 443
        self.token = token
        self.timeout = timeout
        ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl._create_unverified_context()
        if cert_file and key_file:
            ctx.load_cert_chain(cert_file, key_file)
        self.ssl_context = ctx
        self._local = threading.local()

    @classmethod
    def from_kubeconfig(cls, path: str, **kw: Any) -> "KubeClient":
        with open(path) as f:
            cfg = yaml.safe_load(f)
        ctx_name = cfg.get("current-context")
        ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in cfg["users"] if u["name"] == ctx["user"])
        tmp = tempfile.mkdtemp(prefix="kubeapi-")
        ca = _materialize(cluster.get("certificate-authority-data"), cluster.get("certificate-authority"), tmp, "ca.crt")
        cert = _materialize(user.get("client-certificate-data"), user.get("client-certificate"), tmp, "client.crt")
        key = _materialize(user.get("client-key-data"), user.get("client-key"), tmp, "client.key")
        return cls(cluster["server"], ca, cert, key, user.get("token"), **kw)

    # -- plumbing ---------------------------------------------------------------------------
    def _conn(self, timeout: float | None) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self.ssl_context, timeout=timeout)

    def _headers(self, content_type: str | None) -> dict[str, str]:
        h = {"Accept": "application/json", "User-Agent": "kubetune-test/process-kubelet"}
        if content_type:
            h["Content-Type"] = content_type
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    @staticmethod
    def _url(path: str, params: dict[str, Any] | None) -> str:
        if params:
            q = {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in params.items() if v is not None}
            return path + "?" + urllib.parse.urlencode(q)
        return path

    def request(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None,
                content_type: str = "application/json") -> Any:
        url = self._url(path, params)
        data = None if body is None else (body if isinstance(body, (bytes, str)) else json.dumps(body))
        for attempt in range(2):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = self._conn(self.timeout)
            try:
                conn.request(method, url, body=data, headers=self._headers(content_type if data is not None else None))
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (http.client.HTTPException, OSError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = raw.decode(errors="replace")
        if resp.status >= 400:
            raise ApiError(resp.status, payload, method, path)
        return payload

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params or None)

    def post(self, path: str, body: Any, **params: Any) -> Any:
        return self.request("POST", path, body, params or None)

    def put(self, path: str, body: Any, **params: Any) -> Any:
        return self.request("PUT", path, body, params or None)

    def patch(self, path: str, body: Any, kind: str = "merge", **params: Any) -> Any:
        ct = {"merge": "application/merge-patch+json", "strategic": "application/strategic-merge-patch+json",
              "json": "application/json-patch+json"}[kind]
        return self.request("PATCH", path, body, params or None, content_type=ct)

    def delete(self, path: str, body: Any = None, **params: Any) -> Any:
        return self.request("DELETE", path, body, params or None)

    def watch(self, path: str, stop: threading.Event | None = None, **params: Any) -> Iterator[dict]:
        """Yield watch events ({type, object}) until the server closes the stream."""
        params = dict(params, watch=True)
        conn = self._conn(timeout=max(60.0, float(params.get("timeoutSeconds", 0) or 0) + 30))
        try:
            conn.request("GET", self._url(path, params), headers=self._headers(None))
            resp = conn.getresponse()
            if resp.status >= 400:
                raw = resp.read()
                try:
                    payload = json.loads(raw)
                except ValueError:
                    payload = raw.decode(errors="replace")
                raise ApiError(resp.status, payload, "WATCH", path)
            while not (stop and stop.is_set()):
                line = resp.readline()
                if not line:
                    return
                line = line.strip()
                if line:
                    yield json.loads(line)
        finally:
            conn.close()
