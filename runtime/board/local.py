"""The board's local mode: runs are what `kubetune run` writes under the saves folder.

A run the board starts lives in `<saves>/<name>/`: its stage folders (`<stage>/output/`,
`<stage>/checkpoints/`, `<stage>/.work/trainer/trainer_log.jsonl` while it trains — the layout of
runtime/local.py and outputs.py) and the board's own `.board/` folder: the job file, the process's
log (`run.log`) and `state.json` (pid, when it started, whether it was suspended, its exit code).
Starting one runs `python -m kubetune.runtime run .board/job.yaml --output-root <saves>/<name>
--metrics-port 0 --no-progress` in a session of its own (it outlives the board); the runtime
prints where its `/progress` is served, and the board reads it from there. Suspend is SIGTERM
(runtime/local.py `graceful_stop`: the trainer finishes its step, commits a checkpoint and exits
143); resume starts the same command again, which resumes from that checkpoint. Folders that
`kubetune run` made without the board appear too, read from their stage folders alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from ..kubectl_plugin import duration
from .common import DONE, BoardError, rfc3339, row

BOARD_DIR = ".board"
METRICS_LINE = re.compile(r"kubetune: metrics at (http://\S+)/metrics")
STAGE_LINE = re.compile(r"kubetune: stage (\d+)/(\d+) (\S+) \(")
ERROR_LINE = re.compile(r"^error: (.*)$", re.M)
NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    return out


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalRun:
    """One folder under the saves folder."""

    def __init__(self, root: Path):
        self.root = root
        self.name = root.name
        self.board = root / BOARD_DIR

    # --- what is on disk
    @property
    def job_file(self) -> Path:
        return self.board / "job.yaml"

    @property
    def log_file(self) -> Path:
        return self.board / "run.log"

    def state(self) -> dict[str, Any]:
        return _read_json(self.board / "state.json") or {}

    def write_state(self, drop: tuple[str, ...] = (), **changes: Any) -> dict[str, Any]:
        st = {k: v for k, v in {**self.state(), **changes}.items() if k not in drop}
        self.board.mkdir(parents=True, exist_ok=True)
        tmp = self.board / "state.json.tmp"
        tmp.write_text(json.dumps(st, indent=2))
        tmp.replace(self.board / "state.json")
        return st

    def doc(self) -> dict[str, Any] | None:
        try:
            return yaml.safe_load(self.job_file.read_text())
        except (OSError, yaml.YAMLError):
            return None

    def storage_root(self) -> Path:
        """spec.storage.uri when it is a local folder, else this folder (where `--output-root` points)."""
        doc = self.doc() or {}
        uri = ((doc.get("spec") or {}).get("storage") or {}).get("uri")
        if uri and not uri.startswith("s3://"):
            return Path(uri.removeprefix("file://")).expanduser()
        return self.root

    def stage_names(self) -> list[tuple[str, str]]:
        """(name, type) of every stage: from the job file, else the stage folders found."""
        doc = self.doc()
        if doc:
            return [(s.get("name"), s.get("type")) for s in (doc.get("spec") or {}).get("stages") or []]
        found = []
        for d in sorted(self.root.iterdir(), key=lambda p: p.stat().st_mtime):
            if d.is_dir() and d.name != BOARD_DIR and any((d / x).exists() for x in ("output", "checkpoints", ".work")):
                summary = _read_json(d / "output" / "run.json") or {}
                found.append((d.name, summary.get("type") or summary.get("stage_type")))
        return found

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def is_run(self) -> bool:
        return self.job_file.exists() or bool(self.stage_names())

    # --- per stage
    def stage_record(self, name: str, type_: str | None) -> dict[str, Any]:
        folder = self.storage_root() / name
        marker = _read_json(folder / "output" / "COMMITTED.json")
        latest = None
        try:
            latest = (folder / "checkpoints" / "LATEST").read_text().strip()
        except OSError:
            pass
        ck = None
        if latest:
            ck_marker = _read_json(folder / "checkpoints" / latest / "COMMITTED.json") or {}
            ck = {"uri": str(folder / "checkpoints" / latest), "step": ck_marker.get("step")}
        log = folder / ".work" / "trainer" / "trainer_log.jsonl"
        started = None
        for p in (log, folder / ".work"):
            if p.exists():
                started = rfc3339(p.stat().st_mtime if p == folder / ".work" else p.stat().st_ctime)
                break
        return {
            "name": name, "type": type_, "phase": "Succeeded" if marker else ("Pending" if not ck and not log.exists() else "Running"),
            "startTime": started, "completionTime": marker.get("committedAt") if marker else None,
            "output": {"uri": str(folder / "output")} if marker else None, "checkpoint": ck,
        }

    def trainer_log(self, stage: str) -> list[dict[str, Any]]:
        folder = self.storage_root() / stage
        live = folder / ".work" / "trainer" / "trainer_log.jsonl"
        done = folder / "output" / "trainer_log.jsonl"
        if (folder / "output" / "COMMITTED.json").exists() and done.exists():
            return _read_jsonl(done)
        return _read_jsonl(live) or _read_jsonl(done)


class LocalBackend:
    mode = "local"

    def __init__(self, saves: str | Path, python: str | None = None, cwd: str | Path | None = None):
        self.saves = Path(saves).expanduser().resolve()
        self.python = python or sys.executable
        self.cwd = Path(cwd or os.getcwd()).resolve()
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        return {"mode": "local", "namespace": None, "context": None, "saves": str(self.saves)}

    # --- finding runs
    def _run(self, name: str) -> LocalRun:
        if not NAME.match(name or ""):
            raise BoardError(404, f"no run named {name!r} in {self.saves}")
        run = LocalRun(self.saves / name)
        if not run.root.is_dir() or not run.is_run():
            raise BoardError(404, f"no run named {name!r} in {self.saves}")
        return run

    def runs(self) -> list[LocalRun]:
        if not self.saves.is_dir():
            return []
        return [LocalRun(d) for d in sorted(self.saves.iterdir()) if d.is_dir() and NAME.match(d.name)
                and LocalRun(d).is_run()]

    # --- process state
    def _reap(self, run: LocalRun) -> None:
        """Record the exit code of a process this board started once it has ended."""
        with self._lock:
            proc = self._procs.get(run.name)
            if proc is not None and proc.poll() is not None:
                self._procs.pop(run.name, None)
                if run.state().get("pid") == proc.pid:
                    run.write_state(exitCode=proc.returncode, finished=time.time())

    def _running(self, run: LocalRun) -> bool:
        """A process this board started: whether it has exited (waitpid, which also records its exit
        code); one an earlier board started: whether its pid is still there."""
        with self._lock:
            proc = self._procs.get(run.name)
        if proc is not None:
            if proc.poll() is None:
                return True
            self._reap(run)
            return False
        st = run.state()
        return "exitCode" not in st and _alive(st.get("pid"))

    def _progress(self, run: LocalRun, log: str) -> dict[str, Any] | None:
        m = list(METRICS_LINE.finditer(log))
        if not m:
            return None
        try:
            with urllib.request.urlopen(m[-1].group(1) + "/progress", timeout=1.0) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError):
            return None

    def status(self, run: LocalRun) -> dict[str, Any]:
        """A FineTuneJob-shaped status of a local run (what the operator would write)."""
        st = run.state()
        running = self._running(run)
        st = run.state()
        log = run.log_text()
        stages = [run.stage_record(n, t) for n, t in run.stage_names()]
        count = len(stages)
        current = None
        m = list(STAGE_LINE.finditer(log))
        if m and running:
            current = next((i for i, s in enumerate(stages) if s["name"] == m[-1].group(3)), None)
        if current is None:
            current = next((i for i, s in enumerate(stages) if s["phase"] != "Succeeded"), count - 1 if count else None)
        all_done = bool(stages) and all(s["phase"] == "Succeeded" for s in stages)
        message = ""
        if running:
            phase = "Running"
        elif all_done:  # (also when a suspend came after the last commit)
            phase = "Succeeded"
        elif st.get("suspended"):
            phase = "Suspended"
        elif "exitCode" in st:
            phase = "Succeeded" if st["exitCode"] == 0 else "Failed"
            errors = ERROR_LINE.findall(log)
            message = errors[-1] if errors else f"exited with code {st['exitCode']}"
        elif st.get("pid"):
            phase = "Failed"  # it ended while no board watched it, before its last output
            message = "the process ended before every stage committed its output (see the log)"
        else:
            recent = any((run.storage_root() / s["name"] / ".work" / "trainer" / "trainer_log.jsonl").exists()
                         and time.time() - (run.storage_root() / s["name"] / ".work" / "trainer"
                                            / "trainer_log.jsonl").stat().st_mtime < 120
                         for s in stages if s["phase"] != "Succeeded")
            phase = "Running" if recent else "Pending"
            if not recent and not all_done:
                message = ("made by `kubetune run` outside the board and not running now: run its job file again "
                           "to resume it from its last checkpoint")
        for i, s in enumerate(stages):
            if s["phase"] == "Running" and (i != current or phase != "Running"):
                s["phase"] = {"Failed": "Failed", "Suspended": "Suspended"}.get(phase, "Pending") if i == current else "Pending"
            if i == current and phase == "Running" and s["phase"] == "Pending":
                s["phase"] = "Running"
            if i == current and phase == "Failed" and s["phase"] != "Succeeded":
                s["phase"], s["message"] = "Failed", message
        progress: dict[str, Any] = {}
        doc = self._progress(run, log) if running else None
        if doc and current is not None and doc.get("stage") == stages[current]["name"]:
            progress = {k: doc.get(k) for k in ("step", "totalSteps", "epoch", "loss", "learningRate",
                                                 "tokensPerSecond", "etaSeconds")}
            progress["source"] = "progress-endpoint"
        elif current is not None:
            recs = run.trainer_log(stages[current]["name"])
            last = next((r for r in reversed(recs) if "current_steps" in r), None)
            loss = next((r["loss"] for r in reversed(recs) if "loss" in r), None)
            if last:
                progress = {"step": last.get("current_steps"), "totalSteps": last.get("total_steps"),
                            "epoch": last.get("epoch"), "loss": loss, "learningRate": last.get("lr"),
                            "etaSeconds": _seconds(last.get("remaining_time")), "source": "trainer_log"}
        if progress.get("step") is not None and progress.get("totalSteps"):
            progress["percent"] = round(100.0 * progress["step"] / progress["totalSteps"], 1)
        if phase == "Succeeded" and stages:
            progress = {**progress, "percent": 100.0} if progress else progress
        created = st.get("created") or (run.root.stat().st_ctime if run.root.exists() else None)
        out = next((s["output"] for s in reversed(stages) if s["output"] and s["type"] != "eval"), None)
        conditions = [{"type": phase, "status": "True", "reason": phase, "message": message,
                       "lastTransitionTime": rfc3339(st.get("finished") or st.get("started") or created)}]
        return {
            "phase": phase,
            "stage": {"name": stages[current]["name"], "index": current, "count": count} if current is not None else None,
            "stages": stages, "progress": progress or None,
            "checkpoint": stages[current]["checkpoint"] if current is not None else None,
            "output": out if phase == "Succeeded" else None,
            "eta": duration(progress.get("etaSeconds")) if progress.get("etaSeconds") is not None else None,
            "startTime": rfc3339(st.get("started")), "completionTime": rfc3339(st.get("finished")),
            "conditions": conditions, "created": rfc3339(created), "pid": st.get("pid"),
            "exitCode": st.get("exitCode"),
        }

    # --- the API
    def list_runs(self) -> list[dict[str, Any]]:
        out = []
        for run in self.runs():
            st = self.status(run)
            out.append(row(run.name, None, st, st["created"]))
        return out

    def get_run(self, name: str) -> dict[str, Any]:
        run = self._run(name)
        st = self.status(run)
        doc = run.doc()
        events = []
        state = run.state()
        for key, reason, text in (("started", "Started", "kubetune run started (pid {pid})"),
                                  ("suspendedAt", "Suspended", "SIGTERM sent: checkpoint, then stop"),
                                  ("resumedAt", "Resumed", "started again; resumes from the last checkpoint"),
                                  ("finished", "Exited", "the process exited with code {exitCode}")):
            if state.get(key):
                events.append({"type": "Warning" if reason == "Exited" and state.get("exitCode") not in (0, None)
                               else "Normal", "reason": reason, "message": text.format(**{"pid": None, "exitCode": None, **state}),
                               "time": rfc3339(state[key]), "count": 1})
        events.sort(key=lambda e: e["time"] or "")
        chat = self.chat_source(name, quiet=True)
        return {
            "name": name, "namespace": None, "phase": st["phase"], "spec": (doc or {}).get("spec") or {},
            "yaml": run.job_file.read_text() if run.job_file.exists() else "",
            "status": {k: v for k, v in st.items() if k not in ("stages", "conditions")},
            "stages": st["stages"], "conditions": st["conditions"], "events": events,
            "checkpoint": st["checkpoint"], "output": st["output"], "chatAvailable": chat is not None,
        }

    def history(self, name: str) -> dict[str, Any]:
        run = self._run(name)
        points = []
        for stage, _ in run.stage_names():
            for r in run.trainer_log(stage):
                if "current_steps" not in r:
                    continue
                p = {"stage": stage, "step": r["current_steps"]}
                for src, dst in (("loss", "loss"), ("eval_loss", "eval_loss"), ("lr", "learning_rate"), ("epoch", "epoch")):
                    if r.get(src) is not None:
                        p[dst] = r[src]
                if len(p) > 2:
                    points.append(p)
        return {"source": "trainer_log", "points": points}  # written at every logging step, live

    def logs(self, name: str, tail: int = 200) -> dict[str, Any]:
        run = self._run(name)
        lines = run.log_text().splitlines()
        return {"pod": None, "text": "\n".join(lines[-tail:] if tail > 0 else lines)}

    def _start(self, run: LocalRun, resumed: bool) -> None:
        run.board.mkdir(parents=True, exist_ok=True)
        cmd = [self.python, "-m", "kubetune.runtime", "run", str(run.job_file), "--output-root", str(run.root),
               "--metrics-port", "0", "--no-progress"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(run.log_file, "ab") as logf:
            logf.write(f"$ {' '.join(cmd)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.cwd, env=env, start_new_session=True)
        with self._lock:
            self._procs[run.name] = proc
        st = run.state()
        changes: dict[str, Any] = {"pid": proc.pid, "suspended": False, "command": cmd}
        if resumed:
            changes["resumedAt"] = time.time()
        else:
            changes.update(started=time.time(), created=st.get("created") or time.time())
        run.write_state(drop=("exitCode", "finished"), **changes)  # no exitCode: not ended

    def create(self, doc: dict[str, Any]) -> str:
        name = (doc.get("metadata") or {}).get("name")
        run = LocalRun(self.saves / name)
        if run.root.exists() and any(run.root.iterdir()):
            raise BoardError(409, f"a run named {name!r} already exists in {self.saves}; pick another "
                             "metadata.name or delete it first", "metadata.name")
        run.board.mkdir(parents=True, exist_ok=True)
        run.job_file.write_text(yaml.safe_dump(doc, sort_keys=False))
        self._start(run, resumed=False)
        return name

    def _signal(self, run: LocalRun, sig: int) -> bool:
        pid = run.state().get("pid")
        if not self._running(run):
            return False
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True

    def suspend(self, name: str) -> None:
        run = self._run(name)
        if not self._running(run):
            raise BoardError(409, f"run {name!r} is not running ({self.status(run)['phase']})")
        self._signal(run, signal.SIGTERM)
        run.write_state(suspended=True, suspendedAt=time.time())

    def resume(self, name: str) -> None:
        run = self._run(name)
        if self._running(run):
            raise BoardError(409, f"run {name!r} is already running")
        if not run.job_file.exists():
            raise BoardError(409, f"run {name!r} was not started by the board (no {run.job_file}); "
                             "run its job file again with `kubetune run`")
        if self.status(run)["phase"] == "Succeeded":
            raise BoardError(409, f"run {name!r} has finished; nothing to resume")
        self._start(run, resumed=True)

    def delete(self, name: str) -> None:
        run = self._run(name)
        if self._signal(run, signal.SIGTERM):
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self._running(run):
                time.sleep(0.2)
            if self._running(run):
                self._signal(run, signal.SIGKILL)
                time.sleep(0.2)
                self._reap(run)
        shutil.rmtree(run.root, ignore_errors=True)

    def chat_source(self, name: str, quiet: bool = False) -> dict[str, Any] | None:
        """The folder to chat with (the last committed adapter or model) and the job's template."""
        run = self._run(name)
        doc = run.doc() or {}
        for stage, type_ in reversed(run.stage_names()):
            rec = run.stage_record(stage, type_)
            summary = _read_json(run.storage_root() / stage / "output" / "run.json") or {}
            if rec["output"] and type_ != "eval" and summary.get("type") != "eval":
                return {"path": rec["output"]["uri"], "template": (doc.get("spec") or {}).get("template")}
        if quiet:
            return None
        raise BoardError(409, f"run {name!r} has no committed model or adapter yet; chat opens when a stage "
                         "has committed its output")

    def stop_all(self) -> None:
        """Nothing: runs outlive the board (like `kubetune run` in another terminal)."""


def _seconds(text: Any) -> float | None:
    if not isinstance(text, str) or not re.match(r"^\d+:\d\d:\d\d$", text):
        return None
    h, m, s = (int(x) for x in text.split(":"))
    return float(h * 3600 + m * 60 + s)


__all__ = ["LocalBackend", "LocalRun", "DONE"]
