"""`distill` stage: knowledge distillation from `stage.teacher` on TRL's DistillationTrainer.

The student (the policy the stage starts from) generates completions for the stage's prompts
on-policy and is trained to match the teacher's next-token distribution on them: the loss is
computed on the teacher's logits (TRL's generalised JSD; we use beta 0, the forward KL
KL(teacher ‖ student), the distillation loss NeMo AutoModel offers). The logged `loss` is that KL
per token, so it falling is the student approaching the teacher.

Prompts come from any conversation data (alpaca, sharegpt, messages: the last answer is
dropped) or prompt data. Rollout length and temperature follow `reward.maxNewTokens` and
`reward.temperature` when the stage sets `reward` (defaults 64 and 1.0). The teacher must share
the student's vocabulary (same tokenizer family).
"""

from __future__ import annotations

import logging

from ..api.errors import UserError
from ..models import load_model
from ..api.spec import RewardSpec
from .online_rl import GenerationStage

log = logging.getLogger(__name__)

FORWARD_KL = 0.0  # DistillationConfig.beta: 0 = forward KL, 0.5 = JSD, 1 = reverse KL


class Distill(GenerationStage):
    signals = ("loss",)
    trl_classes = ("trl", "DistillationConfig", "DistillationTrainer")

    def options(self):
        rollout = self.stage.reward or RewardSpec()
        return dict(super().options(), max_completion_length=rollout.max_new_tokens, temperature=rollout.temperature,
                    beta=FORWARD_KL)

    def load_model(self):
        model, peft_config = self.load_policy()
        self.teacher = self.load_teacher(model.get_output_embeddings().weight.shape[0])
        return model, peft_config

    def load_teacher(self, student_vocab: int):
        teacher = self.stage.teacher
        if teacher is None:
            raise UserError("a distill stage needs `teacher` (the teacher model)", self.ctx.where("teacher"))
        where = self.ctx.where("teacher.name")
        model = load_model(self.ctx.resolve(teacher.name, where), teacher, dtype=self.dtype, where=where)
        vocab = model.get_output_embeddings().weight.shape[0]
        if vocab != student_vocab:
            raise UserError(
                f"the teacher's vocabulary has {vocab} entries but the student's has {student_vocab}: distillation on "
                "logits needs the same tokenizer (pick a teacher of the student's model family)",
                where,
            )
        return model.eval().requires_grad_(False)

    def trainer_kwargs(self):
        return {"teacher_model": self.teacher}


run = Distill.run
