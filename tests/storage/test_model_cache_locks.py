"""Two pods that share the cluster model cache never fetch the same files at once.

Both caches on the claim lock each download in the cache itself, so the second process waits and
then finds the files:

* the Hugging Face hub cache (HF_HUB_CACHE): huggingface_hub takes one file lock per blob
  (`<cache>/.locks/<repo>/<etag>.lock`) around each download and looks again once it holds it;
  tested here with two processes calling `hf_hub_download` — what transformers' `from_pretrained`
  calls for each file — against a stand-in for the hub: a local HTTP server answering the hub's
  HEAD and GET of `/<repo>/resolve/<revision>/<file>` slowly and counting the GETs (no network);
* the kubetune cache of s3:// models (KUBETUNE_CACHE_DIR): `fetch_to_cache` holds one lock per
  URI; tested with two processes fetching one model folder from the real S3 server (moto),
  counting the objects each downloads.

Each test also runs with the lock taken away, and then sees both processes download: the
downloads really overlap, so the single download is the lock's doing.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.storage.support import boto_client

REPO_ID = "org/tiny"
COMMIT = "a" * 40
FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": os.urandom(64 * 1024)}
SLOW = 1.0  # seconds each GET takes: long enough that two unlocked downloads overlap


class StandInHub(http.server.ThreadingHTTPServer):
    """The hub's file endpoints: HEAD gives the commit, ETag and size, GET the bytes (slowly)."""

    daemon_threads = True

    def __init__(self):
        self.gets: Counter[str] = Counter()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _HubHandler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _file(self) -> tuple[str, bytes] | None:
        prefix = f"/{REPO_ID}/resolve/"
        if not self.path.startswith(prefix):
            return None
        revision, _, name = self.path[len(prefix):].partition("/")
        return (name, FILES[name]) if revision in ("main", COMMIT) and name in FILES else None

    def _headers(self, name: str, data: bytes) -> None:
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()

    def _not_found(self):
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self):
        found = self._file()
        if found is None:
            return self._not_found()
        self.send_response(200)
        self._headers(*found)

    def do_GET(self):
        found = self._file()
        if found is None:
            return self._not_found()
        with self.server.lock:
            self.server.gets[found[0]] += 1
        time.sleep(SLOW)
        self.send_response(200)
        self._headers(*found)
        self.wfile.write(found[1])


@pytest.fixture
def hub():
    server = StandInHub()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _run_together(script: str, env: dict[str, str], tmp_path: Path, n: int = 2) -> list[dict]:
    """`n` processes of `script`, released together once all have imported what they need."""
    go = tmp_path / "go"
    procs = []
    for i in range(n):
        procs.append(subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script)], env={**os.environ, **env, "GO_FILE": str(go)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    time.sleep(3)  # imports done (each child waits for the go file before it fetches)
    go.touch()
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


HUB_CHILD = """
    import json, os, time, contextlib
    from pathlib import Path
    import huggingface_hub.file_download as fd
    if os.environ["UNLOCKED"] == "1":
        fd.WeakFileLock = lambda *a, **k: contextlib.nullcontext()
    while not Path(os.environ["GO_FILE"]).exists():
        time.sleep(0.01)
    paths = {name: fd.hf_hub_download("org/tiny", name) for name in ("config.json", "model.safetensors")}
    print(json.dumps({n: Path(p).read_bytes().hex() for n, p in paths.items()}))
"""


@pytest.mark.parametrize("unlocked", [False, True], ids=["hub-locks", "no-locks"])
def test_two_processes_download_each_hub_file_once(hub, tmp_path, unlocked):
    cache = tmp_path / "claim" / "hub"
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_ETAG_TIMEOUT": "30", "HF_HUB_DOWNLOAD_TIMEOUT": "30", "UNLOCKED": "1" if unlocked else "0"}
    env.pop("HF_TOKEN", None)
    results = _run_together(HUB_CHILD, env, tmp_path)
    for r in results:
        assert r == {n: d.hex() for n, d in FILES.items()}  # both got the files, whole
    if unlocked:  # the control: without the locks both processes download every file
        assert hub.gets == {name: 2 for name in FILES}
    else:
        assert hub.gets == {name: 1 for name in FILES}
        assert (cache / ".locks" / "models--org--tiny").is_dir()


S3_CHILD = """
    import json, os, time, contextlib
    from pathlib import Path
    from kubetune.runtime.storage import cache, s3
    got = []
    original = s3.S3Storage.get_file
    def counted(self, key, dest, *a, **k):
        got.append(key)
        time.sleep(0.5)
        return original(self, key, dest, *a, **k)
    s3.S3Storage.get_file = counted
    if os.environ["UNLOCKED"] == "1":
        cache._lock = lambda *a, **k: contextlib.nullcontext()
    while not Path(os.environ["GO_FILE"]).exists():
        time.sleep(0.01)
    folder = cache.fetch_to_cache(os.environ["MODEL_URI"], endpoint=os.environ["S3_ENDPOINT"])
    print(json.dumps({"got": got, "files": sorted(p.name for p in folder.iterdir())}))
"""


@pytest.mark.parametrize("unlocked", [False, True], ids=["uri-lock", "no-lock"])
def test_two_processes_download_an_s3_model_once(moto_server, bucket, tmp_path, unlocked):
    client = boto_client(moto_server.endpoint)
    for name, data in FILES.items():
        client.put_object(Bucket=bucket, Key=f"models/tiny/{name}", Body=data)
    env = {"MODEL_URI": f"s3://{bucket}/models/tiny", "S3_ENDPOINT": moto_server.endpoint,
           "KUBETUNE_CACHE_DIR": str(tmp_path / "claim" / "kubetune"), "UNLOCKED": "1" if unlocked else "0"}
    results = _run_together(S3_CHILD, env, tmp_path)
    assert all(r["files"] == sorted(FILES) for r in results)
    downloads = Counter(key for r in results for key in r["got"])
    if unlocked:
        assert downloads == {f"models/tiny/{n}": 2 for n in FILES}
    else:
        assert downloads == {f"models/tiny/{n}": 1 for n in FILES}
