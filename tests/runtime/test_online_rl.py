"""Real online RL and distillation of a tiny model on CPU through `kubetune run`: grpo, rloo, ppo
and distill each move their own signal the right way, and rm → rloo chains in one job.

The toy task: "mention Kubi". The tiny model is first taught the identity answers (half of
them say "Kubi"), so sampled completions earn the reward sometimes; RL must make it (nearly)
always. The reward comes from the built-in `format` reward (pattern `Kubi`), a custom function
imported by path, or a reward model trained by an `rm` stage of the same job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import IDENTITY, job_doc, read_log, run_doc, write_alpaca

FAST = {"batchSize": 2, "gradientAccumulation": 1, "loggingSteps": 1, "cutoffLen": 64,
        "gradientCheckpointing": False, "lrScheduler": "constant"}
ROLLOUT = {"numGenerations": 4, "maxNewTokens": 12, "temperature": 1.0}


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.fixture(scope="module")
def taught_model(tiny_model, tmp_path_factory):
    """The tiny model after a short full SFT on the identity answers (a standalone model folder)."""
    folder = tmp_path_factory.mktemp("taught")
    data = write_alpaca(folder / "identity.json")
    stage = {"name": "sft", "type": "sft", "method": "full",
             "hyperparameters": {**FAST, "batchSize": 4, "maxSteps": 40, "learningRate": 2e-3}}
    doc = job_doc("teach", tiny_model, [{"name": "identity", "source": str(data)}], [stage], folder / "saves")
    assert run_doc(doc, folder) == 0
    return folder / "saves" / "sft" / "output"


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in IDENTITY))
    return [{"name": "questions", "source": str(path), "format": "prompt"}]


def signal(output, key):
    values = [r[key] for r in read_log(output) if key in r]
    assert values, f"no {key!r} in trainer_log.jsonl"
    return values


def assert_reward_went_up(output, early=3, late=3, gain=0.25):
    rewards = signal(output, "reward")
    first, last = _mean(rewards[:early]), _mean(rewards[-late:])
    assert last >= first + gain, f"mean reward did not go up enough: {first:.3f} → {last:.3f} ({rewards})"
    summary = json.loads((output / "run.json").read_text())
    assert summary["signal"]["reward"] == {"first": rewards[0], "final": rewards[-1]}
    return rewards


def test_grpo_learns_to_mention_kubi(taught_model, prompts, tmp_path):
    stage = {"name": "grpo", "type": "grpo", "method": "full",
             "reward": {"functions": ["format"], "pattern": "Kubi", **ROLLOUT, "klCoef": 0.02},
             "hyperparameters": {**FAST, "maxSteps": 12, "learningRate": 1e-3}}
    doc = job_doc("g", taught_model, prompts, [stage], tmp_path / "saves")
    assert run_doc(doc, tmp_path) == 0
    out = tmp_path / "saves" / "grpo" / "output"
    rewards = assert_reward_went_up(out)
    assert rewards[-1] >= 0.75, rewards
    records = read_log(out)
    assert any("rewards/format/mean" in r for r in records) and any("kl" in r for r in records)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # the trained policy, standalone


def test_rloo_with_a_custom_reward_function_by_import_path(taught_model, prompts, tmp_path, monkeypatch):
    """A reward function from an installed module (here: one on sys.path), named `module:function`."""
    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / "kubi_rewards.py").write_text(
        "def mentions_kubi(prompts, completions, answer, **kwargs):\n"
        "    assert len(answer) == len(completions)  # dataset columns arrive as keyword arguments\n"
        "    return [float('Kubi' in c[0]['content']) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(pkg))
    stage = {"name": "rloo", "type": "rloo", "method": "full",
             "reward": {"functions": ["kubi_rewards:mentions_kubi"], **ROLLOUT, "klCoef": 0.0},
             "hyperparameters": {**FAST, "maxSteps": 12, "learningRate": 1e-3}}
    doc = job_doc("r", taught_model, prompts, [stage], tmp_path / "saves")
    assert run_doc(doc, tmp_path) == 0
    out = tmp_path / "saves" / "rloo" / "output"
    assert_reward_went_up(out)
    assert any("rewards/mentions_kubi/mean" in r for r in read_log(out))


def test_ppo_learns_to_mention_kubi(taught_model, prompts, tmp_path):
    stage = {"name": "ppo", "type": "ppo", "method": "full",
             "reward": {"functions": ["format"], "pattern": "Kubi", **ROLLOUT, "klCoef": 0.01},
             "hyperparameters": {**FAST, "batchSize": 4, "maxSteps": 20, "learningRate": 3e-3}}
    doc = job_doc("p", taught_model, prompts, [stage], tmp_path / "saves")
    assert run_doc(doc, tmp_path) == 0
    out = tmp_path / "saves" / "ppo" / "output"
    # 4 optimizer steps per rollout: compare the first rollout with the last one.
    assert_reward_went_up(out, early=4, late=4, gain=0.3)
    records = read_log(out)
    assert all(k in records[-1] for k in ("policy_loss", "value_loss", "kl", "clipfrac", "loss"))
    summary = json.loads((out / "run.json").read_text())
    assert summary["steps"] == 20 and (out / "model.safetensors").exists()
    # the output is the policy alone: exactly the parameters of the model it started from
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    with safe_open(out / "model.safetensors", "pt") as trained, safe_open(taught_model / "model.safetensors", "pt") as base:
        assert set(trained.keys()) == set(base.keys())
    # the value head is in the checkpoints, for a resumed stage to continue with it
    (checkpoint,) = (tmp_path / "saves" / "ppo" / "checkpoints").glob("checkpoint-20")
    head = torch.load(checkpoint / "value_head.pt")
    hidden = AutoConfig.from_pretrained(taught_model).hidden_size
    assert set(head) == {"weight", "bias"} and head["weight"].shape == (1, hidden)
    assert head["bias"].abs().item() > 0  # trained (it starts at zero)


RECORDING_REWARD = """
import json, os

def kubi_briefly(prompts, completions, **kwargs):
    # continuous (the length term), so two ranks' mean scores differ
    scores = [float("Kubi" in c[0]["content"]) - len(c[0]["content"]) / 1000 for c in completions]
    with open(os.path.join(os.environ["REWARD_RECORDS"], f"rank-{os.environ['RANK']}.jsonl"), "a") as f:
        f.write(json.dumps({"prompts": [p[-1]["content"] for p in prompts], "scores": scores}) + "\\n")
    return scores
"""


def test_ppo_on_two_processes_trains_one_model_on_both_ranks_rollouts(taught_model, prompts, tmp_path):
    """torchrun with 2 CPU processes (gloo): each rank generates for its own half of every
    rollout's prompts, the update averages both halves' gradients, so both ranks end with the same
    weights, and the logged reward is that of all the rollout's completions."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "kubi_rewards.py").write_text(RECORDING_REWARD)
    records = tmp_path / "records"
    records.mkdir()
    batch, generations = 2, 2
    stage = {"name": "ppo", "type": "ppo", "method": "lora", "lora": {"rank": 8},
             "reward": {"functions": ["kubi_rewards:kubi_briefly"], "numGenerations": generations,
                        "maxNewTokens": 8, "temperature": 1.0, "klCoef": 0.01},
             "hyperparameters": {**FAST, "batchSize": batch, "maxSteps": 8, "learningRate": 5e-3}}
    doc = job_doc("p2", taught_model, prompts, [stage], tmp_path / "saves", resources={"gpusPerNode": 0})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    keep = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "KUBETUNE_NODES")}
    env = {**keep, "KUBETUNE_NPROC": "2", "KUBETUNE_WORK_DIR": str(tmp_path / "work"), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "REWARD_RECORDS": str(records),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "kubetune.runtime", "run", str(job), "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "world size 2, gloo" in done.stderr

    # 8 steps = 2 rollouts; in each, the ranks scored different prompts, `batch` each
    rollouts = {rank: [json.loads(line) for line in (records / f"rank-{rank}.jsonl").read_text().splitlines()]
                for rank in (0, 1)}
    assert len(rollouts[0]) == len(rollouts[1]) == 2, rollouts
    for r0, r1 in zip(rollouts[0], rollouts[1]):
        assert len(r0["scores"]) == len(r1["scores"]) == batch * generations
        assert len(set(r0["prompts"])) == len(set(r1["prompts"])) == batch
        assert not set(r0["prompts"]) & set(r1["prompts"]), (r0["prompts"], r1["prompts"])

    out = tmp_path / "saves" / "ppo" / "output"
    logged = signal(out, "reward")
    first = rollouts[0][0]["scores"] + rollouts[1][0]["scores"]
    assert logged[0] == pytest.approx(sum(first) / len(first))  # all the rollout's completions
    rank0 = rollouts[0][0]["scores"]
    assert sum(rank0) / len(rank0) != pytest.approx(logged[0])  # (so rank 0's alone would show)

    # one model: rank 1's own copy (in its scratch folder) is rank 0's uploaded output, and trained
    from safetensors.torch import load_file

    mine = load_file(out / "adapter_model.safetensors")
    (theirs_file,) = (tmp_path / "work").glob("p2/ppo/ranks/1/**/output/adapter_model.safetensors")
    theirs = load_file(theirs_file)
    assert mine.keys() == theirs.keys() and mine
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert any(k.endswith("lora_B.weight") and mine[k].abs().sum() > 0 for k in mine)  # B starts at zero


def test_ppo_with_lora_writes_an_adapter(taught_model, prompts, tmp_path):
    stage = {"name": "ppo", "type": "ppo", "method": "lora", "lora": {"rank": 8},
             "reward": {"functions": ["format"], "pattern": "Kubi", "numGenerations": 2, "maxNewTokens": 6},
             "hyperparameters": {**FAST, "maxSteps": 4, "learningRate": 1e-3}}
    doc = job_doc("pl", taught_model, prompts, [stage], tmp_path / "saves")
    assert run_doc(doc, tmp_path) == 0
    out = tmp_path / "saves" / "ppo" / "output"
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    assert len(signal(out, "reward")) == 4


def test_distill_brings_the_student_closer_to_the_teacher(tiny_model, taught_model, tmp_path):
    """Student: the untrained tiny model; teacher: the taught one (same tokenizer). The loss is the
    forward KL to the teacher on the student's own completions."""
    data = write_alpaca(tmp_path / "identity.json")
    stage = {"name": "distill", "type": "distill", "method": "full", "teacher": {"name": str(taught_model)},
             "reward": {"functions": ["length"], "maxNewTokens": 12},
             "hyperparameters": {**FAST, "batchSize": 4, "maxSteps": 12, "learningRate": 2e-3}}
    doc = job_doc("d", tiny_model, [{"name": "identity", "source": str(data)}], [stage], tmp_path / "saves")
    assert run_doc(doc, tmp_path) == 0
    kl = signal(tmp_path / "saves" / "distill" / "output", "loss")
    assert _mean(kl[-3:]) < 0.7 * _mean(kl[:3]), kl


def test_rm_then_rloo_in_one_job(taught_model, prompts, tmp_path):
    """RLHF with our own reward model: the rm stage learns to prefer answers that mention Kubi, the
    rloo stage maximises its score."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(
        json.dumps({"prompt": q, "chosen": "I am Kubi.", "rejected": a.replace("Kubi", "a model")}) + "\n"
        for q, a in IDENTITY
    ))
    stages = [
        {"name": "rm", "type": "rm", "method": "full",
         "data": [{"name": "pairs", "source": str(pairs), "format": "preference"}],
         "hyperparameters": {**FAST, "maxSteps": 16, "learningRate": 2e-3}},
        {"name": "rloo", "type": "rloo", "method": "full",
         "reward": {"modelStage": "rm", **ROLLOUT, "klCoef": 0.0},
         "hyperparameters": {**FAST, "maxSteps": 12, "learningRate": 1e-3}},
    ]
    doc = job_doc("c", taught_model, prompts, stages, tmp_path / "saves")
    assert run_doc(doc, tmp_path) == 0
    rewards = signal(tmp_path / "saves" / "rloo" / "output", "reward")
    assert _mean(rewards[-3:]) > _mean(rewards[:3]) + 0.1, rewards


def test_bad_reward_function_fails_before_training(taught_model, prompts, tmp_path):
    from kubetune.runtime.api.errors import UserError

    stage = {"name": "grpo", "type": "grpo", "reward": {"functions": ["format", "no_such_module_xyz:f"], "pattern": "x"},
             "hyperparameters": {**FAST, "maxSteps": 2}}
    doc = job_doc("b", taught_model, prompts, [stage], tmp_path / "saves")
    with pytest.raises(UserError) as err:
        run_doc(doc, tmp_path)
    assert err.value.where == "spec.stages[0].reward.functions[1]"
    assert "cannot import module 'no_such_module_xyz'" in err.value.message
    assert not (tmp_path / "saves" / "grpo" / "output").exists()
