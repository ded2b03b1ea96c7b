"""What a stage leaves beside its model: `trainer_log.jsonl`, `training_loss.png`, `run.json`.

`TrainerLogCallback` writes one JSON line per logging step in LLaMA-Factory's layout (so their
tools and habits keep working) and keeps the numbers for the summary.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


def _fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# Trainer log keys written above under LLaMA-Factory's names (or deliberately left out).
_RENAMED = {"learning_rate", "num_input_tokens_seen", "epoch", "total_flos"}


class TrainerLogCallback(TrainerCallback):
    """Appends LLaMA-Factory-style lines to `trainer_log.jsonl` in `log_dir`."""

    def __init__(self, log_dir: Path):
        self.path = Path(log_dir) / "trainer_log.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.start = time.time()
        self.start_step = 0
        self.records: list[dict[str, Any]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()
        self.start_step = state.global_step
        if state.global_step == 0 and self.path.exists():
            self.path.unlink()
        elif self.path.exists():  # resumed: keep the lines up to the checkpoint, drop the rest
            kept = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            kept = [r for r in kept if r.get("current_steps", 0) <= state.global_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            self.records = kept

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        step, total = state.global_step, state.max_steps or 0
        elapsed = time.time() - self.start
        done = max(1, step - self.start_step)
        record: dict[str, Any] = {
            "current_steps": step,
            "total_steps": total,
            "epoch": round(state.epoch or 0.0, 4),
            "percentage": round(100.0 * step / total, 2) if total else None,
            "elapsed_time": _fmt_seconds(elapsed),
            "remaining_time": _fmt_seconds(elapsed / done * (total - step)) if total else None,
        }
        for key, out in (("loss", "loss"), ("learning_rate", "lr"), ("grad_norm", "grad_norm"), ("eval_loss", "eval_loss")):
            if key in logs:
                record[out] = logs[key]
        if "num_input_tokens_seen" in logs:
            record["tokens_seen"] = logs["num_input_tokens_seen"]
        if "train_runtime" in logs:
            record.update({k: logs[k] for k in ("train_runtime", "train_loss") if k in logs})
        # The stage's own signals (rewards, KL, margins, accuracies…) under the trainer's names.
        for key, value in logs.items():
            if key not in _RENAMED and key not in record and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                record[key] = value
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    @property
    def losses(self) -> list[tuple[int, float]]:
        return [(r["current_steps"], r["loss"]) for r in self.records if "loss" in r]

    @property
    def eval_losses(self) -> list[tuple[int, float]]:
        return [(r["current_steps"], r["eval_loss"]) for r in self.records if "eval_loss" in r]


def plot_loss(records: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """A real plot of the loss curve (raw and smoothed, eval points when present)."""
    train = [(r["current_steps"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["current_steps"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="#9ecae1", linewidth=1, label="loss")
        if len(losses) >= 5:  # exponential moving average, heavier the more points there are
            weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(losses))) - 0.5)
            smoothed, last = [], losses[0]
            for v in losses:
                last = weight * last + (1 - weight) * v
                smoothed.append(last)
            ax.plot(steps, smoothed, color="#08519c", linewidth=2, label="smoothed")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="#e6550d", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_run_summary(path: Path, summary: dict[str, Any]) -> None:
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
