"""`kto` stage on `trl.KTOTrainer`: unpaired desirable/undesirable answers.

Data: prompt/completion with a boolean label (format kto), or LLaMA-Factory's `kto_tag` column on
alpaca/sharegpt records. `preference.beta`, `desirableWeight` and `undesirableWeight` go to
KTOConfig; `lossType` picks KTO's own loss (the default) or `apo_zero_unpaired`. The reference
model is chosen as in the dpo stage (see `preference.py`): TRL's frozen "ref" adapter copy when
the stage continues an adapter, the disabled adapter for a new one, a frozen copy for full/freeze.
"""

from __future__ import annotations

import logging

from ..api.errors import UserError
from .preference import PreferenceStage

log = logging.getLogger(__name__)


class KTO(PreferenceStage):
    signals = ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl")
    trl_classes = ("trl", "KTOConfig", "KTOTrainer")

    @property
    def loss_type(self) -> str:
        return "kto" if self.stage.preference.loss_type == "sigmoid" else self.stage.preference.loss_type

    def check(self):
        super().check()
        if self.loss_type == "kto" and self.hp.batch_size < 2:
            raise UserError(
                "kto needs batchSize of at least 2: its KL estimate pairs each prompt with another "
                "completion of the same batch (raise batchSize and lower gradientAccumulation)",
                self.ctx.where("hyperparameters.batchSize"),
            )

    def datasets(self):
        train_ds, eval_ds = super().datasets()
        labels = train_ds["label"]
        if all(labels) or not any(labels):
            log.warning("stage %s: every KTO example is %s; KTO learns best from both kinds",
                        self.cfg.name, "desirable" if labels[0] else "undesirable")
        return train_ds, eval_ds

    def options(self):
        pref = self.stage.preference
        return {**super().options(), "loss_type": self.loss_type, "desirable_weight": pref.desirable_weight,
                "undesirable_weight": pref.undesirable_weight}


run = KTO.run
