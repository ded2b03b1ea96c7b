"""Fixtures for the storage tests: a REAL S3 server process (moto's standalone server).

`moto_server` is one server for the whole session; tests that pause a server (SIGSTOP) or turn
authentication on get their own with `pausable_moto_server` / `start_moto_server`. Every server
is killed at the end of its scope, leaving no process behind.
"""

from __future__ import annotations

import os

import pytest

from .support import TEST_KEY_ID, TEST_SECRET, MotoServer, make_bucket


@pytest.fixture(autouse=True)
def _aws_env(monkeypatch):
    """Test credentials in the standard env vars; nothing from the host leaks in."""
    for var in list(os.environ):
        if var.startswith("AWS_") or var in ("KUBETUNE_S3_CREDENTIALS_DIR", "KUBETUNE_CACHE_DIR"):
            monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def start_moto_server(tmp_path_factory):
    """Factory for private servers (e.g. with auth on); all stopped at the module's end."""
    servers = []

    def start(env: dict[str, str] | None = None) -> MotoServer:
        s = MotoServer(tmp_path_factory.mktemp("moto"), env)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def pausable_moto_server(tmp_path_factory):
    """A server of the test module's own, so SIGSTOPping it never stalls other tests.
    Tests that pause it must resume it before they end (in a `finally`)."""
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture
def bucket(moto_server) -> str:
    """A fresh, empty bucket on the session server."""
    return make_bucket(moto_server.endpoint)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    """The same contract, both backends: a local folder, and a bucket/prefix on moto."""
    from kubetune.runtime.storage import open_storage

    if request.param == "local":
        return open_storage(tmp_path / "store")
    server = request.getfixturevalue("moto_server")
    name = make_bucket(server.endpoint)
    return open_storage(f"s3://{name}/jobs/job-1", endpoint=server.endpoint,
                        max_attempts=2, connect_timeout=2, read_timeout=10)
