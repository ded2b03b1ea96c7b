"""`export` stage: merge the policy's adapter into its model and save a standalone model."""

from __future__ import annotations

import time

from ..export import export_model
from .base import StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    from ..outputs import write_run_summary

    cfg = ctx.cfg
    started = time.time()
    base = ctx.resolve(cfg.io.policy.model, "spec.model.name")
    adapter = ctx.resolve(cfg.io.policy.adapter, ctx.where()) if cfg.io.policy.adapter else None
    dtype = cfg.model.dtype
    # layered (shard by shard) when the base is a local safetensors folder: a 70B merge fits a 128 GB Spark
    report: dict = {}
    out = export_model(adapter, ctx.output_dir, base=base, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code,
                       report=report)
    summary = {
        "job": cfg.job,
        "stage": cfg.name,
        "type": "export",
        "merged_adapter": cfg.io.policy.adapter,
        "base_model": cfg.io.policy.model,
        "merge": report["merge"],
        "duration_seconds": round(time.time() - started, 3),
        "output_kind": "model",
    }
    write_run_summary(out / "run.json", summary)
    return StageResult(out, summary)
