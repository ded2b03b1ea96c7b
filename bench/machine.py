"""What the benchmark scripts record about the machine they ran on."""

from __future__ import annotations

import os


def cpu_description() -> str:
    """`<model name>, <N> cores` from /proc/cpuinfo (`cpu` where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = "cpu"
    return f"{name}, {os.cpu_count()} cores"
