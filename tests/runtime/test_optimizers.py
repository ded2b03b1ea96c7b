"""The optimizers LLaMA-Factory users reach for — GaLore, APOLLO, BAdam, Adam-mini, Muon — and custom
Adam betas/epsilon: each trains the tiny model through `kubetune run` (full fine-tuning, CPU) with
the loss going down, and the optimizer that trained is the one the spec names, with its settings."""

from __future__ import annotations

import json

import pytest

from tests.conftest import job_doc, read_log, run_doc, write_alpaca
from tests.runtime.test_training import FAST, assert_loss_went_down


@pytest.fixture
def built_optimizers(monkeypatch) -> list:
    """Every optimizer a Trainer creates during the test (accelerate's wrapper removed)."""
    from transformers import Trainer

    built: list = []
    create = Trainer.create_optimizer

    def recording(self, *args, **kwargs):
        opt = create(self, *args, **kwargs)
        built.append(getattr(opt, "optimizer", opt))
        return opt

    monkeypatch.setattr(Trainer, "create_optimizer", recording)
    return built


def _train(tiny_model, tmp_path, hp: dict, method: str = "full", steps: int = 16):
    data = write_alpaca(tmp_path / "data" / "identity.json")
    stage = {"name": "sft", "type": "sft", "method": method,
             "hyperparameters": {**FAST, "maxSteps": steps, **hp}}
    doc = job_doc("t", tiny_model, [{"name": "identity", "source": str(data)}], [stage], tmp_path / "saves")
    assert run_doc(doc, tmp_path) == 0
    out = tmp_path / "saves" / "sft" / "output"
    return out, json.loads((out / "run.json").read_text())


def _name(opt) -> str:
    return f"{type(opt).__module__}.{type(opt).__qualname__}"


def _low_rank_groups(opt) -> list[dict]:
    return [g for g in opt.param_groups if "rank" in g]


# label → (hyperparameters, the optimizer class that must train, a check of the optimizer built)
CASES = {
    "galore": ({"optimizer": "galore_adamw", "learningRate": 3e-3,
                "galore": {"rank": 4, "updateInterval": 5, "scale": 1.0, "target": ["q_proj", "v_proj", "mlp"]}},
               "galore_torch.adamw.AdamW",
               lambda opt: [(g["rank"], g["update_proj_gap"], g["scale"], len(g["params"]))
                            for g in _low_rank_groups(opt)] == [(4, 5, 1.0, 2 * 2 + 2 * 3)]),
    "galore-layerwise": ({"optimizer": "galore_adamw", "learningRate": 3e-3,
                          "galore": {"rank": 4, "updateInterval": 5, "layerwise": True}},
                         "transformers.trainer_pt_utils.LayerWiseDummyOptimizer",
                         lambda opt: {_name(o) for o in opt.optimizer_dict.values()} == {"galore_torch.adamw.AdamW"}
                         and sum(g.get("rank") == 4 for o in opt.optimizer_dict.values() for g in o.param_groups) > 0),
    "apollo": ({"optimizer": "apollo_adamw", "learningRate": 3e-3, "adamBeta2": 0.98,
                "apollo": {"rank": 4, "updateInterval": 5, "scale": 8.0, "proj": "random"}},
               "apollo_torch.apollo.AdamW",
               lambda opt: {(g["rank"], g["scale"], g["proj"], g["betas"]) for g in _low_rank_groups(opt)}
               == {(4, 8.0, "random", (0.9, 0.98))}),
    "adam-mini": ({"optimizer": "adam_mini", "learningRate": 3e-3, "adamBeta1": 0.85, "adamEpsilon": 1e-7},
                  "adam_mini.adam_mini.Adam_mini",
                  lambda opt: {(g["beta1"], g["beta2"], g["eps"]) for g in opt.param_groups} == {(0.85, 0.999, 1e-7)}),
    "muon": ({"optimizer": "muon", "learningRate": 3e-3, "adamBeta1": 0.8},
             "kubetune.runtime.optimizers.MuonWithAdamW",
             lambda opt: _name(opt.muon) == "torch.optim.Muon" and _name(opt.adamw) == "torch.optim.adamw.AdamW"
             and all(p.ndim == 2 for g in opt.muon.param_groups for p in g["params"])
             and {g["betas"] for g in opt.adamw.param_groups} == {(0.8, 0.999)}),
    "badam": ({"optimizer": "badam", "learningRate": 5e-3, "badam": {"switchInterval": 8, "switchMode": "ascending"}},
              "badam.block_optim.BlockOptimizer",
              lambda opt: _name(opt.base_optimizer) == "torch.optim.adamw.AdamW" and opt.switch_block_every == 8
              and opt.block_num == 2),
    "adamw-betas": ({"optimizer": "adamw_torch", "learningRate": 2e-3, "adamBeta1": 0.8, "adamBeta2": 0.95,
                     "adamEpsilon": 1e-6},
                    "torch.optim.adamw.AdamW",
                    lambda opt: {(g["betas"], g["eps"]) for g in opt.param_groups} == {((0.8, 0.95), 1e-6)}),
}


@pytest.mark.slow
@pytest.mark.parametrize("label", list(CASES))
def test_optimizer_trains_and_is_the_one_named(label, tiny_model, tmp_path, built_optimizers):
    hp, cls, check = CASES[label]
    out, summary = _train(tiny_model, tmp_path, hp)
    # BAdam trains one decoder layer at a time and never the embeddings or the head: slower on a 64-wide model
    assert_loss_went_down(out, factor=0.95 if label == "badam" else 0.9)
    assert summary["optimizer"] == cls, summary["optimizer"]
    assert [_name(o) for o in built_optimizers] == [cls]
    assert check(built_optimizers[0]), built_optimizers[0].param_groups
    if label == "badam":  # both decoder layers took their turn (8 steps each); embeddings and head stayed as they were
        from safetensors.torch import load_file

        before, after = load_file(tiny_model / "model.safetensors"), load_file(out / "model.safetensors")
        changed = {n for n in before if not (before[n] == after[n]).all()}
        assert {n.split(".")[2] for n in changed if n.startswith("model.layers.")} == {"0", "1"}, sorted(changed)
        assert all(n.startswith("model.layers.") for n in changed), sorted(changed)



def test_muon_with_adamw_saves_and_loads_like_one_optimizer():
    """The Trainer checkpoints `optimizer.state_dict()` and resumes with `load_state_dict`: after a load,
    Muon and AdamW step from the loaded state, and the groups a scheduler sets are the ones they read."""
    import copy

    import torch

    from kubetune.runtime.optimizers import _muon

    def model_and_optimizer():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        m.get_input_embeddings = lambda: m[0]
        m.get_output_embeddings = lambda: None
        opt = _muon(m, lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.0, hp=None, decay=lambda _: [])
        return m, opt

    def step(m, opt):
        m(torch.tensor([[1, 2, 3]])).sum().backward()
        opt.step()
        opt.zero_grad()

    m1, o1 = model_and_optimizer()
    step(m1, o1)
    weights, saved = copy.deepcopy(m1.state_dict()), copy.deepcopy(o1.state_dict())  # a checkpoint after step 1
    step(m1, o1)

    m2, o2 = model_and_optimizer()  # a resumed run: fresh objects, then the checkpoint loaded
    m2.load_state_dict(weights)
    o2.load_state_dict(saved)
    assert o2.param_groups == [*o2.muon.param_groups, *o2.adamw.param_groups]
    assert all(a is b for a, b in zip(o2.param_groups, [*o2.muon.param_groups, *o2.adamw.param_groups]))
    assert len(o2.state) == 5 and "momentum_buffer" in o2.state[m2[1].weight] and "exp_avg" in o2.state[m2[0].weight]
    step(m2, o2)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2)


# Other stage types reach the optimizer through the same place: TRL configs carry the TrainingArguments
# (GaLore), and every Trainer stage passes through stages.trainer_stage.train (Muon's factory, here on a LoRA model).
STAGE_CASES = {
    "dpo-galore": ({"type": "dpo", "method": "full", "preference": {"beta": 0.5},
                    "hyperparameters": {"optimizer": "galore_adamw", "learningRate": 1e-3, "galore": {"rank": 4}}},
                   "preference", "galore_torch.adamw.AdamW", "rewards/margins"),
    "kto-lora-muon": ({"type": "kto", "method": "lora", "lora": {"rank": 16}, "preference": {"beta": 0.5},
                       "hyperparameters": {"optimizer": "muon", "learningRate": 1e-2}},
                      "kto", "kubetune.runtime.optimizers.MuonWithAdamW", "loss"),
}


@pytest.mark.slow
@pytest.mark.parametrize("label", list(STAGE_CASES))
def test_preference_stages_train_with_the_named_optimizer(label, tiny_model, tmp_path, built_optimizers):
    from tests.runtime.test_preference import FAST as PREF_FAST
    from tests.runtime.test_preference import assert_went_down, assert_went_up, run_stages, series, write_kto, write_pairs

    stage, fmt, cls, signal = STAGE_CASES[label]
    stage = {"name": stage["type"], **stage, "hyperparameters": {**PREF_FAST, **stage["hyperparameters"]}}
    data = write_kto(tmp_path / "kto.json") if fmt == "kto" else write_pairs(tmp_path / "prefs.json")
    out = run_stages(tmp_path, tiny_model, [stage], data, fmt=fmt) / stage["name"] / "output"
    if signal == "loss":
        assert_went_down(series(out, "loss"), factor=0.9)
    else:
        assert_went_up(series(out, signal), by=0.2)
    assert [_name(o) for o in built_optimizers] == [cls]
    assert json.loads((out / "run.json").read_text())["optimizer"] == cls


def _loraplus_groups(opt, lr: float, ratio: float, rank: int, groups: int = 1) -> tuple[list, list]:
    """(the A matrices' group at lr, the B matrices' group at ratio × lr) of a LoRA+ optimizer; `groups`
    after the first are other modules' (ppo's value head)."""
    at_lr = [g for g in opt.param_groups if g["params"] and g["lr"] == lr]
    assert len(at_lr) == groups, at_lr
    a_group = at_lr[0]
    (b_group,) = [g for g in opt.param_groups if g["params"] and g["lr"] == pytest.approx(lr * ratio)]
    assert all(p.shape[0] == rank for p in a_group["params"]) and all(p.shape[1] == rank for p in b_group["params"])
    return a_group["params"], b_group["params"]


@pytest.mark.slow
def test_loraplus_applies_in_a_dpo_stage(tiny_model, tmp_path, built_optimizers):
    """lora.loraplusLrRatio reaches every Trainer stage through the same place, not only sft."""
    from tests.runtime.test_preference import FAST as PREF_FAST
    from tests.runtime.test_preference import run_stages, write_pairs

    stage = {"name": "dpo", "type": "dpo", "method": "lora", "lora": {"rank": 8, "loraplusLrRatio": 16},
             "preference": {"beta": 0.5}, "hyperparameters": {**PREF_FAST, "maxSteps": 2, "learningRate": 1e-3}}
    out = run_stages(tmp_path, tiny_model, [stage], write_pairs(tmp_path / "prefs.json")) / "dpo" / "output"
    (opt,) = built_optimizers
    a, b = _loraplus_groups(opt, 1e-3, 16, 8)
    assert len(a) == len(b) > 0  # one B for each A, none left at the base learning rate
    assert json.loads((out / "run.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_ppo_trains_with_the_named_optimizer_and_loraplus(tiny_model, tmp_path, monkeypatch):
    """The ppo stage's own loop builds hyperparameters.optimizer (here SGD, with a schedule down to minLr)
    as the Trainer stages do, and LoRA+ (AdamW, B matrices at ratio × lr) with the value head beside them."""
    from kubetune.runtime.stages.ppo import PPO
    from tests.conftest import IDENTITY
    from tests.runtime.test_online_rl import FAST as RL_FAST

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q, _ in IDENTITY))
    data = [{"name": "questions", "source": str(prompts), "format": "prompt"}]
    reward = {"functions": ["format"], "pattern": "Kubi", "numGenerations": 2, "maxNewTokens": 4}
    built: list = []
    build = PPO.build_optimizer
    monkeypatch.setattr(PPO, "build_optimizer", lambda self: built.append(build(self)) or built[-1])
    cases = {"sgd": ({"method": "full", "hyperparameters": {"optimizer": "sgd", "lrScheduler": "cosine_with_min_lr",
                                                            "minLr": 1e-4}}, "torch.optim.sgd.SGD"),
             "loraplus": ({"method": "lora", "lora": {"rank": 8, "loraplusLrRatio": 4}}, "torch.optim.adamw.AdamW")}
    for name, (settings, cls) in cases.items():
        built.clear()
        stage = {"name": "ppo", "type": "ppo", **settings, "reward": reward,
                 "hyperparameters": {**RL_FAST, "maxSteps": 2, "learningRate": 1e-3, **settings.get("hyperparameters", {})}}
        doc = job_doc(name, tiny_model, data, [stage], tmp_path / name)
        assert run_doc(doc, tmp_path) == 0
        assert json.loads((tmp_path / name / "ppo" / "output" / "run.json").read_text())["optimizer"] == cls
        (opt,) = built
        assert _name(opt) == cls
        if name == "sgd":  # and the schedule ends at minLr
            assert read_log(tmp_path / name / "ppo" / "output")[-1]["lr"] == pytest.approx(1e-4)
        if name == "loraplus":
            a, b = _loraplus_groups(opt, 1e-3, 4, 8, groups=2)
            head = opt.param_groups[-1]["params"]  # the value head, at the base learning rate
            assert len(a) == len(b) > 0 and [p.shape for p in head] == [(1, 64), (1,)]


@pytest.mark.slow
def test_loraplus_builds_the_named_optimizer_with_its_weight_decay(tiny_model, tmp_path, built_optimizers):
    """LoRA+ with optimizer sgd trains with SGD (it once built AdamW whatever the spec named), and
    weightDecay reaches the decayed groups (peft's factory alone leaves them at 0)."""
    data = write_alpaca(tmp_path / "data" / "identity.json")
    stage = {"name": "sft", "type": "sft", "method": "lora", "lora": {"rank": 8, "loraplusLrRatio": 4},
             "hyperparameters": {**FAST, "maxSteps": 4, "learningRate": 1e-2, "optimizer": "sgd",
                                 "weightDecay": 0.05}}
    doc = job_doc("t", tiny_model, [{"name": "identity", "source": str(data)}], [stage], tmp_path / "saves")
    assert run_doc(doc, tmp_path) == 0
    (opt,) = built_optimizers
    assert _name(opt) == "torch.optim.sgd.SGD"
    a, b = _loraplus_groups(opt, 1e-2, 4, 8)
    assert len(a) == len(b) > 0
    decayed = [g for g in opt.param_groups if g["params"] and g["lr"] == pytest.approx(1e-2 * 4)]
    assert {g["weight_decay"] for g in opt.param_groups if g["params"] and g["lr"] == 1e-2} == {0.05}
    assert {g["weight_decay"] for g in decayed} <= {0.05, 0.0} and 0.05 in {g["weight_decay"] for g in decayed}
    run = json.loads((tmp_path / "saves" / "sft" / "output" / "run.json").read_text())
    assert run["optimizer"] == "torch.optim.sgd.SGD" and run["steps"] == 4
