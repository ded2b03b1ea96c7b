"""Evaluation beyond eval loss: what the `eval` stage and `kubetune eval` compute.

Two kinds of datasets, told apart by their format:

- generation (alpaca, sharegpt, messages): the conversation's last assistant turn is the label;
  the model answers the turns before it greedily, and the answers are scored against the labels
  with ROUGE-1/2/L and BLEU-4 exactly as LLaMA-Factory's predict mode does (jieba words for
  ROUGE, characters for BLEU with nltk's smoothing method 3; every score × 100). Files:
  `generated_predictions.jsonl` (prompt, predict, label) and `predict_results.json`.
- choice (MMLU / CMMLU / C-Eval layout): each choice is scored by its log-likelihood as the
  assistant's answer, the likeliest one is the model's pick; accuracy (× 100) overall and per
  subject. Files: `choice_predictions.jsonl` and `choice_results.json`.

Torch and the metric libraries are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.formats import CHOICE_LETTERS
from .api.errors import DataError, UserError

log = logging.getLogger(__name__)

GENERATION_METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


# ------------------------------------------------------------------------------------- scores


def _metric_libs():
    try:
        import jieba
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_chinese import Rouge
    except ImportError as err:
        raise UserError(f"generation metrics need the `eval` extra (pip install 'kubetune[eval]'): {err}",
                        "evaluation") from None
    jieba.setLogLevel(logging.WARNING)
    return jieba, Rouge, sentence_bleu, SmoothingFunction


def generation_scores(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 and BLEU-4 (× 100, rounded to 4 places) of `predictions` against
    `labels`, computed per sample as LLaMA-Factory's ComputeSimilarity does."""
    jieba, Rouge, sentence_bleu, SmoothingFunction = _metric_libs()
    sums = dict.fromkeys(GENERATION_METRICS, 0.0)
    smooth = SmoothingFunction().method3
    for pred, label in zip(predictions, labels, strict=True):
        hypothesis, reference = list(jieba.cut(pred)), list(jieba.cut(label))
        if not " ".join(hypothesis).split() or not " ".join(reference).split():
            rouge = {k: {"f": 0.0} for k in ("rouge-1", "rouge-2", "rouge-l")}
        else:
            rouge = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
        for k in ("rouge-1", "rouge-2", "rouge-l"):
            sums[k] += round(rouge[k]["f"] * 100, 4)
        sums["bleu-4"] += round(sentence_bleu([list(label)], list(pred), smoothing_function=smooth) * 100, 4)
    n = max(len(predictions), 1)
    return {k: round(v / n, 4) for k, v in sums.items()}


# ---------------------------------------------------------------------------- choice prompts


def choice_messages(example: dict[str, Any], shots: list[dict[str, Any]], scoring: str) -> tuple[list[dict[str, str]], list[str]]:
    """The conversation that asks `example` (after the solved `shots`), and the candidate answers
    whose log-likelihood as the assistant's reply is compared."""

    def ask(ex: dict[str, Any]) -> str:
        if scoring == "text":
            return ex["question"]
        listed = "\n".join(f"{CHOICE_LETTERS[i]}. {c}" for i, c in enumerate(ex["choices"]))
        return f"{ex['question']}\n{listed}\nAnswer:"

    def answer(ex: dict[str, Any], i: int) -> str:
        return ex["choices"][i] if scoring == "text" else CHOICE_LETTERS[i]

    msgs: list[dict[str, str]] = []
    if example.get("subject"):
        msgs.append({"role": "system", "content": "The following are multiple choice questions (with answers) "
                                                  f"about {example['subject']}."})
    for shot in shots:
        msgs += [{"role": "user", "content": ask(shot)}, {"role": "assistant", "content": answer(shot, shot["answer"])}]
    msgs.append({"role": "user", "content": ask(example)})
    return msgs, [answer(example, i) for i in range(len(example["choices"]))]


def pick_shots(example: dict[str, Any], index: int | None, pool: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """`n` solved examples for `example`: the pool's questions of the same subject first, in
    file order, never the question itself (`index`: its position when the pool is its own file)."""
    if n <= 0:
        return []
    others = [ex for i, ex in enumerate(pool) if i != index and ex["question"] != example["question"]]
    same = [ex for ex in others if ex.get("subject") == example.get("subject")]
    rest = [ex for ex in others if ex.get("subject") != example.get("subject")]
    return (same + rest)[:n]


# ----------------------------------------------------------------------------- model side


@dataclass
class EvalModel:
    model: Any
    tokenizer: Any
    cutoff_len: int = 2048
    batch_size: int = 8
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def device(self):
        return self.model.device


def _prompt_ids(tok, messages: list[dict[str, str]]) -> list[int]:
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


def _full_ids(tok, messages: list[dict[str, str]]) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def choice_loglikelihoods(em: EvalModel, prompts: list[list[dict[str, str]]], candidates: list[list[str]],
                          per_token: bool = False) -> list[list[float]]:
    """For each prompt, the log-probability of each candidate as the assistant's reply (its tokens
    and the template's end of turn): summed, or (`per_token`) averaged over those tokens so that
    answers of different lengths compare fairly. Batches of right-padded sequences."""
    import torch

    tok = em.tokenizer
    rows: list[tuple[int, list[int], int]] = []  # (prompt index, ids, where the answer starts)
    for p, (msgs, cands) in enumerate(zip(prompts, candidates, strict=True)):
        head = _prompt_ids(tok, msgs)
        for cand in cands:
            ids = _full_ids(tok, msgs + [{"role": "assistant", "content": cand}])
            start = len(head)
            if ids[:start] != head:  # the template tokenizes the joint differently: find the split
                start = next((i for i, (a, b) in enumerate(zip(ids, head)) if a != b), min(len(ids), len(head)))
            if len(ids) > em.cutoff_len:  # keep the answer; drop the oldest prompt tokens
                cut = len(ids) - em.cutoff_len
                ids, start = ids[cut:], max(start - cut, 1)
            rows.append((p, ids, max(start, 1)))
    scores: list[list[float]] = [[] for _ in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with torch.no_grad():
        for b in range(0, len(rows), em.batch_size):
            batch = rows[b : b + em.batch_size]
            width = max(len(ids) for _, ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (_, ids, _) in enumerate(batch):
                input_ids[r, : len(ids)] = torch.tensor(ids)
                mask[r, : len(ids)] = 1
            logits = em.model(input_ids=input_ids.to(em.device), attention_mask=mask.to(em.device)).logits.float()
            logp = torch.log_softmax(logits, dim=-1).cpu()
            for r, (p, ids, start) in enumerate(batch):
                target = torch.tensor(ids[start:])
                got = logp[r, start - 1 : len(ids) - 1].gather(1, target[:, None]).sum().item()
                if per_token:
                    got /= max(len(target), 1)
                scores[p].append(got)
    return scores


def generate_answers(em: EvalModel, prompts: list[list[dict[str, str]]], max_new_tokens: int) -> list[str]:
    """Greedy answers to each prompt, in batches of left-padded prompts."""
    import torch

    tok = em.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    out: list[str] = []
    try:
        with torch.no_grad():
            for b in range(0, len(prompts), em.batch_size):
                ids = [_prompt_ids(tok, m)[-em.cutoff_len :] for m in prompts[b : b + em.batch_size]]
                enc = tok.pad({"input_ids": ids}, return_tensors="pt")
                enc = {k: v.to(em.device) for k, v in enc.items()}
                gen = em.model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                )
                width = enc["input_ids"].shape[1]
                out += [tok.decode(g[width:], skip_special_tokens=True).strip() for g in gen]
    finally:
        tok.padding_side = side
    return out


# ------------------------------------------------------------------------------- datasets


def evaluate_generation(em: EvalModel, examples: list[dict[str, Any]], max_new_tokens: int, out_dir: Path,
                        prefix: str = "") -> dict[str, Any]:
    """Predict mode on conversation examples → generated_predictions.jsonl + predict_results.json."""
    prompts = [e["messages"][:-1] for e in examples]
    labels = [e["messages"][-1]["content"] for e in examples]
    started = time.time()
    predictions = generate_answers(em, prompts, max_new_tokens)
    runtime = time.time() - started
    scores = generation_scores(predictions, labels)
    tok = em.tokenizer
    with open(out_dir / f"{prefix}generated_predictions.jsonl", "w", encoding="utf-8") as f:
        for msgs, pred, label in zip(prompts, predictions, labels):
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            f.write(json.dumps({"prompt": text, "predict": pred, "label": label}, ensure_ascii=False) + "\n")
    steps = -(-len(prompts) // em.batch_size)
    results = {f"predict_{k}": v for k, v in scores.items()}
    results.update({
        "predict_runtime": round(runtime, 4),
        "predict_samples_per_second": round(len(prompts) / runtime, 3) if runtime > 0 else None,
        "predict_steps_per_second": round(steps / runtime, 3) if runtime > 0 else None,
        "predict_model_preparation_time": round(em.timings.get("load", 0.0), 4),
    })
    (out_dir / f"{prefix}predict_results.json").write_text(json.dumps(results, indent=2) + "\n")
    return {"kind": "generation", "samples": len(prompts), **scores, "runtime_seconds": round(runtime, 3)}


def evaluate_choice(em: EvalModel, examples: list[dict[str, Any]], shots_pool: list[dict[str, Any]] | None,
                    few_shot: int, scoring: str, out_dir: Path, prefix: str = "") -> dict[str, Any]:
    """Multiple-choice accuracy → choice_predictions.jsonl + choice_results.json."""
    started = time.time()
    own = shots_pool is None
    pool = examples if own else shots_pool
    prompts, cands = [], []
    for i, ex in enumerate(examples):
        msgs, c = choice_messages(ex, pick_shots(ex, i if own else None, pool, few_shot), scoring)
        prompts.append(msgs)
        cands.append(c)
    scores = choice_loglikelihoods(em, prompts, cands, per_token=scoring == "text")
    picks = [max(range(len(s)), key=s.__getitem__) for s in scores]
    correct = [int(p == ex["answer"]) for p, ex in zip(picks, examples)]
    subjects: dict[str, list[int]] = {}
    for ex, ok in zip(examples, correct):
        if ex.get("subject") is not None:
            subjects.setdefault(ex["subject"], []).append(ok)
    accuracy = round(100.0 * sum(correct) / max(len(correct), 1), 4)
    with open(out_dir / f"{prefix}choice_predictions.jsonl", "w", encoding="utf-8") as f:
        for ex, s, p in zip(examples, scores, picks):
            f.write(json.dumps({"question": ex["question"], "subject": ex.get("subject"),
                                "answer": CHOICE_LETTERS[ex["answer"]], "predict": CHOICE_LETTERS[p],
                                "loglikelihoods": [round(v, 4) for v in s]}, ensure_ascii=False) + "\n")
    results = {
        "accuracy": accuracy,
        "samples": len(examples),
        "few_shot": few_shot,
        "scoring": scoring,
        "subjects": {k: round(100.0 * sum(v) / len(v), 4) for k, v in sorted(subjects.items())},
        "runtime_seconds": round(time.time() - started, 3),
    }
    (out_dir / f"{prefix}choice_results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return {"kind": "choice", **results}


def overall(per_dataset: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The short summary (status, metrics): each score averaged over the datasets that have it,
    weighted by their samples; `samples` counts every evaluated sample."""
    out: dict[str, float] = {}
    for key in ("accuracy", *GENERATION_METRICS):
        rows = [(r[key], r["samples"]) for r in per_dataset.values() if r.get(key) is not None]
        total = sum(n for _, n in rows)
        if total:
            out[key] = round(sum(v * n for v, n in rows) / total, 4)
    out["samples"] = sum(int(r.get("samples") or 0) for r in per_dataset.values())
    return out


def evaluate_datasets(em: EvalModel, datasets: list[tuple[str, str, list[dict[str, Any]]]], out_dir: Path, *,
                      max_new_tokens: int = 128, few_shot: int = 0, shots_pool: list[dict[str, Any]] | None = None,
                      scoring: str = "letter") -> dict[str, Any]:
    """Every (name, kind, examples) dataset → files in `out_dir` (prefixed by the dataset's name when
    there are several) and {"datasets": {name: results}, "eval": overall}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not datasets or not any(ex for _, _, ex in datasets):
        raise DataError("no examples to evaluate", "evaluation data")
    results: dict[str, dict[str, Any]] = {}
    for name, kind, examples in datasets:
        prefix = f"{name}_" if len(datasets) > 1 else ""
        if kind == "choice":
            results[name] = evaluate_choice(em, examples, shots_pool, few_shot, scoring, out_dir, prefix)
        else:
            results[name] = evaluate_generation(em, examples, max_new_tokens, out_dir, prefix)
        log.info("eval %s: %s", name, {k: v for k, v in results[name].items() if k != "subjects"})
    return {"datasets": results, "eval": overall(results)}


def load_eval_model(model_path: str, adapter: str | None, model_spec, template: str | None, *, cutoff_len: int = 2048,
                    batch_size: int = 8, where: str = "spec.model.name") -> EvalModel:
    """The policy for inference: the model (compute dtype of the machine), its adapter applied
    (not merged, not trainable), on the GPU when there is one."""
    import torch

    from .models import compute_dtype, load_model, load_tokenizer

    started = time.time()
    tok = load_tokenizer(adapter or model_path, model_spec, template, where)
    m = load_model(model_path, model_spec, dtype=compute_dtype(model_spec), where=where)
    if adapter:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, adapter)
    if torch.cuda.is_available() and not getattr(m, "hf_device_map", None):
        m = m.to("cuda")
    m.eval()
    return EvalModel(m, tok, cutoff_len=cutoff_len, batch_size=batch_size, timings={"load": time.time() - started})


def eval_main(args) -> int:
    """`kubetune eval`: the eval stage's code on local files, without a FineTuneJob."""
    import re

    from pydantic import ValidationError

    from .models import adapter_base
    from .api.spec import DatasetSpec, ModelSpec, format_validation_error
    from .stages.evaluate import load_eval_data

    model, adapter = args.model, args.adapter
    if adapter is None and (Path(model) / "adapter_config.json").exists():
        adapter, model = model, adapter_base(model)

    columns = {}
    for pair in args.column:
        role, sep, column = pair.partition("=")
        if not sep or not role.strip() or not column.strip():
            raise UserError(f"{pair!r}: write ROLE=COLUMN, e.g. question=q", "--column")
        columns[role.strip()] = column.strip()

    def spec(path: str, n: int, fmt: str) -> DatasetSpec:
        name = re.sub(r"[^a-z0-9-]+", "-", Path(path).stem.lower()).strip("-")[:50] or "data"
        try:
            return DatasetSpec(name=name if n == 0 else f"{name}-{n}", source=str(Path(path).resolve()),
                               format=fmt, max_samples=args.max_samples, columns=columns)
        except ValidationError as err:
            raise UserError("; ".join(format_validation_error(err)), "--data") from None

    datasets = [spec(p, n, args.format) for n, p in enumerate(args.data)]
    data = load_eval_data(datasets, None)
    pool = None
    if args.few_shot_data:
        pool = [ex for _, _, exs in load_eval_data([spec(args.few_shot_data, 0, "choice")], None) for ex in exs]
    em = load_eval_model(model, adapter, ModelSpec(name=model), args.template, cutoff_len=args.cutoff_len,
                         batch_size=args.batch_size, where="--model")
    out = Path(args.out)
    results = evaluate_datasets(em, data, out, max_new_tokens=args.max_new_tokens, few_shot=args.few_shot,
                                shots_pool=pool, scoring=args.scoring)
    summary = {"type": "eval", "model": model, "adapter": adapter, **results}
    (out / "run.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(results["eval"]))
    print(f"kubetune: results in {out}", file=sys.stderr)
    return 0
