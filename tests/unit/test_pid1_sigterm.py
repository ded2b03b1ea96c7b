"""The runtime is PID 1 of its container, where the kernel ignores SIGTERM unless the process
handles it: Kubernetes' stop signal (pod delete, suspend, preemption) must still stop a stage at
once. Run here as PID 1 of a new PID namespace, as in a container (needs root and unshare)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                reason="a new PID namespace needs root and unshare")


def as_pid1(code: str) -> tuple[int, float, str]:
    """Run `code` as PID 1 of a new PID namespace, send it SIGTERM once it is ready; return its
    exit status, the seconds it took to exit, and its stderr."""
    p = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c", code],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        (child,) = open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()
        ns_pids = open(f"/proc/{child}/status").read().split("NSpid:")[1].split("\n")[0].split()
        assert ns_pids[-1] == "1", "the code runs as PID 1 of its namespace"
        t0 = time.monotonic()
        os.kill(int(child), signal.SIGTERM)
        rc = p.wait(30)
        return rc, time.monotonic() - t0, p.stderr.read()
    finally:
        p.kill()


def test_without_a_handler_pid1_ignores_sigterm():
    """The negative control: what a stage pod did before exit_on_sigterm."""
    rc, seconds, _ = as_pid1("import time; print('ready', flush=True); time.sleep(3)")
    assert rc == 0 and seconds >= 2.5


def test_the_runtime_exits_on_sigterm_as_pid1():
    rc, seconds, err = as_pid1("import time; from kubetune.runtime.local import exit_on_sigterm; "
                               "exit_on_sigterm(); print('ready', flush=True); time.sleep(30)")
    assert rc == 128 + signal.SIGTERM and seconds < 5
    assert "stage stopped by SIGTERM" in err
