"""TEST-ONLY PACING of the browser test's training run (tests/board/test_browser.py).

The tiny model trains 40 steps in about 3 s on a quiet machine: faster than a page that polls
every 1.5 s can show a moving progress bar. With this folder on PYTHONPATH and
KUBETUNE_TEST_STEP_DELAY=<seconds> in the environment (the test sets both for the board, whose
`kubetune run` inherits them), every `transformers.Trainer.training_step` first sleeps that long.
Nothing else changes: the same steps, the same loss, the same outputs; only wall time grows.
"""

import importlib.abc
import importlib.machinery
import os
import sys

_DELAY = float(os.environ.get("KUBETUNE_TEST_STEP_DELAY") or 0)


def _pace(module) -> None:
    import time

    trainer = getattr(module, "Trainer", None)
    if trainer is None or getattr(trainer.training_step, "_kubetune_paced", False):
        return
    original = trainer.training_step

    def training_step(self, *args, **kwargs):
        time.sleep(_DELAY)
        return original(self, *args, **kwargs)

    training_step._kubetune_paced = True
    trainer.training_step = training_step


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of `transformers.trainer` so that the class is paced once it is defined."""

    def find_spec(self, name, path, target=None):
        if name != "transformers.trainer":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _pace(module)

        spec.loader.exec_module = exec_module
        return spec


if _DELAY > 0:
    sys.meta_path.insert(0, _Finder())
