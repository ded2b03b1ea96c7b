"""A REAL Prometheus server process for the tests (Debian's `prometheus` package).

Started with a temp config and storage dir, listening on 127.0.0.1 on a free port; killed (its
process group) at `stop()`. Install: ``apt-get install -y --no-install-recommends prometheus``.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from cluster.util import stop_process_group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"`{name}` is not installed; the metrics tests need a real Prometheus: "
                           "apt-get install -y --no-install-recommends prometheus")
    return path


class Prometheus:
    def __init__(self, workdir: Path, targets: list[str], *, scrape_interval: str = "1s",
                 target_labels: dict[str, str] | None = None, job_name: str = "kubetune-runtime"):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        labels = json.dumps(target_labels or {})
        # honor_labels: the runtime's own `job` and `namespace` labels (the FineTuneJob) win
        # over the scrape job's name, as the chart's PodMonitor must configure it too.
        config = (
            "global:\n"
            f"  scrape_interval: {scrape_interval}\n"
            f"  scrape_timeout: {scrape_interval}\n"
            "scrape_configs:\n"
            f"  - job_name: {job_name}\n"
            "    honor_labels: true\n"
            "    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n"
            f"        labels: {labels}\n"
        )
        self.config_path = self.workdir / "prometheus.yml"
        self.config_path.write_text(config)
        self.log_path = self.workdir / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [find_binary("prometheus"), f"--config.file={self.config_path}",
             f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited ({self.proc.returncode}): "
                                   f"{self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready after {timeout}s: {self.log_path.read_text()[-2000:]}")

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            doc = json.load(r)
        if doc.get("status") != "success":
            raise AssertionError(f"prometheus {path} {params}: {doc}")
        return doc["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api("query", **params)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                        step=step)["result"]

    def raw_samples(self, selector: str, window: str = "1h") -> dict[float, float]:
        """The stored samples of ONE series, {timestamp: value} (a range-vector query)."""
        result = self.query(f"{selector}[{window}]")
        if len(result) != 1:
            raise AssertionError(f"{selector}: expected one series, got {len(result)}: {result}")
        return {float(t): float(v) for t, v in result[0]["values"]}

    def targets_up(self) -> list[dict]:
        return self.api("targets")["activeTargets"]

    def stop(self) -> None:
        stop_process_group(self.proc, 10)
        self._log.close()
