"""Test support: a REAL S3 server (moto's standalone server as a subprocess) and test data."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

HOST = "127.0.0.1"
TEST_KEY_ID = "AKIAKUBETUNETESTKEY1"
TEST_SECRET = "kubetune-test-secret-do-not-print"


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class MotoServer:
    """moto's standalone server (moto_s3_server.py: `python -m moto.server` with signed query
    strings checked as sent) as a subprocess on a free port of `host`.

    `auth=True`: the server checks every request's signature against an IAM user's access key
    (created here; `key_id` and `secret`), so a wrong or missing key is refused as by real S3.
    Otherwise any key is accepted and `key_id`/`secret` are the test constants."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None, host: str = HOST, auth: bool = False):
        self.host = host
        self.port = free_port(host)
        self.endpoint = f"http://{host}:{self.port}"
        self.key_id, self.secret = TEST_KEY_ID, TEST_SECRET
        self._log = open(log_dir / f"moto-{self.port}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("moto_s3_server.py")), "-H", host, "-p", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **(env or {})})
        self._wait_ready()
        if auth:
            self._enable_auth()

    def _enable_auth(self) -> None:
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id=TEST_KEY_ID, aws_secret_access_key=TEST_SECRET)
        iam.create_user(UserName="kubetune-test")
        iam.put_user_policy(UserName="kubetune-test", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="kubetune-test")["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        self.moto_api("reset-auth", b"0")  # from now on every request is authenticated

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("moto server did not answer in time")

    def pause(self) -> None:
        """Simulate an outage without losing the in-memory state (SIGSTOP)."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def moto_api(self, path: str, data: bytes) -> None:
        req = urllib.request.Request(f"{self.endpoint}/moto-api/{path}", data=data,
                                     method="POST", headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()
        assert self.proc.poll() is not None


@functools.lru_cache(maxsize=None)
def boto_client(endpoint: str, key_id: str = TEST_KEY_ID, secret: str = TEST_SECRET):
    """A plain boto3 client for setting up test data (cached: clients are slow to create)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=key_id, aws_secret_access_key=secret,
                        config=Config(s3={"addressing_style": "path"}))


def make_bucket(endpoint: str, key_id: str = TEST_KEY_ID, secret: str = TEST_SECRET) -> str:
    """Create a fresh bucket with a unique name; return the name."""
    name = f"kt-{uuid.uuid4().hex[:12]}"
    boto_client(endpoint, key_id, secret).create_bucket(Bucket=name)
    return name


def make_checkpoint(root: Path, step: int, *, big: int = 0) -> Path:
    """A folder shaped like a Trainer checkpoint, with step-dependent content."""
    d = root / f"local-checkpoint-{step}"
    (d / "sub").mkdir(parents=True, exist_ok=True)
    (d / "adapter_model.safetensors").write_bytes(os.urandom(2048 + big))
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (d / "sub" / "rng_state.pth").write_bytes(os.urandom(100))
    return d


def tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file()}
