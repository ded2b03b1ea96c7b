"""The local progress bar: step, loss, tokens/s and ETA on one line (or one log line per
logging step when stderr is not a terminal)."""

from __future__ import annotations

import sys
import time

from transformers import TrainerCallback


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class ConsoleProgress(TrainerCallback):
    def __init__(self, cfg, live: bool = True, stream=None, width: int = 24):
        self.cfg = cfg
        self.live = live
        self.stream = stream or sys.stderr
        self.width = width
        self.loss: float | None = None
        self.start = time.time()
        self.start_step = 0
        self.start_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()
        self.start_step = state.global_step
        self.start_tokens = getattr(state, "num_input_tokens_seen", 0) or 0

    def line(self, state) -> str:
        step, total = state.global_step, state.max_steps or 0
        elapsed = max(1e-6, time.time() - self.start)
        done = step - self.start_step
        tokens = (getattr(state, "num_input_tokens_seen", 0) or 0) - self.start_tokens
        eta = elapsed / done * (total - step) if done > 0 and total else None
        frac = step / total if total else 0.0
        filled = int(frac * self.width)
        bar = "█" * filled + "·" * (self.width - filled)
        loss = f"{self.loss:.4f}" if self.loss is not None else "-"
        return (
            f"{self.cfg.name} |{bar}| {step}/{total} ({100 * frac:3.0f}%)  loss {loss}  "
            f"{tokens / elapsed:,.0f} tok/s  ETA {format_eta(eta)}"
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = logs["loss"]
        if not state.is_world_process_zero:
            return
        if self.live:
            self.stream.write("\r" + self.line(state) + "\x1b[K")
            self.stream.flush()
        elif logs and "loss" in logs:
            self.stream.write(self.line(state) + "\n")
            self.stream.flush()

    def on_step_end(self, args, state, control, **kwargs):
        if self.live and state.is_world_process_zero:
            self.stream.write("\r" + self.line(state) + "\x1b[K")
            self.stream.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self.live and state.is_world_process_zero:
            self.stream.write("\r" + self.line(state) + "\x1b[K\n")
            self.stream.flush()
