"""`pt` and `sft` stages on TRL's SFTTrainer.

pt: plain text, every token in the loss, packed by default. sft: conversations through the chat
template, loss on the assistant's tokens only. Packing is TRL's best-fit-decreasing packing with
padding-free batches: position ids restart at each sample, so packed samples never attend to
each other.
"""

from __future__ import annotations

import logging

from datasets import Dataset, IterableDataset

from ..data.formats import to_examples
from ..data.loaders import load_records
from ..data.prepare import KIND_OF_STAGE, split_eval, stream_examples, tokenize_examples
from ..api.errors import DataError, UserError
from .base import StageContext
from .trainer_stage import TrainerStage

log = logging.getLogger(__name__)


def _tokenized(datasets, kind, tokenizer, hp, ctx: StageContext, where: str) -> dict[str, list]:
    """The datasets' examples tokenized (each with its own preprocessingWorkers), in order."""
    columns: dict[str, list] = {}
    for ds in datasets:
        examples = to_examples(load_records(ds, ctx.base_dir, ctx.fetch), ds, kind)
        part = tokenize_examples(examples, kind, tokenizer, where, ds.preprocessing_workers,
                                 offset=len(columns.get("input_ids", [])))
        for k, v in part.items():
            columns.setdefault(k, []).extend(v)
    if not hp.packing:  # padding-free batches without packing: truncate here (keep the start)
        columns = {k: [v[: hp.cutoff_len] for v in vals] for k, vals in columns.items()}
        if "assistant_masks" in columns:
            keep = [i for i, m in enumerate(columns["assistant_masks"]) if any(m)]
            columns = {k: [vals[i] for i in keep] for k, vals in columns.items()}
    return columns


def build_datasets(ctx: StageContext, tokenizer) -> tuple[Dataset | IterableDataset, Dataset | None]:
    cfg = ctx.cfg
    kind = KIND_OF_STAGE[cfg.stage.type]
    hp = cfg.stage.hyperparameters
    where = f"stage {cfg.name} data ({', '.join(d.name for d in cfg.data)})"
    eval_ds = None
    if cfg.eval_data:  # a separate evaluation set: the training data is used whole
        eval_where = f"stage {cfg.name} evalData ({', '.join(d.name for d in cfg.eval_data)})"
        eval_columns = _tokenized(cfg.eval_data, kind, tokenizer, hp, ctx, eval_where)
        if not eval_columns.get("input_ids"):
            raise DataError(f"no evaluation example keeps an answer within cutoffLen {hp.cutoff_len}", eval_where)
        eval_ds = Dataset.from_dict(eval_columns)
    if any(d.streaming for d in cfg.data):  # read and tokenized a batch at a time while training
        if hp.val_size:
            raise UserError("a streaming dataset cannot hold out valSize (a stream has no length to take a share "
                            "of); set valSize 0 (or give evalData)", ctx.where("hyperparameters.valSize"))
        return stream_examples(cfg.data, kind, tokenizer, where, None if hp.packing else hp.cutoff_len,
                               ctx.base_dir, ctx.fetch), eval_ds
    columns = _tokenized(cfg.data, kind, tokenizer, hp, ctx, where)
    if eval_ds is not None:
        return Dataset.from_dict(columns), eval_ds
    train_idx, eval_idx = split_eval(len(columns["input_ids"]), hp.val_size, hp.seed)
    full = Dataset.from_dict(columns)
    train_ds = full.select(train_idx)
    eval_ds = full.select(eval_idx) if eval_idx else None
    return train_ds, eval_ds


class SFT(TrainerStage):
    trl_classes = ("trl", "SFTConfig", "SFTTrainer")

    def datasets(self):
        train_ds, eval_ds = build_datasets(self.ctx, self.tokenizer)
        self.ctx.eval_examples = len(eval_ds) if eval_ds is not None else None  # SFTTrainer may pack them into fewer rows
        return train_ds, eval_ds

    def options(self):
        hp = self.hp
        return dict(
            max_length=hp.cutoff_len if hp.packing else None,
            packing=bool(hp.packing),
            packing_strategy="bfd",
            padding_free=True,  # flatten each batch: no pad tokens computed, with or without packing
            neftune_noise_alpha=hp.neftune_alpha,
            dataset_num_proc=None,
        )


run = SFT.run
