"""Large datasets on unified memory: `streaming: true` reads and tokenizes a JSONL a batch at a time
while training (a `datasets.IterableDataset`, maxSteps required), and `preprocessingWorkers`
tokenizes in several processes with the same result as one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.runtime.data import prepare
from kubetune.runtime.api.spec import DatasetSpec, SpecError, parse_job
from tests.conftest import IDENTITY, job_doc, read_log, run_doc


def _jsonl(path: Path, repeat: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for n in range(repeat):
            for q, a in IDENTITY:
                f.write(json.dumps({"instruction": q, "input": "", "output": f"{a} ({n})"}) + "\n")
    return path


def test_streaming_sft_run_trains_with_max_steps(tiny_model, tmp_path):
    data = _jsonl(tmp_path / "data" / "big.jsonl", 20)
    stage = {"name": "sft", "type": "sft", "method": "lora", "lora": {"rank": 4},
             "hyperparameters": {"maxSteps": 3, "batchSize": 2, "cutoffLen": 64, "precision": "fp32", "valSize": 0}}
    doc = job_doc("stream", tiny_model, [{"name": "big", "source": str(data), "streaming": True}], [stage],
                  tmp_path / "saves")
    assert run_doc(doc, tmp_path) == 0
    out = tmp_path / "saves" / "sft" / "output"
    summary = json.loads((out / "run.json").read_text())
    assert summary["steps"] == 3 and summary["tokens"] > 0
    assert [r["loss"] for r in read_log(out) if "loss" in r]
    # the spec asks for maxSteps with a stream: without it the job is refused (a CEL rule too)
    del doc["spec"]["stages"][0]["hyperparameters"]["maxSteps"]
    with pytest.raises(SpecError, match="streaming dataset needs hyperparameters.maxSteps"):
        parse_job(doc)


def test_stream_is_tokenized_lazily(tiny_tokenizer, tmp_path, monkeypatch):
    """Taking the first examples tokenizes one batch of records, not the file."""
    from datasets import IterableDataset

    from kubetune.runtime.data import loaders

    data = _jsonl(tmp_path / "big.jsonl", 200)  # 1600 records
    seen = []
    real = prepare.to_examples

    def counting(records, *a, **k):
        seen.append(len(records))
        return real(records, *a, **k)

    def whole_file(*a, **k):
        raise AssertionError("a streaming dataset must not be read whole")

    monkeypatch.setattr(prepare, "to_examples", counting)
    monkeypatch.setattr(loaders, "read_local", whole_file)
    ds = DatasetSpec(name="big", source=str(data), streaming=True)
    stream = prepare.stream_examples([ds], "conversation", tiny_tokenizer, "test", cutoff_len=None)
    assert isinstance(stream, IterableDataset)
    assert isinstance(loaders.stream_records(ds), IterableDataset)
    first = list(stream.take(3))
    assert len(first) == 3 and all(r["input_ids"] and any(r["assistant_masks"]) for r in first)
    assert sum(seen) <= 256, f"tokenized {sum(seen)} records to give 3"  # one batch of the 1600
    assert sum(1 for _ in stream) == 1600  # and the whole stream is there when iterated


def test_preprocessing_workers_give_the_same_tokens(tiny_tokenizer):
    examples = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"{a} {n}"}]}
                for n in range(25) for q, a in IDENTITY]
    one = prepare.tokenize_examples(examples, "conversation", tiny_tokenizer, "test", workers=1)
    two = prepare.tokenize_examples(examples, "conversation", tiny_tokenizer, "test", workers=2)
    assert len(one["input_ids"]) == 200
    assert one == two
    texts = [{"text": f"{q} {a}"} for q, a in IDENTITY] * 5
    assert prepare.tokenize_examples(texts, "text", tiny_tokenizer, "t", workers=3) == \
        prepare.tokenize_examples(texts, "text", tiny_tokenizer, "t")


CUT = 40  # shorter than some examples, long enough to keep an assistant token in each


def test_a_stream_with_a_dataset_read_whole_and_stages_that_cannot_stream(tiny_tokenizer, tmp_path):
    from kubetune.runtime.api.errors import UserError
    from tests.conftest import write_alpaca

    big = DatasetSpec(name="big", source=str(_jsonl(tmp_path / "big.jsonl", 3)), streaming=True)
    small = DatasetSpec(name="small", source=str(write_alpaca(tmp_path / "small.json")))
    rows = list(prepare.stream_examples([small, big], "conversation", tiny_tokenizer, "t", cutoff_len=CUT))
    assert len(rows) == len(IDENTITY) * 4  # the whole dataset first, then the stream, in order
    assert all(len(r["input_ids"]) <= CUT for r in rows) and any(len(r["input_ids"]) == CUT for r in rows)  # truncated
    whole = prepare.tokenize_examples(prepare.to_examples(prepare.load_records(small), small, "conversation"),
                                      "conversation", tiny_tokenizer, "t")
    assert [r["input_ids"] for r in rows[: len(IDENTITY)]] == [i[:CUT] for i in whole["input_ids"]]
    with pytest.raises(UserError, match="streaming: true, which only pt and sft stages support"):
        prepare.load_examples([big], "preference")
