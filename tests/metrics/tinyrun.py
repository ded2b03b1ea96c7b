"""A real, tiny training run: a 2-layer Llama, a tokenizer trained here, transformers' Trainer.

Nothing is downloaded. Used by the metrics tests and by `dashboards/render_png.py`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

TEXTS = [
    "kubetune fine tunes language models on kubernetes",
    "the operator plans stages and starts one job per stage",
    "prometheus scrapes the training pods every few seconds",
    "grafana shows loss learning rate tokens per second and memory",
    "checkpoints go to object storage after every few hundred steps",
    "a tiny llama learns to repeat these sentences quickly",
    "low rank adapters keep the base model frozen",
    "the progress endpoint tells the operator the step and the loss",
    "unified memory on a dgx spark is shared by cpu and gpu",
    "eval loss is measured on a held out set of sentences",
]


def build_tokenizer():
    """A word-level tokenizer trained on `TEXTS`, wrapped for transformers (pad = id 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"])
    tok.train_from_iterator(TEXTS * 3, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]")


def build_model(tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config)


def build_datasets(tokenizer, n_train: int = 160, n_eval: int = 10):
    """Variable-length samples (so padding exists and non-padding tokens < all tokens); plain
    lists of dicts, which Trainer's DataLoader takes as they are."""

    def rows(n, offset):
        out = []
        for i in range(n):
            a = TEXTS[(i + offset) % len(TEXTS)]
            text = a if i % 3 else a + " " + TEXTS[(i * 7 + offset + 1) % len(TEXTS)]
            ids = [tokenizer.bos_token_id] + tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
            out.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
        return out

    return rows(n_train, 0), rows(n_eval, 3)


@dataclass
class TinyRun:
    """What the run left behind for the assertions."""

    trainer_log: list[dict[str, Any]] = field(default_factory=list)  # trainer_log.jsonl rows
    uploads: list[Any] = field(default_factory=list)                 # UploadResult
    progress_docs: list[dict[str, Any]] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0
    max_steps: int = 0


def train(out_dir: Path, metrics_cb, *, max_steps: int = 60, save_steps: int = 15,
          eval_steps: int = 10, storage_root: Path | None = None,
          on_step: Callable[[int], None] | None = None) -> TinyRun:
    """Train the tiny model for `max_steps` with `metrics_cb` attached and a real
    `CheckpointUploader` on `LocalStorage` feeding `metrics_cb.on_uploaded`."""
    from transformers import (DataCollatorForLanguageModeling, Trainer, TrainerCallback,
                              TrainingArguments)

    from kubetune.runtime.storage.local import LocalStorage
    from kubetune.runtime.storage.uploader import CheckpointUploader

    run = TinyRun(max_steps=max_steps)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    train_ds, eval_ds = build_datasets(tokenizer)
    storage = LocalStorage(storage_root or out_dir / "storage")
    uploader = CheckpointUploader(storage, "sft", keep=2, staging_dir=out_dir / ".staging",
                                  on_uploaded=lambda r: (metrics_cb.on_uploaded(r),
                                                         run.uploads.append(r)))
    log_path = out_dir / "trainer_log.jsonl"

    class Recorder(TrainerCallback):
        """Writes trainer_log.jsonl (as the runtime does) and submits checkpoints."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            row = {"step": state.global_step, **(logs or {})}
            run.progress_docs.append(metrics_cb.progress.snapshot())
            run.trainer_log.append(row)
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

        def on_save(self, args, state, control, **kwargs):
            uploader.submit(Path(args.output_dir) / f"checkpoint-{state.global_step}",
                            state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if on_step is not None:
                on_step(state.global_step)

    args = TrainingArguments(
        output_dir=str(out_dir / "trainer"), max_steps=max_steps, per_device_train_batch_size=8,
        per_device_eval_batch_size=10, learning_rate=3e-3, lr_scheduler_type="cosine",
        warmup_steps=5, logging_steps=1, eval_strategy="steps", eval_steps=eval_steps,
        save_strategy="steps", save_steps=save_steps, save_total_limit=2, report_to="none",
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=0, seed=0,
        disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                      callbacks=[metrics_cb, Recorder()])
    run.started = time.time()
    try:
        trainer.train()
        uploader.close()
        metrics_cb.set_output(storage.url("sft/model"))
        metrics_cb.set_phase("finished")
    except BaseException:
        metrics_cb.set_phase("failed")
        raise
    run.finished = time.time()
    return run
