"""`kubetune board` as a user starts it: a real uvicorn process on a free port. The default mode
(local without a usable kubeconfig, saying why), the refusal of a non-loopback --host without
--allow-remote (exit 2), the warning with it, and the Origin guard over real HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path) -> dict[str, str]:
    return {**os.environ, "KUBECONFIG": str(tmp_path / "no-kubeconfig"), "HOME": str(tmp_path)}


def _board(tmp_path, *args: str) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    log = open(tmp_path / "board.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "kubetune.runtime", "board", "--port", str(port),
                             "--saves", str(tmp_path / "saves"), *args], stdout=log, stderr=subprocess.STDOUT,
                            env=_env(tmp_path), cwd=tmp_path)
    return proc, port


def _get(url: str, **headers) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _post(url: str, body: dict, **headers) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _wait_up(proc: subprocess.Popen, url: str, log) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the board exited {proc.returncode}: {log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the board did not answer at {url}: {log.read_text()}")


@pytest.fixture
def stop():
    procs = []
    yield procs.append
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def test_a_non_loopback_host_without_allow_remote_exits_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "kubetune.runtime", "board", "--host", "0.0.0.0", "--port",
                           str(_free_port())], capture_output=True, text=True, env=_env(tmp_path), timeout=60)
    assert done.returncode == 2
    assert "--host 0.0.0.0" in done.stderr and "--allow-remote" in done.stderr


def test_local_mode_by_default_without_a_kubeconfig(tmp_path, stop):
    proc, port = _board(tmp_path)
    stop(proc)
    url = f"http://127.0.0.1:{port}"
    _wait_up(proc, url + "/api/info", tmp_path / "board.log")
    status, info = _get(url + "/api/info")
    assert status == 200 and info["mode"] == "local" and info["saves"] == str(tmp_path / "saves")
    said = (tmp_path / "board.log").read_text()
    assert "kubetune board: local mode (no usable kubeconfig" in said and f"http://127.0.0.1:{port}/" in said
    # a page of another site posting to the board: refused, nothing started
    status, body = _post(url + "/api/runs", {"job": {"metadata": {"name": "x"}}}, Origin="https://evil.example")
    assert status == 403 and "cross-origin" in body["error"]
    # a name re-pointed at 127.0.0.1 (DNS rebinding): refused
    status, body = _get(url + "/api/runs", Host=f"rebind.example:{port}")
    assert status == 403
    status, body = _post(url + "/api/validate", {"yaml": "kind: FineTuneJob"}, Origin=url)
    assert status == 200 and body["ok"] is False and body["errors"][0]["field"] == "metadata"


def test_allow_remote_warns_and_serves(tmp_path, stop):
    proc, port = _board(tmp_path, "--mode", "local", "--host", "0.0.0.0", "--allow-remote")
    stop(proc)
    url = f"http://127.0.0.1:{port}"
    _wait_up(proc, url + "/api/info", tmp_path / "board.log")
    assert _get(url + "/api/info")[1]["mode"] == "local"
    said = (tmp_path / "board.log").read_text()
    assert "WARNING: --allow-remote" in said and "Anyone who can reach this port acts" in said
    status, _ = _post(url + "/api/runs/x/suspend", {}, Origin="http://elsewhere.example")
    assert status == 403  # the Origin must still be the board's own


def test_cluster_mode_without_a_kubeconfig_is_a_clear_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "kubetune.runtime", "board", "--mode", "cluster", "--port",
                           str(_free_port())], capture_output=True, text=True, env=_env(tmp_path), timeout=60)
    assert done.returncode == 42, done.stderr
    assert "no usable kubeconfig" in done.stderr


def test_without_the_board_extra_it_says_which_extra_to_install(tmp_path):
    """A machine with only the `train` extra (the quickstart's): a clear message and the bad-input
    exit code, not a traceback. The package is hidden the way a missing one fails to import."""
    code = ("import sys\n"
            "class Hide:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'starlette':\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, Hide())\n"
            "from kubetune.runtime.cli import main\n"
            "sys.exit(main(['board', '--mode', 'local', '--port', '0']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(tmp_path),
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 42, r.stderr
    assert "kubetune board needs the `board` extra (pip install 'kubetune[board]')" in r.stderr
    assert "no module named 'starlette'" in r.stderr and "Traceback" not in r.stderr
