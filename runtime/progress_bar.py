"""The local progress bar: the same numbers the `/progress` endpoint serves (step, loss,
tokens/s, ETA), redrawn in place on a terminal or one line per logging step otherwise."""

from __future__ import annotations

from transformers import TrainerCallback

from .api.progress import ProgressLine


class ConsoleProgress(TrainerCallback):
    """Draws `metrics.progress` (a `MetricsCallback`'s state); add it after that callback."""

    def __init__(self, metrics, stream=None, plain: bool = False):
        self.metrics = metrics
        self.line = ProgressLine(stream=stream, min_interval=0.0, tty=False if plain else None)

    def _draw(self, state, force: bool = False) -> None:
        if state.is_world_process_zero:
            self.line.update(self.metrics.progress.snapshot(), force=force)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._draw(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._draw(state, force=True)
        self.line.close()
