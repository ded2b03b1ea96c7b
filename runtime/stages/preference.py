"""`dpo`, `orpo` and `simpo` stages on TRL's trainers, and what every preference stage shares.

- dpo   → `trl.DPOTrainer` (loss variants by `preference.lossType`, `beta`, `labelSmoothing`, and
          `ftx` as TRL's `"sft"` loss added with that weight — TRL 1.16 has no `rpo_alpha`).
- orpo  → `trl.experimental.orpo.ORPOTrainer` (reference-free; its loss already holds the SFT term).
- simpo → `trl.experimental.cpo.CPOTrainer` with `loss_type="simpo"`, `simpo_gamma`, and `ftx` as
          CPO's behaviour-cloning weight `cpo_alpha` (0 = pure SimPO).

The reference model of dpo (and kto, which shares this module's helpers) is the model the stage
starts from (`io.reference`, which the plan sets to `io.policy`):
- lora/qlora continuing an adapter: TRL's own mechanism. Given a `PeftModel` and no `ref_model`,
  `DPOTrainer`/`KTOTrainer` add a frozen adapter named "ref" that copies the loaded "default"
  adapter and compute the reference log-probs with it active — i.e. base + the previous
  stage's adapter, frozen. The "ref" copy is dropped again before the output is saved (`Stage.finish`).
- lora/qlora with a new adapter: TRL disables the adapter for the reference: the base model.
- full/freeze: we load a separate frozen reference ourselves (base, with the previous adapter
  merged when there was one). TRL's fallback would reload `config._name_or_path`, which is the
  base *without* the merged adapter — the wrong model after an sft lora stage.
"""

from __future__ import annotations

from ..api.stage_types import STAGE_TYPES
from .trainer_stage import LORA_METHODS, TrainerStage

PAIR_SIGNALS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


class PairStage(TrainerStage):
    """A stage on preference data (rm, and the stages below): TRL's conversational preference (or
    KTO) examples, and its eval part (evalData, or a held-out valSize)."""

    def datasets(self):
        from datasets import Dataset

        from ..data.prepare import KIND_OF_STAGE, train_eval_examples

        train, evals = train_eval_examples(self.cfg, KIND_OF_STAGE[self.stage.type], self.ctx.base_dir, self.ctx.fetch)
        return Dataset.from_list(train), (Dataset.from_list(evals) if evals else None)

    def options(self):
        return dict(max_length=self.hp.cutoff_len, dataset_num_proc=None)


class PreferenceStage(PairStage):
    """dpo, orpo, simpo, kto: `preference.*` settings, and a reference model where the loss has one."""

    @property
    def has_reference(self) -> bool:
        """runtime/api/stage_types.py says which types hold a reference model (orpo and simpo are reference-free)."""
        return STAGE_TYPES[self.stage.type].reference_model

    def options(self):
        return {**super().options(), "beta": self.stage.preference.beta}

    def load_model(self):
        model, peft_config = self.load_policy()
        self.ref_model = self._reference() if self.has_reference else None
        return model, peft_config

    def _reference(self):
        """None where TRL derives the reference (an adapter stage that continues its policy); else a
        frozen copy of the reference (+ adapter merged in), in eval mode (see the module doc)."""
        cfg = self.cfg
        ref = cfg.io.reference or cfg.io.policy
        if self.stage.method in LORA_METHODS and ref == cfg.io.policy and not cfg.io.merge_adapter:
            return None
        from ..models import load_model

        m = load_model(self.ctx.resolve(ref.model, "spec.model.name"), cfg.model, dtype=self.dtype)
        if ref.adapter:
            from peft import PeftModel

            m = PeftModel.from_pretrained(m, self.ctx.resolve(ref.adapter, self.ctx.where("reference"))).merge_and_unload()
        return m.requires_grad_(False).eval()

    def trainer_kwargs(self):
        return {"ref_model": self.ref_model} if self.has_reference else {}

    def summary(self):
        extra = {"preference": self.stage.preference.model_dump(by_alias=True)}
        if self.has_reference and self.cfg.io.reference:
            extra["reference"] = self.cfg.io.reference.model_dump(exclude_none=True)
        return extra


# ---------------------------------------------------------------------------------- the stages


class DPO(PreferenceStage):
    signals = PAIR_SIGNALS
    trl_classes = ("trl", "DPOConfig", "DPOTrainer")

    def options(self):
        pref = self.stage.preference
        loss_type, weights = [pref.loss_type], None
        if pref.ftx > 0:  # LLaMA-Factory's pref_ftx: an SFT loss on the chosen answer, added with this weight
            loss_type, weights = [pref.loss_type, "sft"], [1.0, pref.ftx]
        return {**super().options(), "loss_type": loss_type, "loss_weights": weights,
                "label_smoothing": pref.label_smoothing}


class ORPO(PreferenceStage):
    signals = ("rewards/accuracies", "rewards/margins", "log_odds_ratio", "nll_loss")
    trl_classes = ("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer")


class SimPO(PreferenceStage):
    signals = PAIR_SIGNALS
    trl_classes = ("trl.experimental.cpo", "CPOConfig", "CPOTrainer")

    def options(self):
        pref = self.stage.preference
        # ftx is CPO's behaviour-cloning (SFT) term; 0 = SimPO as published
        return {**super().options(), "loss_type": "simpo", "simpo_gamma": pref.simpo_gamma, "cpo_alpha": pref.ftx}


def run(ctx):
    return {"dpo": DPO, "orpo": ORPO, "simpo": SimPO}[ctx.cfg.stage.type].run(ctx)
