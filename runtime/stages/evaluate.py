"""`eval` stage: score the policy on the stage's data, train nothing (see kubetune.runtime.evaluate).

The policy is what the previous stage left (its adapter applied on its model), or the job's base
model when eval comes first. Output: the result files of each dataset and run.json, whose `eval`
holds the short summary that reaches the progress report, the FineTuneJob's status and metrics.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from ..data.loaders import load_records
from ..data.formats import to_examples
from ..evaluate import evaluate_datasets, load_eval_model
from .base import StageContext, StageResult


def load_eval_data(datasets, base_dir: Path | None, fetch: Callable | None = None) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(name, kind, examples) of each dataset: choice for format choice, else conversations."""
    out = []
    for ds in datasets:
        kind = "choice" if ds.format == "choice" else "conversation"
        out.append((ds.name, kind, to_examples(load_records(ds, base_dir, fetch), ds, kind)))
    return out


def run(ctx: StageContext) -> StageResult:
    from ..outputs import write_run_summary

    cfg = ctx.cfg
    ev = cfg.stage.evaluation
    started = time.time()
    model_path, adapter = ctx.policy_paths()
    data = load_eval_data(cfg.data, ctx.base_dir, ctx.fetch)
    pool = None
    if ev.few_shot_data:
        pool = [ex for _, _, exs in load_eval_data(ev.few_shot_data, ctx.base_dir, ctx.fetch) for ex in exs]
    em = load_eval_model(model_path, adapter, cfg.model, cfg.template, cutoff_len=cfg.stage.hyperparameters.cutoff_len,
                         batch_size=ev.batch_size)
    out = ctx.output_dir
    results = evaluate_datasets(em, data, out, max_new_tokens=ev.max_new_tokens, few_shot=ev.few_shot,
                                shots_pool=pool, scoring=ev.choice_scoring)
    summary = {
        "job": cfg.job,
        "stage": cfg.name,
        "type": "eval",
        "model": cfg.io.policy.model,
        "adapter": cfg.io.policy.adapter,
        **results,
        "duration_seconds": round(time.time() - started, 3),
        "output_kind": "results",
    }
    write_run_summary(out / "run.json", summary)
    for cb in ctx.callbacks:  # metrics and /progress: the short summary
        if hasattr(cb, "set_eval"):
            cb.set_eval(results["eval"], results["datasets"])
    return StageResult(out, summary)
