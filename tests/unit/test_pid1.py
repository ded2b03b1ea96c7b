"""The runtime is PID 1 of its container, which a process on a host never is. Two things differ
there, both shown here as PID 1 of a new PID namespace (needs root and unshare):

* the kernel ignores SIGTERM unless PID 1 handles it, and Kubernetes stops a pod (delete,
  suspend, preemption) with SIGTERM: the runtime must exit on it (local.exit_on_sigterm);
* the torchrun agent is PID 1, so its workers' parent pid is 1, which must not read as "the
  agent is gone" (launcher.die_with_agent; every multi-node pod failed on it in a container)."""

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


def test_torchrun_workers_of_an_agent_that_is_pid1_keep_running():
    child = ("import os; from kubetune.runtime import launcher; launcher.die_with_agent(); "
             "print('worker alive, parent', os.getppid(), flush=True)")
    agent = ("import os, subprocess, sys; from kubetune.runtime import launcher; "
             "os.environ[launcher.AGENT_PID_ENV] = str(os.getpid()); "
             f"r = subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True); "
             "print(r.returncode, r.stdout.strip(), flush=True)")
    r = subprocess.run(["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c", agent],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "0 worker alive, parent 1", r.stdout + r.stderr


def test_a_worker_whose_agent_is_gone_exits():
    code = ("import os; from kubetune.runtime import launcher; "
            "os.environ[launcher.AGENT_PID_ENV] = str(os.getppid() + 100000); launcher.die_with_agent(); print('alive')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "alive" not in r.stdout
