#!/usr/bin/env python
"""Data pipeline on CPU: template + tokenise + pack a 50k-sample alpaca set (issue 10, target 2).

Same generated data, same tokenizer (a byte-level BPE trained here, chatml template with
`{% generation %}` markers, as `runtime/tiny.py` builds), same packing (TRL best-fit-decreasing
to `--max-length` tokens), same output (input_ids + labels with the loss on assistant tokens):

* ours:     the SFT stage's path — `load_examples` (read + alpaca → messages),
            `tokenize_conversations` (batched chat template with assistant masks),
            `Dataset.from_dict`, then TRL's own `SFTTrainer._prepare_dataset` on the tokenized
            columns (labels, packing), exactly what the stage's trainer does with them.
* baseline: read the JSON, `datasets.map` alpaca → messages, then TRL's `_prepare_dataset` on the
            messages: its per-sample `apply_chat_template` map (assistant_only_loss=True, so the
            labels match ours), labels, packing.
* trl defaults: the baseline with TRL's default `assistant_only_loss=False`: no assistant mask to
            render, the loss on every token. Not the same labels (the check below says so), but
            what a plain `SFTTrainer` does, so the baseline's cost of the mask shows.

"Same tokens and labels" is checked, not assumed: a sha256 of each path's packed input_ids, of
its labels and of its packed sequence lengths (each concatenated in row order). Ours and the
baseline must agree on all three, TRL defaults on the tokens and lengths, with labels equal to its
input_ids; on any difference the script prints the digests and exits 1.

Both run in this process, one after the other, single process (`num_proc` None), with
TOKENIZERS_PARALLELISM=false as the runtime sets it. Reported: tokens/s (tokens in the packed
output / wall seconds), and the padding share of a training batch: ours padding-free (TRL's
collator with `padding_free=True` over packed rows) vs naive (the same samples, unpacked,
batched and padded to the longest).

Run: `python bench/data_pipeline.py` (50k samples; `--samples 2000` for a quick look).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from array import array
from pathlib import Path

from machine import cpu_description  # bench/machine.py (the script's folder is on sys.path)
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def make_records(n: int, seed: int = 0) -> list[dict]:
    """Alpaca-style records: instruction, optional input, output; lengths spread like the real set."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(5000)]

    def text(k):
        return " ".join(rng.choice(words) for _ in range(max(1, k))).capitalize() + "."

    out = []
    for _ in range(n):
        k = int(rng.lognormvariate(0, 0.8) * 60)
        out.append({"instruction": text(rng.randint(4, 25)), "input": text(rng.randint(3, 40)) if rng.random() < 0.4 else "",
                    "output": text(k)})
    return out


def trl_prepare(ds, tok, max_length: int, assistant_only_loss: bool):
    """TRL's SFTTrainer dataset preparation (labels, packing) without building a trainer."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_length=max_length, packing=True, packing_strategy="bfd",
                     padding_free=True, assistant_only_loss=assistant_only_loss, use_cpu=True, bf16=False,
                     report_to="none", dataset_num_proc=None)
    me = SimpleNamespace(_tokenizer=tok, chat_template=None, completion_only_loss=None)
    return SFTTrainer._prepare_dataset(me, ds, tok, args, packing=True, formatting_func=None, dataset_name="train")


def ours(path: Path, tok, max_length: int):
    from datasets import Dataset

    from kubetune.runtime.data.prepare import load_examples, tokenize_conversations
    from kubetune.runtime.api.spec import DatasetSpec

    examples = load_examples([DatasetSpec(name="alpaca", source=str(path), format="alpaca")], "conversation")
    columns = tokenize_conversations(examples, tok)
    return trl_prepare(Dataset.from_dict(columns), tok, max_length, assistant_only_loss=False), columns


def baseline(path: Path, tok, max_length: int, assistant_only_loss: bool = True):
    from datasets import Dataset

    records = json.loads(path.read_text())

    def to_messages(r):
        user = r["instruction"] + ("\n" + r["input"] if r["input"] else "")
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]}

    ds = Dataset.from_list(records).map(to_messages, remove_columns=["instruction", "input", "output"])
    return trl_prepare(ds, tok, max_length, assistant_only_loss=assistant_only_loss)


def digests(packed) -> dict[str, str]:
    """sha256 of the packed input_ids, of the labels and of the packed sequence lengths, each
    concatenated in row order as int32: equal digests, the same tokens in the same rows."""
    out = {}
    for col in ("input_ids", "labels", "seq_lengths"):
        h = hashlib.sha256()
        for row in packed[col]:
            h.update(array("i", row).tobytes())
        out[col] = h.hexdigest()
    return out


def mismatches(d: dict[str, dict[str, str]]) -> list[str]:
    """What differs from ours: anything for the baseline; tokens or lengths for TRL defaults, whose
    labels must be its input_ids (the loss on every token)."""
    bad = [f"baseline {c}" for c in ("input_ids", "labels", "seq_lengths") if d["baseline"][c] != d["ours"][c]]
    bad += [f"trl_defaults {c}" for c in ("input_ids", "seq_lengths") if d["trl_defaults"][c] != d["ours"][c]]
    if d["trl_defaults"]["labels"] != d["trl_defaults"]["input_ids"]:
        bad.append("trl_defaults labels (not its input_ids)")
    return bad


def padding_shares(packed, columns, tok, batch_rows: int, batch_samples: int, seed: int = 0) -> dict:
    """Share of pad positions in training batches: ours (packed rows, padding-free collator) vs
    naive (the unpacked samples, padded to the longest of each batch)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rng = random.Random(seed)
    free = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)
    rows = [packed[i] for i in rng.sample(range(len(packed)), min(len(packed), batch_rows * 20))]
    real = pads = 0
    for b in range(0, len(rows) - batch_rows + 1, batch_rows):
        batch = free([{"input_ids": r["input_ids"], "seq_lengths": r["seq_lengths"]} for r in rows[b : b + batch_rows]])
        n = batch["input_ids"].numel()
        real += sum(len(r["input_ids"]) for r in rows[b : b + batch_rows])
        pads += n - sum(len(r["input_ids"]) for r in rows[b : b + batch_rows])
    ours_share = pads / max(1, pads + real)
    padded = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=False)
    ids = columns["input_ids"]
    idx = list(range(len(ids)))
    rng.shuffle(idx)
    real = total = 0
    for b in range(0, min(len(idx), batch_samples * 200) - batch_samples + 1, batch_samples):
        batch = padded([{"input_ids": ids[i]} for i in idx[b : b + batch_samples]])
        total += batch["input_ids"].numel()
        real += int(batch["attention_mask"].sum())
    return {"ours_padding_free": ours_share, "naive_padded": 1 - real / total}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=50_000)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=1, help="time each path this many times, report the best")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench" / "data_pipeline.json"))
    args = ap.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import datasets

    datasets.disable_progress_bars()
    datasets.disable_caching()
    import logging

    logging.getLogger("trl").setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")
    from kubetune.runtime.tiny import train_tokenizer

    # imports (TRL, transformers' training arguments, peft: ~20 s here) happen before either clock starts
    import kubetune.runtime.data.prepare  # noqa: F401
    from trl import SFTConfig, SFTTrainer  # noqa: F401
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # noqa: F401

    work = Path(tempfile.mkdtemp(prefix="kt-data-bench-"))
    records = make_records(args.samples)
    path = work / "alpaca.json"
    path.write_text(json.dumps(records))
    tok = train_tokenizer([r["instruction"] + " " + r["output"] for r in records[:3000]], vocab_size=8000)
    print(f"{len(records)} samples, tokenizer vocab {len(tok)}, max_length {args.max_length}", flush=True)

    def timed(fn):
        best = None
        for _ in range(args.repeat):
            t = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t
            best = dt if best is None or dt < best else best
        return out, best

    (packed_ours, columns), t_ours = timed(lambda: ours(path, tok, args.max_length))
    packed_base, t_base = timed(lambda: baseline(path, tok, args.max_length))
    packed_plain, t_plain = timed(lambda: baseline(path, tok, args.max_length, assistant_only_loss=False))
    shares = padding_shares(packed_ours, columns, tok, batch_rows=4, batch_samples=8)
    runs = {"ours": (packed_ours, t_ours), "baseline": (packed_base, t_base), "trl_defaults": (packed_plain, t_plain)}
    report = {"samples": len(records), "max_length": args.max_length, "cpu": cpu_description(),
              "date": time.strftime("%Y-%m-%d")}
    for k, (packed, seconds) in runs.items():
        n = sum(len(x) for x in packed["input_ids"])
        labels = sum(sum(1 for t in x if t != -100) for x in packed["labels"])
        report[k] = {"seconds": seconds, "tokens": n, "label_tokens": labels, "rows": len(packed),
                     "tokens_per_s": n / seconds, "sha256": digests(packed)}
    report["ratio"] = report["ours"]["tokens_per_s"] / report["baseline"]["tokens_per_s"]
    report["ratio_trl_defaults"] = report["ours"]["tokens_per_s"] / report["trl_defaults"]["tokens_per_s"]
    report["padding"] = {"ours_padding_free": shares["ours_padding_free"], "naive_padded_8": shares["naive_padded"]}
    report["bfd_bin_fill"] = fill = report["ours"]["tokens"] / (len(packed_ours) * args.max_length)
    report["mismatches"] = bad = mismatches({k: report[k]["sha256"] for k in runs})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print()
    print(f"{'path':<14}{'seconds':>9}{'tokens':>12}{'label tok':>11}{'rows':>7}{'tokens/s':>11}  "
          "sha256 input_ids / labels / seq_lengths (first 12)")
    for k in runs:
        r = report[k]
        sha = " / ".join(r["sha256"][c][:12] for c in ("input_ids", "labels", "seq_lengths"))
        print(f"{k:<14}{r['seconds']:>9.1f}{r['tokens']:>12}{r['label_tokens']:>11}{r['rows']:>7}"
              f"{r['tokens_per_s']:>11.0f}  {sha}")
    print(f"ratio ours/baseline: {report['ratio']:.2f}x   (goal >= 2x)   "
          f"ours/trl defaults: {report['ratio_trl_defaults']:.2f}x")
    print(f"padding share: ours (packed, padding-free) {100 * shares['ours_padding_free']:.2f} %   "
          f"naive (8 samples padded to the longest) {100 * shares['naive_padded']:.1f} %   (goal < 2 %)")
    print(f"bfd bins filled to {100 * fill:.1f} % of {args.max_length} tokens (rows are not padded to it)")
    if bad:
        print(f"MISMATCH: {', '.join(bad)} (full digests in {args.out})", file=sys.stderr)
        return 1
    print("same tokens, labels and rows: ours = baseline; trl defaults = the same tokens, loss on every token")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
