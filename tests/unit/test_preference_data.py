"""Preference and KTO data: every accepted layout (LLaMA-Factory ranking datasets, TRL's explicit
and implicit prompt, KTO labels and kto_tag) and the bad inputs, each rejected with a message
that names the dataset, the record and the column."""

from __future__ import annotations

import json

import pytest

from kubetune.runtime.data.formats import to_examples
from kubetune.runtime.data.loaders import load_records
from kubetune.runtime.api.errors import DataError
from kubetune.runtime.api.spec import DatasetSpec


def ds(tmp_path, records, name="prefs", **kw) -> DatasetSpec:
    f = tmp_path / f"{name}.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    return DatasetSpec(name=name, source=str(f), **kw)


def convert(spec, kind):
    return to_examples(load_records(spec), spec, kind)


def user(t):
    return {"role": "user", "content": t}


def assistant(t):
    return {"role": "assistant", "content": t}


def bad(spec, kind) -> str:
    with pytest.raises(DataError) as err:
        convert(spec, kind)
    msg = str(err.value)
    assert f"dataset {spec.name!r}" in msg and spec.source in msg, msg  # the dataset and its file
    return msg


# ------------------------------------------------------------------------------------- accepted


def test_trl_explicit_prompt(tmp_path):
    spec = ds(tmp_path, [{"prompt": "Q", "chosen": "good", "rejected": "bad", "system": "Be kind."}], format="preference")
    [ex] = convert(spec, "preference")
    assert ex == {"prompt": [{"role": "system", "content": "Be kind."}, user("Q")],
                  "chosen": [assistant("good")], "rejected": [assistant("bad")]}


def test_trl_conversational_explicit_prompt(tmp_path):
    spec = ds(tmp_path, [{"prompt": [user("Hi"), assistant("Hello"), user("Q")], "chosen": [assistant("good")],
                          "rejected": [assistant("bad")]}], format="preference")
    [ex] = convert(spec, "preference")
    assert ex["prompt"][-1] == user("Q") and len(ex["prompt"]) == 3 and ex["chosen"] == [assistant("good")]


def test_trl_implicit_prompt(tmp_path):
    spec = ds(tmp_path, [{"chosen": [user("Q"), assistant("good")], "rejected": [user("Q"), assistant("bad")]}], format="preference")
    [ex] = convert(spec, "preference")
    assert ex == {"prompt": [user("Q")], "chosen": [assistant("good")], "rejected": [assistant("bad")]}


def test_alpaca_ranking_with_history_and_column_mapping(tmp_path):
    spec = ds(tmp_path, [{"q": "Q", "input": "ctx", "history": [["Hi", "Hello"]], "better": "good", "worse": "bad"}],
              format="alpaca", ranking=True, columns={"prompt": "q", "chosen": "better", "rejected": "worse"})
    [ex] = convert(spec, "preference")
    assert ex["prompt"] == [user("Hi"), assistant("Hello"), user("Q\nctx")]
    assert ex["chosen"] == [assistant("good")] and ex["rejected"] == [assistant("bad")]


def test_sharegpt_ranking(tmp_path):
    spec = ds(tmp_path, [{"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": "good"},
                          "rejected": {"from": "gpt", "value": "bad"}}], format="sharegpt", ranking=True)
    [ex] = convert(spec, "preference")
    assert ex == {"prompt": [user("Q")], "chosen": [assistant("good")], "rejected": [assistant("bad")]}


def test_kto_boolean_label_and_llama_factory_kto_tag(tmp_path):
    spec = ds(tmp_path, [{"prompt": "Q", "completion": "good", "label": True}, {"prompt": "Q", "completion": "bad", "label": False}], format="kto")
    assert [e["label"] for e in convert(spec, "kto")] == [True, False]
    spec = ds(tmp_path, [{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "bad"}], "kto_tag": False}],
              name="lf", format="sharegpt")
    [ex] = convert(spec, "kto")
    assert ex == {"prompt": [user("Q")], "completion": [assistant("bad")], "label": False}


# ------------------------------------------------------------------------------------ rejected


def test_missing_rejected_column_names_it_and_lists_what_is_there(tmp_path):
    msg = bad(ds(tmp_path, [{"prompt": "Q", "chosen": "good"}], format="preference"), "preference")
    assert "column 'rejected'" in msg and "chosen, prompt" in msg and "columns:" in msg


def test_missing_chosen_in_one_record(tmp_path):
    records = [{"prompt": "Q", "chosen": "good", "rejected": "bad"}] * 2 + [{"prompt": "Q", "chosen": None, "rejected": "bad"}]
    msg = bad(ds(tmp_path, records, format="preference"), "preference")
    assert "record 2: column 'chosen' (chosen) is missing" in msg


def test_empty_rejected_answer(tmp_path):
    records = [{"instruction": "Q", "chosen": "good", "rejected": "  "}]
    msg = bad(ds(tmp_path, records, format="alpaca", ranking=True), "preference")
    assert "record 0: column 'rejected' (rejected) is empty" in msg


def test_empty_chosen_message_in_sharegpt(tmp_path):
    records = [{"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": ""},
                "rejected": {"from": "gpt", "value": "bad"}}]
    msg = bad(ds(tmp_path, records, format="sharegpt", ranking=True), "preference")
    assert "record 0: column 'chosen' (chosen) is empty" in msg


def test_answer_that_is_not_text(tmp_path):
    msg = bad(ds(tmp_path, [{"prompt": "Q", "chosen": 42, "rejected": "bad"}], format="preference"), "preference")
    assert "record 0: column 'chosen' (chosen) must be text or a message" in msg


def test_implicit_prompt_pairs_must_share_the_prompt(tmp_path):
    records = [{"chosen": [user("Q"), assistant("good")], "rejected": [user("other Q"), assistant("bad")]}]
    msg = bad(ds(tmp_path, records, format="preference"), "preference")
    assert "record 0" in msg and "share every turn but the last" in msg and "'prompt'" in msg


def test_ranking_missing_on_alpaca_pairs(tmp_path):
    msg = bad(ds(tmp_path, [{"instruction": "Q", "chosen": "good", "rejected": "bad"}], format="alpaca"), "preference")
    assert "set `ranking: true`" in msg


def test_empty_kto_completion(tmp_path):
    records = [{"prompt": "Q", "completion": "good", "label": True}, {"prompt": "Q", "completion": " ", "label": False}]
    msg = bad(ds(tmp_path, records, format="kto"), "kto")
    assert "record 1: column 'completion' (completion) is empty" in msg


@pytest.mark.parametrize("label", ["yes", 1, "true", None])
def test_kto_label_that_is_not_boolean(label, tmp_path):
    records = [{"prompt": "Q", "completion": "good", "label": True}, {"prompt": "Q", "completion": "bad", "label": label}]
    msg = bad(ds(tmp_path, records, format="kto"), "kto")
    if label is None:
        assert "record 1: column 'label' (kto_tag) is missing" in msg
    else:
        assert f"record 1: column 'label' (the KTO label) must be true or false, got {label!r}" in msg


def test_kto_tag_missing_from_alpaca_records(tmp_path):
    msg = bad(ds(tmp_path, [{"instruction": "Q", "output": "A"}], format="alpaca"), "kto")
    assert "column 'kto_tag'" in msg and "instruction, output" in msg


def test_llama_factory_kto_tag_not_boolean(tmp_path):
    msg = bad(ds(tmp_path, [{"instruction": "Q", "output": "A", "kto_tag": "false"}], format="alpaca"), "kto")
    assert "record 0: column 'kto_tag' (the KTO label) must be true or false, got 'false'" in msg


def test_data_of_the_other_kind(tmp_path):
    kto = ds(tmp_path, [{"prompt": "Q", "completion": "A", "label": True}], format="kto")
    assert "format 'kto' cannot feed this stage" in bad(kto, "preference")
    pairs = ds(tmp_path, [{"prompt": "Q", "chosen": "A", "rejected": "B"}], name="pairs", format="preference")
    assert "format 'preference' cannot feed this stage" in bad(pairs, "kto")
