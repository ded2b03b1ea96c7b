"""Real training of the tiny model on CPU through the preference stages (rm, dpo, orpo, simpo,
kto) and the sft → dpo → export pipeline, each showing its own signal moving the right way."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.conftest import IDENTITY, assert_quantized, job_doc, read_log, run_doc, write_alpaca

FAST = {"maxSteps": 10, "batchSize": 8, "gradientAccumulation": 1, "loggingSteps": 1, "cutoffLen": 64,
        "gradientCheckpointing": False, "lrScheduler": "constant"}

# Each question's right answer is chosen; the answer of the next question is rejected.
PAIRS = [(q, a, IDENTITY[(i + 1) % len(IDENTITY)][1]) for i, (q, a) in enumerate(IDENTITY)]
# The right answer against the same words in reverse order: pairs of (nearly) equal length, so
# that comparing whole-answer log-probabilities is not a comparison of lengths.
SALAD = [(q, a, " ".join(reversed(a.split()))) for q, a in IDENTITY]


def write_pairs(path, style="preference", pairs=PAIRS):
    """The pairs in TRL's prompt/chosen/rejected layout or LLaMA-Factory's alpaca ranking layout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if style == "preference":
        records = [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in pairs]
    else:
        records = [{"instruction": q, "input": "", "chosen": c, "rejected": r} for q, c, r in pairs]
    path.write_text(json.dumps(records))
    return path


def write_kto(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for q, c, r in PAIRS:
        records += [{"prompt": q, "completion": c, "label": True}, {"prompt": q, "completion": r, "label": False}]
    path.write_text(json.dumps(records))
    return path


def _mean(xs):
    return sum(xs) / len(xs)


def series(output, key):
    return [r[key] for r in read_log(output) if key in r]


def assert_went_down(values, factor):
    assert len(values) >= 8, values
    first, last = _mean(values[:3]), _mean(values[-3:])
    assert last < factor * first, f"did not go down enough: {first:.4f} → {last:.4f} ({values})"


def assert_went_up(values, by):
    assert len(values) >= 8, values
    first, last = _mean(values[:3]), _mean(values[-3:])
    assert last > first + by, f"did not go up enough: {first:.4f} → {last:.4f} ({values})"


def run_stages(tmp_path, tiny_model, stages, data_file, fmt="preference", **ds):
    doc = job_doc("p", tiny_model, [{"name": "prefs", "source": str(data_file), "format": fmt, **ds}], stages, tmp_path / "saves")
    assert run_doc(doc, tmp_path) == 0
    return tmp_path / "saves"


# ------------------------------------------------------------------------- scoring on the pairs


def completion_logps(model, tokenizer, pairs=PAIRS):
    """Sum of log-probabilities of the chosen and of the rejected answer after each prompt, through
    the chat template (as the trainers see them)."""
    out = []
    with torch.no_grad():
        for q, chosen, rejected in pairs:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            row = []
            for answer in (chosen, rejected):
                full = tokenizer.apply_chat_template(
                    [{"role": "user", "content": q}, {"role": "assistant", "content": answer}], tokenize=False
                )
                p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                ids = tokenizer(full, add_special_tokens=False)["input_ids"]
                assert ids[: len(p_ids)] == p_ids
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
                logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
                row.append(logp[len(p_ids) - 1 :].sum().item())
            out.append(tuple(row))
    return out


def rewards(model, tokenizer, pairs=PAIRS):
    out = []
    with torch.no_grad():
        for q, chosen, rejected in pairs:
            row = []
            for answer in (chosen, rejected):
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": q}, {"role": "assistant", "content": answer}], tokenize=False
                )
                enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
                row.append(model(**enc).logits[0, 0].item())
            out.append(tuple(row))
    return out


# ----------------------------------------------------------------------------------------- dpo


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_margin_and_accuracy_go_up_on_the_training_pairs(method, tiny_model, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_pairs(tmp_path / "prefs.json")
    settings = {"method": "lora", "lora": {"rank": 16}} if method == "lora" else {"method": "full"}
    lr = 3e-3 if method == "lora" else 1e-3
    stage = {"name": "dpo", "type": "dpo", **settings, "preference": {"beta": 0.5},
             "hyperparameters": {**FAST, "learningRate": lr}}
    out = run_stages(tmp_path, tiny_model, [stage], data) / "dpo" / "output"

    margins, accuracies = series(out, "rewards/margins"), series(out, "rewards/accuracies")
    assert abs(margins[0]) < 1e-5  # step 1 is scored before any update: policy == reference
    assert_went_up(margins, by=0.2)
    assert _mean(accuracies[-3:]) > _mean(accuracies[:3])
    summary = json.loads((out / "run.json").read_text())
    assert summary["signal"]["rewards/margins"]["final"] > summary["signal"]["rewards/margins"]["first"]
    assert summary["preference"]["lossType"] == "sigmoid" and summary["steps"] == FAST["maxSteps"]

    # On every training pair, measured here: beta * (policy − reference) log-ratio margin.
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    if method == "lora":
        from peft import PeftModel

        assert (out / "adapter_config.json").exists() and not (out / "ref").exists()
        trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out).eval()
    else:
        assert (out / "model.safetensors").exists()
        trained = AutoModelForCausalLM.from_pretrained(out).eval()
    before, after = completion_logps(base, tiny_tokenizer), completion_logps(trained, tiny_tokenizer)
    implicit = [0.5 * ((ac - bc) - (ar - br)) for (bc, br), (ac, ar) in zip(before, after)]
    assert _mean(implicit) > 0.5, implicit
    assert sum(m > 0 for m in implicit) >= 7, implicit  # 7 or 8 of the 8 pairs


def test_dpo_loss_types_match_trl_and_bad_ones_are_rejected(tiny_model, tmp_path):
    from trl import DPOConfig

    from kubetune.runtime.api.errors import SpecError
    from kubetune.runtime.api.stage_types import DPO_LOSS_TYPES

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    assert set(re.findall(r"'(\w+)'", help_text)) == set(DPO_LOSS_TYPES)

    data = write_pairs(tmp_path / "prefs.json")
    stage = {"name": "dpo", "type": "dpo", "preference": {"lossType": "sigmoidal"}, "hyperparameters": FAST}
    doc = job_doc("bad", tiny_model, [{"name": "prefs", "source": str(data), "format": "preference"}], [stage], tmp_path / "saves")
    with pytest.raises(SpecError) as err:  # refused by the spec, before any model loads
        run_doc(doc, tmp_path)
    msg = str(err.value)
    assert "spec.stages[0].preference.lossType: a dpo stage takes one of" in msg
    assert all(t in msg for t in ("sigmoid", "ipo", "hinge", "robust", "apo_zero"))

    stage = {"name": "orpo", "type": "orpo", "preference": {"lossType": "ipo"}, "hyperparameters": FAST}
    doc["spec"]["stages"] = [stage]
    with pytest.raises(SpecError, match=r"spec.stages\[0\].preference.lossType: .*other stage types have no loss variants"):
        run_doc(doc, tmp_path)
    stage = {"name": "dpo", "type": "dpo", "preference": {"lossType": "exo_pair"}, "hyperparameters": FAST}
    doc["spec"]["stages"] = [stage]
    with pytest.raises(SpecError, match=r"spec.stages\[0\].preference.labelSmoothing: lossType exo_pair needs "
                       r"preference.labelSmoothing above 0"):
        run_doc(doc, tmp_path)


def test_the_label_smoothing_losses_are_the_ones_trl_reads_it_in():
    """DPO_LABEL_SMOOTHING_LOSSES (the spec refuses labelSmoothing with any other loss) against the installed
    TRL: the branches of DPOTrainer._compute_loss that read self.label_smoothing."""
    import inspect

    from trl import DPOTrainer

    from kubetune.runtime.api.stage_types import DPO_LABEL_SMOOTHING_LOSSES, DPO_LOSS_TYPES

    source = inspect.getsource(DPOTrainer._compute_loss)
    branches = re.split(r'loss_type == "(\w+)"', source)[1:]
    bodies = dict(zip(branches[::2], branches[1::2]))
    assert set(bodies) == set(DPO_LOSS_TYPES)  # every loss has its branch: the split found them all
    assert {loss for loss, body in bodies.items() if "self.label_smoothing" in body} == set(DPO_LABEL_SMOOTHING_LOSSES)


def test_qlora_dpo_continues_a_qlora_sft_adapter_with_ipo_and_ftx(tiny_model, tmp_path, loaded_models):
    """The example pipeline's shape on a 4-bit base: sft qlora, then dpo qlora continuing that
    adapter (reference: base + the sft adapter), with another loss variant plus the SFT term."""
    sft_data = write_alpaca(tmp_path / "identity.json")
    prefs = write_pairs(tmp_path / "prefs.json", style="alpaca")
    qlora = {"method": "qlora", "lora": {"rank": 16}, "quantization": {"bits": 4}}
    stages = [
        {"name": "sft", "type": "sft", **qlora, "hyperparameters": {**FAST, "maxSteps": 4, "learningRate": 5e-3}},
        {"name": "dpo", "type": "dpo", **qlora, "preference": {"lossType": "ipo", "ftx": 0.5, "beta": 0.5},
         "data": [{"name": "prefs", "source": str(prefs), "format": "alpaca", "ranking": True}],
         "hyperparameters": {**FAST, "learningRate": 1e-2}},
    ]
    doc = job_doc("q", tiny_model, [{"name": "identity", "source": str(sft_data)}], stages, tmp_path / "saves")
    assert run_doc(doc, tmp_path) == 0
    # each stage loaded its base in 4 bits and trained its adapter on it
    assert [load["stage"] for load in loaded_models] == ["sft", "dpo"]
    for load in loaded_models:
        assert_quantized(load, 4)
    out = tmp_path / "saves" / "dpo" / "output"
    log = read_log(out)
    # TRL keeps the trained adapter in bf16 on a quantised base, its frozen copy in fp32: near zero
    assert abs(log[0]["rewards/chosen"]) < 0.05 and abs(log[0]["rewards/rejected"]) < 0.05
    assert_went_up(series(out, "rewards/margins"), by=0.1)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16
    assert json.loads((out / "run.json").read_text())["preference"]["ftx"] == 0.5


# ------------------------------------------------------------------------------------------ rm


def test_reward_model_accuracy_goes_up_on_the_pairs(tiny_model, tiny_tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    data = write_pairs(tmp_path / "prefs.json", style="alpaca")
    stage = {"name": "rm", "type": "rm", "method": "lora", "lora": {"rank": 16},
             "hyperparameters": {**FAST, "maxSteps": 16, "learningRate": 1e-2}}
    out = run_stages(tmp_path, tiny_model, [stage], data, fmt="alpaca", ranking=True) / "rm" / "output"
    assert_went_up(series(out, "accuracy"), by=0.2)
    assert_went_down(series(out, "loss"), factor=0.8)
    summary = json.loads((out / "run.json").read_text())
    assert summary["signal"]["accuracy"]["final"] >= summary["signal"]["accuracy"]["first"]
    assert summary["output_kind"] == "adapter"

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1, pad_token_id=tiny_tokenizer.pad_token_id)
    rm = PeftModel.from_pretrained(base, out).eval()
    scored = rewards(rm, tiny_tokenizer)
    assert sum(c > r for c, r in scored) >= 7, scored


def test_rm_after_sft_adapter_is_saved_as_a_merged_model(tiny_model, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    sft_data = write_alpaca(tmp_path / "identity.json")
    prefs = write_pairs(tmp_path / "prefs.json", style="alpaca")
    stages = [
        {"name": "sft", "type": "sft", "method": "lora", "hyperparameters": {**FAST, "maxSteps": 4, "learningRate": 5e-3}},
        {"name": "rm", "type": "rm", "method": "lora", "lora": {"rank": 16},
         "data": [{"name": "prefs", "source": str(prefs), "format": "alpaca", "ranking": True}],
         "hyperparameters": {**FAST, "maxSteps": 16, "learningRate": 1e-2}},
    ]
    doc = job_doc("r", tiny_model, [{"name": "identity", "source": str(sft_data)}], stages, tmp_path / "saves")
    assert run_doc(doc, tmp_path) == 0
    out = tmp_path / "saves" / "rm" / "output"
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    rm = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tiny_tokenizer.pad_token_id
    scored = rewards(rm, tiny_tokenizer)
    assert sum(c > r for c, r in scored) >= 7, scored


# -------------------------------------------------------------------------- orpo, simpo, kto


def test_orpo_loss_goes_down(tiny_model, tmp_path):
    data = write_pairs(tmp_path / "prefs.json")
    stage = {"name": "orpo", "type": "orpo", "method": "freeze", "freeze": {"trainableLayers": 1, "extraModules": ["lm_head"]},
             "hyperparameters": {**FAST, "learningRate": 3e-3}}
    out = run_stages(tmp_path, tiny_model, [stage], data) / "orpo" / "output"
    assert_went_down(series(out, "loss"), factor=0.8)
    assert (out / "model.safetensors").exists()
    summary = json.loads((out / "run.json").read_text())
    assert "log_odds_ratio" in summary["signal"] and "reference" not in summary  # reference-free


def test_simpo_loss_goes_down(tiny_model, tmp_path):
    data = write_pairs(tmp_path / "prefs.json")
    stage = {"name": "simpo", "type": "simpo", "method": "lora", "lora": {"rank": 16},
             "preference": {"beta": 2.0, "simpoGamma": 0.5}, "hyperparameters": {**FAST, "learningRate": 1e-2}}
    out = run_stages(tmp_path, tiny_model, [stage], data) / "simpo" / "output"
    assert_went_down(series(out, "loss"), factor=0.8)
    assert_went_up(series(out, "rewards/margins"), by=0.1)


def test_kto_loss_goes_down(tiny_model, tmp_path):
    data = write_kto(tmp_path / "kto.json")
    stage = {"name": "kto", "type": "kto", "method": "lora", "lora": {"rank": 16},
             "preference": {"beta": 0.5, "desirableWeight": 1.0, "undesirableWeight": 1.0},
             "hyperparameters": {**FAST, "learningRate": 1e-2}}
    out = run_stages(tmp_path, tiny_model, [stage], data, fmt="kto") / "kto" / "output"
    assert_went_down(series(out, "loss"), factor=0.9)
    assert (out / "adapter_config.json").exists() and not (out / "ref").exists()
    assert "rewards/margins" in json.loads((out / "run.json").read_text())["signal"]


def test_kto_needs_two_examples_per_batch(tiny_model, tmp_path):
    from kubetune.runtime.api.errors import UserError

    data = write_kto(tmp_path / "kto.json")
    stage = {"name": "kto", "type": "kto", "hyperparameters": {**FAST, "batchSize": 1}}
    doc = job_doc("k", tiny_model, [{"name": "kto", "source": str(data), "format": "kto"}], [stage], tmp_path / "saves")
    with pytest.raises(UserError, match=r"spec.stages\[0\].hyperparameters.batchSize: kto needs batchSize of at least 2"):
        run_doc(doc, tmp_path)


# ----------------------------------------------------------------------------------- pipeline


def test_sft_dpo_export_pipeline_prefers_the_chosen_answers(tiny_model, tiny_tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft_data = write_alpaca(tmp_path / "identity.json")
    prefs = write_pairs(tmp_path / "prefs.json", pairs=SALAD)
    stages = [
        {"name": "sft", "type": "sft", "method": "lora", "lora": {"rank": 16},
         "hyperparameters": {**FAST, "maxSteps": 8, "learningRate": 5e-3}},
        {"name": "dpo", "type": "dpo", "method": "lora", "preference": {"beta": 0.5},
         "data": [{"name": "prefs", "source": str(prefs), "format": "preference"}],
         "hyperparameters": {**FAST, "learningRate": 5e-3}},
        {"name": "merge", "type": "export"},
    ]
    doc = job_doc("pipe", tiny_model, [{"name": "identity", "source": str(sft_data)}], stages, tmp_path / "saves")
    assert run_doc(doc, tmp_path) == 0
    saves = tmp_path / "saves"

    # dpo continued the sft adapter, and its reference was base + that adapter: at step 1 the
    # policy equals the reference, so the implicit rewards are exactly zero (they would not be if
    # the reference were the bare base model, which the sft adapter already moved away from).
    log = read_log(saves / "dpo" / "output")
    assert abs(log[0]["rewards/chosen"]) < 1e-5 and abs(log[0]["rewards/rejected"]) < 1e-5
    assert_went_up([r["rewards/margins"] for r in log if "rewards/margins" in r], by=1.0)
    dpo_summary = json.loads((saves / "dpo" / "output" / "run.json").read_text())
    assert dpo_summary["reference"]["adapter"].endswith("sft/output")
    assert not (saves / "dpo" / "output" / "ref").exists()  # TRL's reference copy is not part of the output

    # The exported model on its own (transformers only): the chosen answer is more likely than
    # the rejected one on every training pair ...
    exported = saves / "merge" / "output"
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    tok = AutoTokenizer.from_pretrained(exported)
    scored = completion_logps(model, tok, SALAD)
    assert all(c > r for c, r in scored), scored
    # ... and by more than after sft alone, on every pair: the dpo stage did its part.
    sft_only = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), saves / "sft" / "output").eval()
    gaps_sft = [c - r for c, r in completion_logps(sft_only, tok, SALAD)]
    gaps_dpo = [c - r for c, r in scored]
    assert all(d > s + 1.0 for s, d in zip(gaps_sft, gaps_dpo)), (gaps_sft, gaps_dpo)
