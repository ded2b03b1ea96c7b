"""Load a stage's datasets, convert them, and tokenize SFT/PT data for TRL.

SFT conversations are tokenized here in batches through the tokenizer's own chat template
(`apply_chat_template(..., return_assistant_tokens_mask=True)`), giving `input_ids`,
`assistant_masks` and `labels` (-100 outside the assistant's tokens: assistant-only loss); TRL's
SFTTrainer then truncates and packs.
For a template without `{% generation %}` markers (most model hubs' templates) the assistant
spans are found by rendering each conversation's prefixes and mapping their character offsets
to tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from ..api.errors import DataError, UserError
from ..api.spec import DatasetSpec
from ..api.stage_types import STAGE_TYPES
from .formats import Kind, to_examples
from .loaders import load_records
from .templates import has_generation_markers

log = logging.getLogger(__name__)

# stage type → the kind its datasets are converted to (eval: generation datasets; its format choice
# datasets are read as kind "choice")
KIND_OF_STAGE: dict[str, Kind] = {t: i.data_kind for t, i in STAGE_TYPES.items() if i.data_kind is not None}


def load_examples(
    datasets: list[DatasetSpec], kind: Kind, base_dir: Path | None = None, fetch: Callable[[str], Path] | None = None
) -> list[dict[str, Any]]:
    """Every dataset of a stage, converted to `kind` examples and concatenated in order."""
    streaming = [d.name for d in datasets if d.streaming]
    if streaming:
        raise UserError(f"dataset {streaming[0]!r} has streaming: true, which only pt and sft stages support "
                        "(this stage reads its whole data)", "spec.data[].streaming")
    examples: list[dict[str, Any]] = []
    for ds in datasets:
        records = load_records(ds, base_dir, fetch)
        examples += to_examples(records, ds, kind)
    return examples


def train_eval_examples(cfg, kind: Kind, base_dir: Path | None = None, fetch: Callable[[str], Path] | None = None,
                        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A resolved stage's training and evaluation examples: the eval part is its `evalData` when it
    has any (the training data is then used whole), else a held-out `valSize` of the training data
    (empty when valSize is 0). The spec does not allow both."""
    examples = load_examples(cfg.data, kind, base_dir, fetch)
    if cfg.eval_data:
        return examples, load_examples(cfg.eval_data, kind, base_dir, fetch)
    hp = cfg.stage.hyperparameters
    train_idx, eval_idx = split_eval(len(examples), hp.val_size, hp.seed)
    return [examples[i] for i in train_idx], [examples[i] for i in eval_idx]


def tokenize_text(examples: list[dict[str, Any]], tokenizer, batch_size: int = 1000) -> dict[str, list]:
    """Plain text → input_ids, each document closed with EOS (pre-training)."""
    eos = tokenizer.eos_token or ""
    ids: list[list[int]] = []
    for start in range(0, len(examples), batch_size):
        texts = [e["text"] + eos for e in examples[start : start + batch_size]]
        ids += tokenizer(texts, add_special_tokens=True)["input_ids"]
    return {"input_ids": ids}


def tokenize_conversations(examples: list[dict[str, Any]], tokenizer, batch_size: int = 256, where: str = "the data",
                           offset: int = 0) -> dict[str, list]:
    """Conversations → input_ids + assistant_masks (1 on the tokens the assistant says)."""
    if has_generation_markers(tokenizer.chat_template):
        ids: list[list[int]] = []
        masks: list[list[int]] = []
        fast = True
        for start in range(0, len(examples), batch_size):
            batch = [e["messages"] for e in examples[start : start + batch_size]]
            out = _chat_batch(batch, tokenizer) if fast else None
            if start == 0 and out is not None:
                slow = tokenizer.apply_chat_template(batch, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
                if slow["input_ids"] != out[0] or slow["assistant_masks"] != out[1]:
                    log.debug("fast chat-template path disagrees with apply_chat_template; using the latter")
                    out = None
            if out is None:
                fast = False
                slow = tokenizer.apply_chat_template(batch, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
                out = (slow["input_ids"], slow["assistant_masks"])
            ids += out[0]
            masks += out[1]
    else:
        ids, masks = [], []
        for e in examples:
            i, m = _tokenize_by_prefixes(e["messages"], tokenizer)
            ids.append(i)
            masks.append(m)
    empty = next((n for n, m in enumerate(masks) if not any(m)), None)
    if empty is not None:
        raise DataError(f"example {offset + empty}: the chat template produced no assistant tokens to learn from", where)
    # Labels made here, in one pass over plain lists: TRL then skips its own per-example
    # `Dataset.map` that builds them from the masks (the slowest step of its preparation).
    labels = [[t if m else -100 for t, m in zip(i, mk)] for i, mk in zip(ids, masks)]
    return {"input_ids": ids, "assistant_masks": masks, "labels": labels}


def _chat_batch(batch: list[list[dict[str, Any]]], tokenizer) -> tuple[list[list[int]], list[list[int]]] | None:
    """`apply_chat_template(batch, return_assistant_tokens_mask=True)` without its per-token Python
    loop: render with transformers' own renderer, tokenize the batch, and turn each `{% generation %}`
    span into a token range through the Rust encodings (two lookups per span). None when this
    transformers or tokenizer does not offer what it needs; the caller checks the first batch
    against `apply_chat_template` and keeps using that one on any difference."""
    try:
        from transformers.utils.chat_template_utils import render_jinja_template

        convs = [[{k: v for k, v in m.items() if v is not None} for m in conv] for conv in batch]
        rendered, spans = render_jinja_template(
            conversations=convs, chat_template=tokenizer.get_chat_template(), return_assistant_tokens_mask=True,
            **tokenizer.special_tokens_map,
        )
        enc = tokenizer(rendered, add_special_tokens=False)
        encodings = enc.encodings
    except Exception:  # noqa: BLE001 - an older/newer API: the caller falls back
        return None
    if encodings is None:
        return None
    masks = []
    for e, text_spans in zip(encodings, spans):
        mask = [0] * len(e.ids)
        for a, b in text_spans:
            if b <= a:  # an empty span marks no token
                continue
            first, last = e.char_to_token(a), e.char_to_token(b - 1)
            if first is None or last is None:
                return None
            mask[first : last + 1] = [1] * (last + 1 - first)
        masks.append(mask)
    return enc["input_ids"], masks


def _tokenize_by_prefixes(messages: list[dict[str, str]], tokenizer) -> tuple[list[int], list[int]]:
    """Assistant spans of a template without generation markers, from its rendered prefixes."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True) if k else ""
        upto = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if full.startswith(upto) and upto.startswith(before):
            # the separator after the turn (usually a newline) belongs to the template, not the answer
            spans.append((len(before), len(upto.rstrip())))
        else:  # the template rewrites earlier turns (e.g. strips reasoning): fall back to the content
            at = full.find(m["content"], spans[-1][1] if spans else 0)
            if at >= 0:
                spans.append((at, at + len(m["content"])))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a <= s < b for a, b in spans)) for s, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def split_eval(n: int, val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the train and eval parts: val_size < 1 is a share, >= 1 a count."""
    if val_size <= 0:
        return list(range(n)), []
    import random

    count = int(round(val_size * n)) if val_size < 1 else int(val_size)
    count = max(1, min(count, n - 1))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx = sorted(order[:count])
    chosen = set(eval_idx)
    return [i for i in range(n) if i not in chosen], eval_idx


def tokenize_examples(examples: list[dict[str, Any]], kind: Kind, tokenizer, where: str, workers: int | None = None,
                      offset: int = 0) -> dict[str, list]:
    """`tokenize_text` or `tokenize_conversations`; with `workers` > 1 in that many processes
    (datasets `map(num_proc=...)`, one contiguous slice each, so the result is the same)."""
    def one(batch: list[dict[str, Any]], start: int) -> dict[str, list]:
        if kind == "text":
            return tokenize_text(batch, tokenizer)
        return tokenize_conversations(batch, tokenizer, where=where, offset=offset + start)

    if not workers or workers <= 1 or len(examples) < 2:
        return one(examples, 0)
    import json
    import math

    from datasets import Dataset

    workers = min(workers, len(examples))
    # each example as JSON text: arrow would otherwise unify the messages' keys (adding None fields)
    table = Dataset.from_dict({"example": [json.dumps(e) for e in examples]})
    out = table.map(
        lambda b, idx: one([json.loads(x) for x in b["example"]], idx[0]),
        batched=True, with_indices=True, batch_size=math.ceil(len(examples) / workers), num_proc=workers,
        remove_columns=["example"], desc=f"tokenizing {where}",
    )
    return {c: out[c] for c in out.column_names}


def stream_examples(datasets: list[DatasetSpec], kind: Kind, tokenizer, where: str, cutoff_len: int | None,
                    base_dir: Path | None = None, fetch: Callable[[str], Path] | None = None):
    """A stage's datasets as one tokenized `datasets.IterableDataset`, read and tokenized a batch
    at a time (the stage streams when one of its datasets has `streaming: true`; the others are
    read as usual and streamed after them). `cutoff_len`: truncate (no packing)."""
    from datasets import IterableDataset

    from .loaders import stream_records

    parts = []
    for ds in datasets:
        if ds.streaming:
            records = stream_records(ds, base_dir, fetch)
            columns = records.column_names
        else:
            loaded = load_records(ds, base_dir, fetch)
            records = IterableDataset.from_generator(_rows, gen_kwargs={"rows": loaded})
            columns = sorted({k for r in loaded for k in r})

        def tokenized(batch: dict[str, list], ds: DatasetSpec = ds) -> dict[str, list]:
            n = len(next(iter(batch.values())))
            rows = [{k: v[i] for k, v in batch.items() if v[i] is not None} for i in range(n)]
            cols = tokenize_examples(to_examples(rows, ds, kind), kind, tokenizer, f"{where}, dataset {ds.name!r}")
            if cutoff_len:
                cols = {k: [v[:cutoff_len] for v in vals] for k, vals in cols.items()}
                if "assistant_masks" in cols:
                    keep = [i for i, m in enumerate(cols["assistant_masks"]) if any(m)]
                    cols = {k: [vals[i] for i in keep] for k, vals in cols.items()}
            return cols

        parts.append(records.map(tokenized, batched=True, batch_size=256, remove_columns=columns))
    # one after the other (concatenate_datasets would peek into each part for its features)
    return parts[0] if len(parts) == 1 else IterableDataset.from_generator(_chain, gen_kwargs={"parts": parts})


def _rows(rows: list[dict[str, Any]]):
    yield from rows


def _chain(parts: list):
    for part in parts:
        yield from part
