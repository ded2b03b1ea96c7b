"""Small helpers for tests against the control plane."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any, Callable


def wait_for(probe: Callable[[], Any], timeout: float = 60.0, what: str = "condition", interval: float = 0.2) -> Any:
    """Call ``probe`` until it returns something truthy (returned) or ``timeout`` passes.

    Exceptions from the probe count as "not yet"; the last one is reported on timeout.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = probe()
            if value:
                return value
            last = value
        except Exception as e:  # noqa: BLE001
            last = e
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def stop_process_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the process group `proc` leads (started with start_new_session=True), SIGKILL
    when it has not ended after `grace` seconds; returns once the leader is reaped."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
