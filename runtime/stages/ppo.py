"""`ppo` stage: PPO-RLHF on transformers + peft (TRL 1.x no longer ships a PPO trainer).

One iteration of the loop below:

1. **Rollout.** Take `batchSize × gradientAccumulation` prompts, sample `reward.numGenerations`
   completions each with `generate` (temperature `reward.temperature`, at most
   `reward.maxNewTokens` tokens, cut after the first EOS).
2. **Score.** Each completion's score is the sum of the reward functions and the `rm` stage's
   reward model (`io.reward`), exactly as GRPO/RLOO see them (`runtime/rewards.py`).
3. **Per-token rewards.** r_t = −klCoef · (log π(a_t) − log π_ref(a_t)), plus the score on the
   completion's last token (the KL penalty to the reference: the policy the stage started from).
4. **Advantages.** A value head (one linear layer on the policy's last hidden state, trained with
   the policy) estimates V(s_t); GAE(γ=1, λ=0.95) gives advantages, whitened over the batch, and
   returns = advantages + values.
5. **Update.** `PPO_EPOCHS` optimizer steps on the same rollout (micro-batches of `batchSize`
   prompts, accumulated): clipped surrogate  max(−A·ρ, −A·clip(ρ, 1±ε)) with ρ = π/π_old, plus
   `VF_COEF` × the clipped value loss.

Optimizer steps count as training steps (`maxSteps`); `epochs` are passes over the prompts, each
rollout taking `PPO_EPOCHS` steps. Tokens count once per rollout (prompt + completion). The
optimizer is `hyperparameters.optimizer` as transformers builds it for the Trainer stages (the
spec admits the AdamW, Adafactor, SGD and Lion names here), with LoRA+'s groups as in those stages.

Several processes (torchrun: `gpusPerNode > 1`, `nodes > 1`) train one model, data-parallel: every
rollout's prompts are split between the ranks (`batchSize × gradientAccumulation` each, as the
per-device batch of the Trainer stages), each rank generates and scores its share, and the
gradients are averaged over all ranks before every optimizer step, so the ranks stay identical
(they start from rank 0's weights). Logged rewards, losses and token counts are those of all
ranks (`reward_std`: the mean of the ranks' spreads); rank 0 writes the checkpoints and the output.

Logging, progress, metrics and checkpoint upload use the same `TrainerCallback`s as the TRL
stages, through transformers' `CallbackHandler`; checkpoints hold the policy, the value head, the
optimizer, the scheduler and the trainer state, and a resumed stage continues from them.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..launcher import coordinator
from ..models import load_model, load_policy
from .base import StageContext, StageResult, common_args
from .online_rl import SIGNALS, prompt_datasets, reward_sources
from .trainer_stage import Stage, loraplus_optimizer, loraplus_ratio

log = logging.getLogger(__name__)

PPO_EPOCHS = 4  # optimizer steps per rollout
CLIP = 0.2  # ε of the clipped policy objective
CLIP_VALUE = 0.2  # clip range of the value predictions around the rollout's values
VF_COEF = 0.1  # weight of the value loss
GAMMA, LAM = 1.0, 0.95  # GAE discount and λ


# ------------------------------------------------------------------------------------ model parts


def _forward(model, input_ids, attention_mask, n_completion: int, temperature: float, value_head=None):
    """Log-probabilities of the last `n_completion` tokens (and values of the states before them)."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding, as generate does
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=value_head is not None, use_cache=False)
    logits = out.logits[:, -n_completion - 1 : -1].float() / temperature
    targets = input_ids[:, -n_completion:]
    logprobs = torch.gather(logits.log_softmax(-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    if value_head is None:
        return logprobs, None
    hidden = out.hidden_states[-1][:, -n_completion - 1 : -1].float()
    return logprobs, value_head(hidden).squeeze(-1)


def _masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _whiten(x, mask):
    mean = _masked_mean(x, mask)
    var = _masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def gae(rewards, values, mask, gamma: float = GAMMA, lam: float = LAM):
    """Generalised advantage estimation over the completion tokens (mask = 1 on real tokens)."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, advantages + values


class Reference:
    """log π_ref: a frozen copy for full/freeze stages; for adapters the same model with its
    adapters disabled (a fresh adapter) or a frozen copy of the adapter the stage continues."""

    def __init__(self, policy, ctx: StageContext, model_path: str, adapter: str | None, dtype, is_peft: bool):
        self.policy, self.model, self.adapter_name = policy, None, None
        if is_peft:
            if adapter:
                policy.load_adapter(adapter, adapter_name="ref", is_trainable=False)
                self.adapter_name = "ref"
        else:
            model = load_model(model_path, ctx.cfg.model, dtype=dtype)
            if adapter:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
            self.model = model.to(policy.device).eval().requires_grad_(False)

    @torch.no_grad()
    def logprobs(self, input_ids, attention_mask, n_completion, temperature):
        if self.model is not None:
            return _forward(self.model, input_ids, attention_mask, n_completion, temperature)[0]
        from trl.trainer.utils import use_adapter

        with use_adapter(self.policy, self.adapter_name):
            return _forward(self.policy, input_ids, attention_mask, n_completion, temperature)[0]


# --------------------------------------------------------------------------------------- rollouts


@torch.no_grad()
def rollout(model, value_head, reference: Reference, tokenizer, rows, funcs, classes, stage, device) -> dict[str, Any]:
    """Generate, score, and compute advantages for one batch of prompt rows."""
    reward = stage.reward
    n = reward.num_generations
    rows = [r for r in rows for _ in range(n)]
    prompts = [r["prompt"] for r in rows]
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(device)
    model.eval()
    generated = model.generate(
        **enc, do_sample=True, temperature=reward.temperature, top_k=0, top_p=1.0,
        max_new_tokens=reward.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    completion_ids = generated[:, enc["input_ids"].shape[1] :]
    # Keep the tokens up to and including the first EOS.
    is_eos = completion_ids == tokenizer.eos_token_id
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), completion_ids.shape[1])
    mask = (torch.arange(completion_ids.shape[1], device=device)[None] <= first_eos[:, None]).float()
    ids_list = [ids[: int(m.sum())].tolist() for ids, m in zip(completion_ids, mask)]
    completions = [[{"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)}] for ids in ids_list]

    # Scores: reward functions (TRL's signature, extra columns as keyword arguments) + reward model.
    extra = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    per_func = []
    for func, cls in zip(funcs, classes):
        if isinstance(func, nn.Module):
            chats = [cls.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
            rm_in = cls(chats, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False).to(device)
            per_func.append(func(**rm_in).logits[:, 0].float())
        else:
            values = func(prompts=prompts, completions=completions, completion_ids=ids_list, **extra)
            per_func.append(torch.tensor([math.nan if v is None else float(v) for v in values], device=device))
    per_func_t = torch.stack(per_func, 1)
    scores = torch.nansum(per_func_t, 1)

    input_ids = torch.cat([enc["input_ids"], completion_ids], 1)
    attention_mask = torch.cat([enc["attention_mask"], mask.long()], 1)
    T = completion_ids.shape[1]
    old_logprobs, values = _forward(model, input_ids, attention_mask, T, reward.temperature, value_head)
    ref_logprobs = reference.logprobs(input_ids, attention_mask, T, reward.temperature)
    kl = (old_logprobs - ref_logprobs) * mask
    rewards = -reward.kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(rows), device=device), last] += scores
    advantages, returns = gae(rewards, values, mask)
    advantages = _whiten(advantages, mask)
    names = [getattr(f, "__name__", None) or type(f).__name__ for f in funcs]
    stats = {
        "reward": scores.mean().item(),
        "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
        "kl": kl.sum(1).mean().item(),
        "completions/mean_length": mask.sum(1).mean().item(),
        **{f"rewards/{name}/mean": per_func_t[:, i].nanmean().item() for i, name in enumerate(names)},
    }
    return dict(input_ids=input_ids, attention_mask=attention_mask, mask=mask, old_logprobs=old_logprobs,
                old_values=values, advantages=advantages, returns=returns, T=T, stats=stats,
                tokens=int(attention_mask.sum()))


def ppo_loss(model, value_head, batch, sl: slice, temperature: float):
    mask = batch["mask"][sl]
    logprobs, values = _forward(model, batch["input_ids"][sl], batch["attention_mask"][sl], batch["T"], temperature, value_head)
    ratio = torch.exp(logprobs - batch["old_logprobs"][sl])
    adv = batch["advantages"][sl]
    pg_loss = _masked_mean(torch.max(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP)), mask)
    old_v, ret = batch["old_values"][sl], batch["returns"][sl]
    v_clipped = old_v + (values - old_v).clamp(-CLIP_VALUE, CLIP_VALUE)
    vf_loss = 0.5 * _masked_mean(torch.max((values - ret) ** 2, (v_clipped - ret) ** 2), mask)
    clipfrac = _masked_mean(((ratio - 1).abs() > CLIP).float(), mask)
    return pg_loss + VF_COEF * vf_loss, {"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(), "clipfrac": clipfrac.item()}


# ------------------------------------------------------------------------------- data parallelism


class Ranks:
    """The collectives of data-parallel PPO; in a single process every call returns its input."""

    def __init__(self):
        team = coordinator()
        team.join()  # on GPUs this makes the rank's own GPU the current one
        self.world, self.rank, self.is_main = team.world_size, team.rank, team.is_main
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def start_from_rank0(self, tensors) -> None:
        """Every rank starts from rank 0's weights (a fresh adapter or value head is random)."""
        if self.distributed:
            import torch.distributed as dist

            for t in tensors:
                dist.broadcast(t.data, src=0)

    def average_gradients(self, params) -> None:
        """The gradient of the whole rollout: the mean over ranks of each rank's share."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad.div_(self.world)

    def mean(self, stats: dict[str, float]) -> dict[str, float]:
        """The mean of each number over the ranks (each rank has an equal share of the rollout)."""
        if not self.distributed or not stats:
            return stats
        import torch.distributed as dist

        keys = sorted(stats)
        t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: v / self.world for k, v in zip(keys, t.tolist())}

    def total(self, n: int) -> int:
        if not self.distributed:
            return n
        import torch.distributed as dist

        t = torch.tensor([n], dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        return int(t.item())

    def any(self, flag: bool) -> bool:
        """A stop on one rank is a stop on all (a rank left alone would wait in a collective)."""
        return self.total(int(bool(flag))) > 0


# ------------------------------------------------------------------------------------- checkpoints


def _save_checkpoint(folder: Path, model, value_head, optimizer, scheduler, state, is_peft: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if is_peft:
        model.save_pretrained(folder, selected_adapters=["default"])
    else:
        model.save_pretrained(folder)
    torch.save(value_head.state_dict(), folder / "value_head.pt")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    state.save_to_json(str(folder / "trainer_state.json"))


def _rotate(trainer_dir: Path, keep: int) -> None:
    """Local copies only (the committed ones live in storage): keep the newest `keep`."""
    folders = sorted(trainer_dir.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[-1]))
    for old in folders[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------- the stage


class PPO(Stage):
    """The loop above on the stages' preamble; it stands in for the Trainer (model, state, optimizer,
    save_model) where the preamble saves and summarises."""

    signals = SIGNALS

    def execute(self) -> StageResult:
        self.setup()
        losses, duration = self.loop()
        result = SimpleNamespace(training_loss=sum(losses) / len(losses) if losses else None)
        return self.finish(self, self.tokenizer, result, duration)

    def setup(self) -> None:
        """Prompts, rewards, the policy (from the checkpoint when resuming), its reference, the
        value head, the optimizer and scheduler and the trainer state."""
        from peft import PeftModel, get_peft_model, set_peft_model_state_dict
        from transformers import TrainerState, TrainingArguments, get_scheduler

        cfg, hp, ctx = self.cfg, self.hp, self.ctx
        torch.manual_seed(hp.seed)
        random.seed(hp.seed)
        self.train_ds, _ = prompt_datasets(ctx)  # PPO has no eval pass; valSize only holds prompts out
        self.funcs, self.classes = reward_sources(ctx, set(self.train_ds.column_names) - {"prompt"}, self.dtype)
        self.tokenizer = self.load_tokenizer()
        resume = ctx.resume_from
        if resume is not None and cfg.io.output_kind != "adapter":
            # A full-model checkpoint holds the whole policy: load it instead of the start.
            model, peft_config = load_policy(str(resume), None, False, cfg.model, self.stage, self.dtype)
        else:
            model, peft_config = self.load_policy()
        if peft_config is not None:
            model = get_peft_model(model, peft_config)
        self.is_peft = isinstance(model, PeftModel)
        if self.is_peft and resume is not None:
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(str(resume / "adapter_model.safetensors")), adapter_name="default")
        self.ranks = ranks = Ranks()
        device = ranks.device
        if getattr(model, "hf_device_map", None) is None:
            model.to(device)
        if hp.gradient_checkpointing is not False:  # unset means on here
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if self.is_peft:
                model.enable_input_require_grads()
        self.model = model
        self.reference = Reference(model, ctx, self.model_path, self.adapter, self.dtype, self.is_peft)
        for rm in (f for f in self.funcs if isinstance(f, nn.Module)):
            rm.to(device)

        hidden = model.config.get_text_config().hidden_size
        self.value_head = value_head = nn.Linear(hidden, 1).to(device)
        nn.init.normal_(value_head.weight, std=1 / math.sqrt(hidden + 1))
        nn.init.zeros_(value_head.bias)

        self.per_rank = hp.batch_size * hp.gradient_accumulation
        self.prompts_per_rollout = self.per_rank * ranks.world
        self.rollouts_per_epoch = max(1, math.ceil(len(self.train_ds) / self.prompts_per_rollout))
        self.max_steps = max_steps = hp.max_steps or max(1, math.ceil(self.rollouts_per_epoch * hp.epochs)) * PPO_EPOCHS
        self.args = args = TrainingArguments(**{**common_args(ctx), "max_steps": max_steps})
        self.params = [p for p in model.parameters() if p.requires_grad] + list(value_head.parameters())
        self.optimizer = self.build_optimizer()
        self.scheduler = get_scheduler(hp.lr_scheduler, self.optimizer, num_training_steps=max_steps,
                                       num_warmup_steps=args.get_warmup_steps(max_steps),
                                       scheduler_specific_kwargs=args.lr_scheduler_kwargs or None)  # minLr
        self.state = TrainerState(max_steps=max_steps, logging_steps=hp.logging_steps,
                                  save_steps=cfg.checkpoint.every_steps,
                                  num_train_epochs=math.ceil(max_steps / PPO_EPOCHS / self.rollouts_per_epoch))
        if resume is not None:
            value_head.load_state_dict(torch.load(resume / "value_head.pt", map_location=device))
            self.optimizer.load_state_dict(torch.load(resume / "optimizer.pt", map_location=device))
            self.scheduler.load_state_dict(torch.load(resume / "scheduler.pt"))
            self.state = TrainerState.load_from_json(str(resume / "trainer_state.json"))
        self.state.is_world_process_zero = self.state.is_local_process_zero = ranks.is_main  # logs, uploads: rank 0
        ranks.start_from_rank0(self.params)
        if ranks.distributed:
            torch.manual_seed(hp.seed + ranks.rank)  # each rank samples its own completions

    def build_optimizer(self):
        """hyperparameters.optimizer with its settings, as the Trainer stages build it (LoRA+: the
        B matrices at ratio × the learning rate); the value head trains beside the policy."""
        from transformers import Trainer

        head = list(self.value_head.parameters())
        if ratio := loraplus_ratio(self.stage):
            optimizer = loraplus_optimizer(self.model, self.args, ratio)
            optimizer.add_param_group({"params": head, "lr": self.args.learning_rate, "weight_decay": self.hp.weight_decay})
            return optimizer
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
        return optimizer_cls(self.params, weight_decay=self.hp.weight_decay, **kwargs)

    def save_model(self, path: str) -> None:
        if self.is_peft:
            self.model.save_pretrained(path, selected_adapters=["default"])
        else:
            self.model.save_pretrained(path)

    def loop(self) -> tuple[list[float], float]:
        """Rollouts and PPO updates until maxSteps (or a stop); the losses and the seconds it took."""
        from transformers import TrainerControl
        from transformers.integrations import get_reporting_integration_callbacks
        from transformers.trainer_callback import CallbackHandler

        cfg, hp, reward, ctx = self.cfg, self.hp, self.stage.reward, self.ctx
        model, value_head, optimizer, scheduler, state = self.model, self.value_head, self.optimizer, self.scheduler, self.state
        args, ranks, max_steps, device = self.args, self.ranks, self.max_steps, self.ranks.device
        trackers = [tracker() for tracker in get_reporting_integration_callbacks(args.report_to)]  # spec.tracking
        handler = CallbackHandler([self.log_cb, *ctx.callbacks, *trackers], model, self.tokenizer, optimizer, scheduler)
        control = TrainerControl()
        handler.on_train_begin(args, state, control)

        rows = self.train_ds.to_list()
        rollout_index = state.global_step // PPO_EPOCHS  # a resumed stage continues the prompt order
        losses: list[float] = []
        started = time.time()
        pending: dict[str, list[float]] = {}
        while state.global_step < max_steps and not ranks.any(control.should_training_stop):
            epoch, at = divmod(rollout_index * self.prompts_per_rollout, len(rows))
            order = list(range(len(rows)))
            random.Random(hp.seed + epoch).shuffle(order)
            mine = range(ranks.rank * self.per_rank, (ranks.rank + 1) * self.per_rank)  # this rank's share
            batch_rows = [rows[order[(at + k) % len(rows)]] for k in mine]
            batch = rollout(model, value_head, self.reference, self.tokenizer, batch_rows, self.funcs, self.classes,
                            self.stage, device)
            rollout_stats = ranks.mean(batch["stats"])
            state.num_input_tokens_seen += ranks.total(batch["tokens"])
            rollout_index += 1
            model.train()
            micro = hp.batch_size * reward.num_generations
            n_rows = batch["input_ids"].shape[0]
            for _ in range(PPO_EPOCHS):
                if state.global_step >= max_steps:
                    break
                handler.on_step_begin(args, state, control)
                optimizer.zero_grad(set_to_none=True)
                step_stats: dict[str, float] = {}
                step_loss = 0.0
                for start in range(0, n_rows, micro):
                    sl = slice(start, start + micro)
                    share = (min(n_rows, start + micro) - start) / n_rows
                    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.bf16 else nullcontext()
                    with autocast:
                        loss, parts = ppo_loss(model, value_head, batch, sl, reward.temperature)
                    (loss * share).backward()
                    step_loss += loss.item() * share
                    for k, v in parts.items():
                        step_stats[k] = step_stats.get(k, 0.0) + v * share
                ranks.average_gradients(self.params)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, hp.max_grad_norm) if hp.max_grad_norm > 0 else None
                optimizer.step()
                scheduler.step()
                state.global_step += 1
                state.epoch = rollout_index / self.rollouts_per_epoch
                step_stats = ranks.mean({"loss": step_loss, **step_stats})
                losses.append(step_stats["loss"])
                for k, v in {**step_stats, **rollout_stats}.items():
                    pending.setdefault(k, []).append(v)
                if grad_norm is not None:
                    pending.setdefault("grad_norm", []).append(float(grad_norm))
                handler.on_step_end(args, state, control)
                if state.global_step == 1 or state.global_step % hp.logging_steps == 0 or state.global_step == max_steps:
                    logs = {k: sum(v) / len(v) for k, v in pending.items()}
                    logs.update(learning_rate=scheduler.get_last_lr()[0], num_input_tokens_seen=state.num_input_tokens_seen)
                    pending.clear()
                    state.log_history.append({**logs, "step": state.global_step})
                    handler.on_log(args, state, control, logs=logs)
                if (state.global_step % cfg.checkpoint.every_steps == 0 or state.global_step == max_steps) and ranks.is_main:
                    _save_checkpoint(ctx.trainer_dir / f"checkpoint-{state.global_step}", model, value_head, optimizer,
                                     scheduler, state, self.is_peft)
                    handler.on_save(args, state, control)
                    _rotate(ctx.trainer_dir, cfg.checkpoint.keep + 1)
        duration = time.time() - started
        handler.on_train_end(args, state, control)
        return losses, duration


run = PPO.run
