"""`rm` stage on `trl.RewardTrainer`: a reward model with a sequence-classification head.

The policy is loaded as `AutoModelForSequenceClassification` with one label (the scalar reward)
and the tokenizer's pad token (the head reads the last non-pad token). The head is new, so it is
trained in every method: peft's SEQ_CLS task keeps `score` as a fully trained module beside the
LoRA weights; freeze tuning unfreezes it explicitly.

Output (the plan's `output_kind`): a LoRA reward model trained straight on the base is saved as an
adapter (with its head); one trained on top of an earlier adapter (merged in first) is merged and
saved as a full model, as is a full/freeze reward model. Later grpo/rloo/ppo stages load it from
`reward.modelStage`.
"""

from __future__ import annotations

from ..api.errors import UserError
from .preference import PairStage
from .trainer_stage import LORA_METHODS

HEAD_NAMES = ("score", "classifier")  # the sequence-classification heads of transformers' models


class RM(PairStage):
    signals = ("accuracy", "margin", "mean_reward")
    trl_classes = ("trl", "RewardConfig", "RewardTrainer")  # RewardTrainer drops pairs longer than max_length rather than cutting them

    @property
    def merge_lora(self) -> bool:
        return self.stage.method in LORA_METHODS and self.cfg.io.output_kind == "model"

    def check(self):
        if self.stage.method == "qlora" and self.cfg.io.merge_adapter:
            raise UserError(
                "a qlora rm stage after an adapter stage is not supported: the adapter must be merged into "
                "full-precision weights first; use method lora, or put an export stage before it",
                self.ctx.where("method"),
            )

    def load_model(self):
        model, peft_config = self.load_policy(auto_class="AutoModelForSequenceClassification", num_labels=1,
                                              pad_token_id=self.tokenizer.pad_token_id)
        if self.stage.method == "freeze":
            for name, p in model.named_parameters():
                if name.split(".")[0] in HEAD_NAMES:
                    p.requires_grad_(True)
        return model, peft_config

    def prepare(self, trainer):
        if len(trainer.train_dataset) == 0:
            raise UserError(
                f"all {len(self.train_ds)} preference pairs are longer than cutoffLen {self.hp.cutoff_len} tokens; raise it",
                self.ctx.where("hyperparameters.cutoffLen"),
            )


run = RM.run
