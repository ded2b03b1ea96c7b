"""Dataset loading and formats: alpaca, sharegpt, OpenAI messages, text, LLaMA-Factory column
mappings, and the errors a user gets for broken data."""

from __future__ import annotations

import csv
import json

import pytest

from kubetune.runtime.data.formats import to_examples
from kubetune.runtime.data.loaders import load_records
from kubetune.runtime.data.prepare import tokenize_conversations, tokenize_text
from kubetune.runtime.data.templates import TEMPLATES
from kubetune.runtime.api.errors import DataError
from kubetune.runtime.api.spec import DatasetSpec


def ds(tmp_path, records, name="d", suffix=".json", **kw) -> DatasetSpec:
    f = tmp_path / f"{name}{suffix}"
    if suffix == ".jsonl":
        f.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        f.write_text(json.dumps(records))
    return DatasetSpec(name=name, source=str(f), **kw)


def test_alpaca_with_system_input_and_history(tmp_path):
    spec = ds(tmp_path, [{"instruction": "Add", "input": "2+2", "output": "4", "system": "Be brief.", "history": [["Hi", "Hello"]]}])
    [ex] = to_examples(load_records(spec), spec, "conversation")
    assert ex["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Add\n2+2"},
        {"role": "assistant", "content": "4"},
    ]


def test_sharegpt_with_custom_tags(tmp_path):
    records = [{"conv": [{"who": "u", "text": "Hi"}, {"who": "a", "text": "Hello"}], "sys": "S"}]
    spec = ds(tmp_path, records, format="sharegpt", columns={"messages": "conv", "system": "sys"},
              tags={"roleTag": "who", "contentTag": "text", "userTag": "u", "assistantTag": "a"})
    [ex] = to_examples(load_records(spec), spec, "conversation")
    assert [m["role"] for m in ex["messages"]] == ["system", "user", "assistant"]
    assert ex["messages"][2]["content"] == "Hello"


def test_openai_messages(tmp_path):
    records = [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]
    spec = ds(tmp_path, records, format="messages", suffix=".jsonl")
    assert to_examples(load_records(spec), spec, "conversation") == records


def test_llama_factory_column_mapping(tmp_path):
    """dataset_info.json: {"columns": {"prompt": "question", "response": "answer"}}"""
    spec = ds(tmp_path, [{"question": "Q?", "answer": "A."}], columns={"prompt": "question", "response": "answer"})
    [ex] = to_examples(load_records(spec), spec, "conversation")
    assert ex["messages"] == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]


def test_text_for_pretraining_with_prompt_mapping(tmp_path):
    spec = ds(tmp_path, [{"content": "Plain text."}], format="text", columns={"prompt": "content"})
    assert to_examples(load_records(spec), spec, "text") == [{"text": "Plain text."}]


def test_parquet_csv_and_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "mixed"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{"instruction": "a", "output": "b"}]), folder / "1.parquet")
    with (folder / "2.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "output"])
        w.writeheader()
        w.writerow({"instruction": "c", "output": "d"})
    spec = DatasetSpec(name="m", source=str(folder))
    records = load_records(spec)
    assert [r["instruction"] for r in records] == ["a", "c"]


def test_max_samples(tmp_path):
    spec = ds(tmp_path, [{"instruction": str(i), "output": "x"} for i in range(10)], maxSamples=3)
    assert len(load_records(spec)) == 3


# ------------------------------------------------------------------------------------ bad data


def test_malformed_json_line_names_line_number(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    with pytest.raises(DataError, match=r"malformed JSON on line 2") as err:
        load_records(DatasetSpec(name="bad", source=str(f)))
    assert "bad.jsonl" in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found") as err:
        load_records(DatasetSpec(name="gone", source=str(tmp_path / "nope.json")))
    assert "dataset 'gone'" in str(err.value)


def test_empty_dataset(tmp_path):
    f = tmp_path / "empty.json"
    f.write_text("[]")
    with pytest.raises(DataError, match="the dataset is empty"):
        load_records(DatasetSpec(name="e", source=str(f)))


def test_missing_mapped_column_lists_what_is_there(tmp_path):
    spec = ds(tmp_path, [{"question": "Q", "answer": "A"}], columns={"prompt": "question"})
    with pytest.raises(DataError) as err:
        to_examples(load_records(spec), spec, "conversation")
    msg = str(err.value)
    assert "'output'" in msg and "answer, question" in msg and "columns:" in msg


def test_unsupported_file_type(tmp_path):
    f = tmp_path / "data.txt"
    f.write_text("hello")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_records(DatasetSpec(name="t", source=str(f)))


def test_sharegpt_unknown_role(tmp_path):
    spec = ds(tmp_path, [{"conversations": [{"from": "robot", "value": "x"}]}], format="sharegpt")
    with pytest.raises(DataError, match=r"record 0: turn 0 has role 'robot'"):
        to_examples(load_records(spec), spec, "conversation")


def test_conversation_must_end_with_assistant(tmp_path):
    turns = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}]
    spec = ds(tmp_path, [{"messages": turns}], format="messages")
    with pytest.raises(DataError, match="must end with an assistant turn"):
        to_examples(load_records(spec), spec, "conversation")


def test_empty_answer_rejected(tmp_path):
    spec = ds(tmp_path, [{"instruction": "Q", "output": "  "}])
    with pytest.raises(DataError, match=r"record 0: column 'output' \(response\) is empty"):
        to_examples(load_records(spec), spec, "conversation")


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot load Hugging Face dataset 'someorg/somedata'"):
        load_records(DatasetSpec(name="hub", source="someorg/somedata"))


def test_format_that_cannot_feed_the_stage(tmp_path):
    spec = ds(tmp_path, [{"text": "x"}], format="text")
    with pytest.raises(DataError, match="format 'text' cannot feed this stage"):
        to_examples(load_records(spec), spec, "conversation")


# -------------------------------------------------------------------------------- tokenization


def test_assistant_mask_covers_exactly_the_answers(tiny_tokenizer):
    conv = [{"messages": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am Kubi."},
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello from Kubi!"},
    ]}]
    out = tokenize_conversations(conv, tiny_tokenizer)
    ids, mask = out["input_ids"][0], out["assistant_masks"][0]
    learned = tiny_tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "I am Kubi.<|im_end|>Hello from Kubi!<|im_end|>"


def test_prefix_fallback_for_templates_without_generation_markers(tiny_tokenizer):
    """A hub template has no {% generation %} markers: masks come from rendered prefixes."""
    tok = tiny_tokenizer
    plain = TEMPLATES["chatml"]["template"].replace("{% generation %}", "").replace("{% endgeneration %}", "")
    original = tok.chat_template
    try:
        tok.chat_template = plain
        conv = [{"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Kubi."}]}]
        out = tokenize_conversations(conv, tok)
    finally:
        tok.chat_template = original
    learned = tok.decode([i for i, m in zip(out["input_ids"][0], out["assistant_masks"][0]) if m])
    assert learned == "I am Kubi.<|im_end|>"


def test_text_tokenization_closes_documents_with_eos(tiny_tokenizer):
    out = tokenize_text([{"text": "Packing puts samples together."}], tiny_tokenizer)
    assert out["input_ids"][0][-1] == tiny_tokenizer.eos_token_id


# ------------------------------------------------------------------ column paths (SQuAD nesting)

SQUAD_RECORD = {"id": "q1", "title": "Rivers", "context": "The Nile flows north.", "question": "Which way does the Nile flow?",
                "answers": {"text": ["north", "northwards"], "answer_start": [16, 16]}}
SQUAD_COLUMNS = {"prompt": "context", "query": "question", "response": "answers.text[0]"}


def test_a_column_path_takes_the_first_squad_answer(tmp_path):
    spec = ds(tmp_path, [SQUAD_RECORD], suffix=".jsonl", columns=SQUAD_COLUMNS)
    [ex] = to_examples(load_records(spec), spec, "conversation")
    assert ex["messages"] == [
        {"role": "user", "content": "The Nile flows north.\nWhich way does the Nile flow?"},
        {"role": "assistant", "content": "north"},
    ]
    last = ds(tmp_path, [SQUAD_RECORD], name="e", columns={**SQUAD_COLUMNS, "response": "answers.text[-1]"})
    assert to_examples(load_records(last), last, "conversation")[0]["messages"][-1]["content"] == "northwards"


@pytest.mark.parametrize("path,message", [
    ("answers.txt[0]", "column path 'answers.txt[0]' (response): 'answers' has no key 'txt' (its keys: text, answer_start)"),
    ("answers.text[5]", "column path 'answers.text[5]' (response): 'answers.text' has 2 item(s): no [5]"),
    ("answers[0]", "column path 'answers[0]' (response): 'answers' is a mapping, not a list: cannot take [0]"),
    ("answers.text", "column 'answers.text' (response) must be text, got list"),
    ("title.text", "column path 'title.text' (response): 'title' is text, not a mapping: cannot take .text"),
])
def test_a_column_path_that_does_not_fit_the_record_names_where_it_stopped(tmp_path, path, message):
    spec = ds(tmp_path, [SQUAD_RECORD], columns={**SQUAD_COLUMNS, "response": path})
    with pytest.raises(DataError) as err:
        to_examples(load_records(spec), spec, "conversation")
    assert message in str(err.value) and "record 0" in str(err.value)


def test_a_column_named_like_a_path_is_used_as_it_is(tmp_path):
    """Mappings written before paths existed keep their meaning: a flat `a.b` column wins."""
    spec = ds(tmp_path, [{"q": "Hi", "answer.text": "flat", "answer": {"text": "nested"}}],
              columns={"prompt": "q", "response": "answer.text"})
    assert to_examples(load_records(spec), spec, "conversation")[0]["messages"][-1]["content"] == "flat"


def test_a_missing_nested_column_is_reported_with_the_columns_there(tmp_path):
    spec = ds(tmp_path, [{"question": "Q", "context": "C"}], columns=SQUAD_COLUMNS)
    with pytest.raises(DataError, match="column 'answers.text\\[0\\]' .*the records have: context, question"):
        to_examples(load_records(spec), spec, "conversation")


def test_column_paths_reach_preference_and_prompt_data(tmp_path):
    rec = {"q": {"text": "Best colour?"}, "pair": {"good": ["Blue."], "bad": ["Mud."]}, "gold": "Blue."}
    pref = ds(tmp_path, [rec], name="p", format="preference",
              columns={"prompt": "q.text", "chosen": "pair.good[0]", "rejected": "pair.bad[0]"})
    [ex] = to_examples(load_records(pref), pref, "preference")
    assert ex["prompt"][-1]["content"] == "Best colour?" and ex["chosen"][0]["content"] == "Blue."
    prompt = ds(tmp_path, [rec], name="r", format="prompt", columns={"prompt": "q.text"})
    [ex] = to_examples(load_records(prompt), prompt, "prompt")
    assert ex["prompt"] == [{"role": "user", "content": "Best colour?"}] and ex["gold"] == "Blue." and "q" not in ex
