"""kube.fetch_progress / poll_progress against real local HTTP servers that misbehave the way a
tenant's pod can: drip a byte a second, never end the body, send 10 MB, nest JSON 100k deep.
Each costs at most the deadline (+ slack) and ends in None with a log line, never an exception."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest

from kubetune.operator import kube
from kubetune.runtime.api.progress import ProgressReport

DEADLINE = 1.0
SLACK = 0.5
GOOD = {"stage": "sft", "step": 3, "totalSteps": 6, "keyOfANewerRuntime": 1}  # unknown keys: ignored
REPORT = ProgressReport(stage="sft", step=3, total_steps=6)


class Server:
    """A TCP server on 127.0.0.1 whose every connection runs `behave(conn)` in a thread."""

    def __init__(self, behave):
        self.behave = behave
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        try:
            conn.recv(4096)
            self.behave(conn, self.stop)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.stop.set()
        self.sock.close()


def ok(body: bytes, extra: bytes = b""):
    def behave(conn, stop):
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n" + extra + b"\r\n" + body)
    return behave


def drip(conn, stop):
    conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
    while not stop.is_set():
        conn.sendall(b" ")
        time.sleep(1)


def drip_headers(conn, stop):
    for ch in b"HTTP/1.0 200 OK\r\nX-Slow: " + b"a" * 100:
        if stop.is_set():
            return
        conn.sendall(bytes([ch]))
        time.sleep(0.2)


def endless(conn, stop):
    conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n[")
    while not stop.is_set():
        conn.sendall(b"1," * 4096)


def silent(conn, stop):
    stop.wait(30)


BEHAVIOURS = {
    "drip one byte a second": drip,
    "drip the headers": drip_headers,
    "endless body": endless,
    "10 MB body": ok(b'{"a": "' + b"x" * 10_000_000 + b'"}'),
    "10 MB announced": ok(b"{}", extra=b"Content-Length: 10000000\r\n"),
    "100k nested arrays": ok(b"[" * 100_000 + b"]" * 100_000),
    # nested under the size limit: the depth check (json's recursive parser would meet these)
    "32k nested arrays in 64 KB": ok(b"[" * 32_000 + b"]" * 32_000),
    "10k nested objects in 60 KB": ok(b'{"a":' * 10_000 + b"1" + b"}" * 10_000),
    "17 levels": ok(b'{"a":' + b"[" * 16 + b"]" * 16 + b"}"),
    "not JSON": ok(b"<html>hello</html>"),
    "a JSON list": ok(b"[1, 2, 3]"),
    "an error status": lambda conn, stop: conn.sendall(b"HTTP/1.0 500 Oops\r\n\r\n{}"),
    "never answers": silent,
    "cut short": ok(b'{"step": 1', extra=b"Content-Length: 500\r\n"),
    "not a progress report": ok(b'{"step": "three", "phase": "done"}'),
}


@pytest.fixture
def serve():
    servers = []

    def start(behave):
        servers.append(Server(behave))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def running_pod(ip: str = "127.0.0.1") -> dict:
    return {"metadata": {"name": "llama-sft-0-abcde", "creationTimestamp": "2025-06-01T12:00:00Z"},
            "status": {"phase": "Running", "podIP": ip}}


@pytest.mark.parametrize("what", list(BEHAVIOURS))
def test_a_misbehaving_progress_server_costs_at_most_the_deadline(serve, what, caplog):
    srv = serve(BEHAVIOURS[what])
    t0 = time.monotonic()
    with pytest.raises(kube.ProgressError):
        kube.fetch_progress("127.0.0.1", srv.port, DEADLINE)
    assert time.monotonic() - t0 <= DEADLINE + SLACK, what
    # poll_progress (what the operator calls): None and a log line, no exception
    caplog.set_level(logging.INFO, logger="kubetune.operator")
    t0 = time.monotonic()
    assert kube.poll_progress([running_pod()], srv.port, DEADLINE) is None
    assert time.monotonic() - t0 <= DEADLINE + SLACK, what
    assert "progress of pod llama-sft-0-abcde not used" in caplog.text


def test_a_good_report_is_read_with_or_without_content_length(serve):
    body = json.dumps(GOOD).encode()
    for extra in (b"", b"Content-Length: %d\r\n" % len(body)):
        srv = serve(ok(body, extra))
        assert kube.poll_progress([running_pod()], srv.port, DEADLINE) == REPORT


def test_a_keep_alive_server_is_read_up_to_its_content_length(serve):
    body = json.dumps(GOOD).encode()

    def keep_alive(conn, stop):  # answers and keeps the connection open
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        stop.wait(30)

    srv = serve(keep_alive)
    t0 = time.monotonic()
    assert kube.fetch_progress("127.0.0.1", srv.port, DEADLINE) == REPORT
    assert time.monotonic() - t0 < DEADLINE / 2


def test_the_runtime_progress_server_is_read():
    """The runtime's own /progress endpoint (runtime/metrics.py MetricsServer, wsgiref) passes
    the new client; its stage callback is a stand-in with the one method the server calls."""
    from types import SimpleNamespace

    from kubetune.runtime.metrics import MetricsServer

    stage = SimpleNamespace(progress=SimpleNamespace(snapshot=lambda: GOOD))
    with MetricsServer(0, "127.0.0.1", stage) as server:
        assert kube.fetch_progress("127.0.0.1", server.port, DEADLINE) == REPORT


def test_no_pod_ip_or_a_closed_port_is_none_without_waiting():
    assert kube.poll_progress([], 1, DEADLINE) is None
    port = _free_port()
    t0 = time.monotonic()
    assert kube.poll_progress([running_pod()], port, DEADLINE) is None
    assert time.monotonic() - t0 < DEADLINE


def test_nesting_depth_ignores_brackets_in_strings():
    assert kube._nesting(b'{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\"[[["}', 16) == 1
    assert kube._nesting(b'{"a": {"b": [1, {"c": 2}]}}', 16) == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_starting_runtime_is_a_miss_without_cost(serve, caplog):
    """The runtime's server before its stage starts (503, the model still downloading) and a port
    nobody listens on yet are "still starting" misses, logged at debug level only; a server that
    uses up the deadline is a failure (the poller backs off from those alone)."""
    from kubetune.runtime.metrics import MetricsServer

    with MetricsServer(0, "127.0.0.1") as server, caplog.at_level(logging.DEBUG, logger="kubetune.operator"):
        with pytest.raises(kube.ProgressNotReady):
            kube.fetch_progress("127.0.0.1", server.port, DEADLINE)
        assert kube.probe_progress([running_pod()], server.port, DEADLINE) == (None, True)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert kube.probe_progress([running_pod()], _free_port(), DEADLINE) == (None, True)
    assert kube.probe_progress([running_pod()], serve(drip).port, DEADLINE) == (None, False)
