"""The pure parts of evaluation: LLaMA-Factory's ROUGE/BLEU, the multiple-choice format, few-shot
prompts, the short summary, and how it reaches /progress, the metrics and the operator's status."""

from __future__ import annotations

import json

import pytest

from kubetune.runtime.data.formats import to_examples
from kubetune.runtime.api.errors import DataError
from kubetune.runtime.evaluate import choice_messages, generation_scores, overall, pick_shots
from kubetune.runtime.api.spec import DatasetSpec


def test_generation_scores_follow_llamafactory():
    # identical answers score 100 everywhere; no shared word scores 0 (BLEU keeps its smoothing floor)
    assert generation_scores(["I am Kubi."], ["I am Kubi."]) == {"rouge-1": 100.0, "rouge-2": 100.0,
                                                                 "rouge-l": 100.0, "bleu-4": 100.0}
    zero = generation_scores(["xyz"], ["I am Kubi."])
    assert zero["rouge-1"] == zero["rouge-2"] == zero["rouge-l"] == 0.0 and zero["bleu-4"] < 10
    # the mean over samples of per-sample scores, computed as LLaMA-Factory's ComputeSimilarity
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    preds, labels = ["I am kubetune bot", "我是一个模型"], ["I am kubetune assistant", "我是一个小模型"]
    want = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    for p, l in zip(preds, labels):
        r = Rouge().get_scores(" ".join(jieba.cut(p)), " ".join(jieba.cut(l)))[0]
        for k in ("rouge-1", "rouge-2", "rouge-l"):
            want[k] += round(r[k]["f"] * 100, 4) / 2
        want["bleu-4"] += round(sentence_bleu([list(l)], list(p), smoothing_function=SmoothingFunction().method3) * 100, 4) / 2
    got = generation_scores(preds, labels)
    assert got == {k: round(v, 4) for k, v in want.items()}
    assert 0 < got["rouge-l"] < 100 and 0 < got["bleu-4"] < 100
    # an empty prediction scores 0, not an error
    assert generation_scores([""], ["I am Kubi."])["rouge-l"] == 0.0


def choice(records, **columns):
    return to_examples(records, DatasetSpec(name="q", source="q.jsonl", format="choice", columns=columns), "choice")


def test_choice_format_letter_columns_lists_and_mapping():
    [a] = choice([{"question": "2+2?", "A": "3", "B": "4", "C": "5", "D": "22", "answer": "b", "subject": "math"}])
    assert a == {"question": "2+2?", "choices": ["3", "4", "5", "22"], "answer": 1, "subject": "math"}
    [b] = choice([{"question": "Sky?", "choices": ["blue", "green"], "answer": 0}])
    assert b == {"question": "Sky?", "choices": ["blue", "green"], "answer": 0, "subject": None}
    [c] = choice([{"q": "Sky?", "opts": ["blue", "green"], "gold": "B", "cat": "nature"}],
                 question="q", choices="opts", answer="gold", subject="cat")
    assert c["answer"] == 1 and c["subject"] == "nature"


@pytest.mark.parametrize("record,fragment", [
    ({"question": "x", "A": "1", "B": "2", "answer": "C"}, "must be one of the letters A, B"),
    ({"question": "x", "A": "1", "B": "2", "answer": ""}, "must be one of the letters A, B"),
    ({"question": "x", "A": "1", "answer": "A"}, "needs 2 to 10 choices"),
    ({"question": "x", "choices": "A or B", "answer": "A"}, "must be a list of texts"),
    ({"question": "", "A": "1", "B": "2", "answer": "A"}, "is empty"),
])
def test_choice_format_errors_name_the_record_and_column(record, fragment):
    with pytest.raises(DataError) as err:
        choice([record])
    assert fragment in str(err.value) and "record 0" in str(err.value)


def test_choice_prompts_and_few_shot():
    pool = choice([
        {"question": f"q{i}", "A": "x", "B": "y", "answer": "AB"[i % 2], "subject": "s1" if i < 3 else "s2"}
        for i in range(5)
    ])
    # same subject first, never the question itself, then the others in file order
    assert [s["question"] for s in pick_shots(pool[0], 0, pool, 3)] == ["q1", "q2", "q3"]
    assert [s["question"] for s in pick_shots(pool[4], 4, pool, 2)] == ["q3", "q0"]
    assert pick_shots(pool[0], 0, pool, 0) == []
    msgs, cands = choice_messages(pool[4], pick_shots(pool[4], 4, pool, 1), "letter")
    assert cands == ["A", "B"]
    assert msgs == [
        {"role": "system", "content": "The following are multiple choice questions (with answers) about s2."},
        {"role": "user", "content": "q3\nA. x\nB. y\nAnswer:"}, {"role": "assistant", "content": "B"},
        {"role": "user", "content": "q4\nA. x\nB. y\nAnswer:"},
    ]
    msgs, cands = choice_messages(pool[1], [pool[0]], "text")
    assert cands == ["x", "y"] and msgs[1:] == [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "x"},
                                                  {"role": "user", "content": "q1"}]


def test_overall_summary_weights_by_samples():
    per = {"a": {"kind": "choice", "accuracy": 50.0, "samples": 10},
           "b": {"kind": "choice", "accuracy": 100.0, "samples": 30},
           "c": {"kind": "generation", "rouge-1": 40.0, "rouge-2": 20.0, "rouge-l": 30.0, "bleu-4": 10.0, "samples": 5}}
    assert overall(per) == {"accuracy": 87.5, "rouge-1": 40.0, "rouge-2": 20.0, "rouge-l": 30.0, "bleu-4": 10.0,
                            "samples": 45}


def test_eval_results_reach_progress_metrics_and_status():
    from prometheus_client import generate_latest

    from kubetune.operator import status as s
    from kubetune.runtime.metrics import MetricsCallback
    from kubetune.runtime.api.progress import ProgressReport

    m = MetricsCallback(job="j", namespace="ns", stage="eval", stage_type="eval", method="lora")
    assert m.progress.snapshot()["eval"] is None
    m.set_eval({"accuracy": 62.5, "rouge-l": 41.25, "samples": 12},
               {"quiz": {"accuracy": 62.5, "samples": 8}, "held-out": {"rouge-l": 41.25, "samples": 4}})
    doc = m.progress.snapshot()
    assert doc["eval"] == {"accuracy": 62.5, "rouge-l": 41.25, "samples": 12}
    text = generate_latest(m.registry).decode()
    assert 'kubetune_eval_score_ratio{dataset="quiz",job="j",metric="accuracy",namespace="ns",rank="0",stage="eval"} 0.625' in text
    assert 'kubetune_eval_score_ratio{dataset="held-out",job="j",metric="rouge-l",namespace="ns",rank="0",stage="eval"} 0.4125' in text
    assert 'kubetune_eval_samples{dataset="quiz",job="j",namespace="ns",rank="0",stage="eval"} 8.0' in text
    # the operator's side: the report (JSON, as the termination message carries it) → status.stages[].eval
    report = ProgressReport.model_validate(json.loads(json.dumps(doc)))
    assert s.eval_summary(report) == {"accuracy": 62.5, "rouge-l": 41.25, "samples": 12}
    assert s.eval_text(s.eval_summary(report)) == "accuracy 62.5, rouge-l 41.25"
    assert s.eval_summary(ProgressReport(eval=None)) is None and s.eval_summary(ProgressReport(eval={"bleu": 1})) is None
    with pytest.raises(ValueError):  # not a report: the operator logs it and leaves the status as it is
        ProgressReport.model_validate({"eval": {"accuracy": "high"}})


def test_describe_shows_an_eval_stages_scores():
    from kubetune.runtime.kubectl_plugin import describe_text

    obj = {"metadata": {"name": "j", "namespace": "ml"},
           "spec": {"model": {"name": "m"}, "stages": [{"name": "sft", "type": "sft"}, {"name": "eval", "type": "eval"}]},
           "status": {"phase": "Succeeded", "stages": [
               {"name": "sft", "type": "sft", "phase": "Succeeded", "output": {"uri": "s3://b/j/sft/output"}},
               {"name": "eval", "type": "eval", "phase": "Succeeded", "output": {"uri": "s3://b/j/eval/output"},
                "eval": {"accuracy": 62.5, "rouge-l": 41.25, "samples": 12}}]}}
    text = describe_text(obj, [], now=0)
    assert "Stages:       sft (sft/lora) → eval (eval)" in text
    [row] = [line for line in text.splitlines() if line.strip().startswith("eval ")]
    assert row.rstrip().endswith("accuracy 62.5, rouge-l 41.25 → s3://b/j/eval/output"), row
