"""The optimizer of a training stage (hyperparameters.optimizer), in one place for every stage.

Where transformers integrates an optimizer, the stage only names it in its TrainingArguments
(`training_args`): AdamW and friends, GaLore (`galore_*`, package galore-torch) and APOLLO
(`apollo_adamw`, package apollo-torch), with their knobs in `optim_args` and the linear layers
they project in `optim_target_modules`.

Adam-mini (package adam-mini), Muon (PyTorch's `torch.optim.Muon`) and BAdam (package badam)
have no transformers integration: `install` hands the Trainer a factory through its own
`optimizer_cls_and_kwargs` hook, so the Trainer's `create_optimizer` builds them on the very
model it trains (after peft and accelerate), and its scheduler, checkpoints and resume treat
them like any other optimizer. `stages.trainer_stage.train` calls `install` for every Trainer stage.

The spec's CEL rules keep out the combinations these methods cannot train (GaLore, APOLLO and
BAdam with adapters, layerwise updates with gradient accumulation or several processes, ...).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

from .api.errors import UserError
from .api.spec import GALORE_OPTIMIZERS, ApolloSpec, BadamSpec, GaloreSpec, Hyperparameters

# optimizer → (the import it needs, the pip package that has it); all in kubetune's `optimizers` extra
PACKAGES: dict[str, tuple[str, str]] = {
    **{name: ("galore_torch", "galore-torch") for name in GALORE_OPTIMIZERS},
    "apollo_adamw": ("apollo_torch", "apollo-torch"),
    "adam_mini": ("adam_mini", "adam-mini"),
    "badam": ("badam", "badam"),
}
BUILT_HERE = ("adam_mini", "muon", "badam")  # no transformers integration: built by `install`


def require(hp: Hyperparameters, where: str) -> None:
    """A UserError naming the field when the optimizer's package is not installed."""
    module, package = PACKAGES.get(hp.optimizer or "", (None, None))
    if module and importlib.util.find_spec(module) is None:
        raise UserError(
            f"optimizer {hp.optimizer} needs the Python package {package}, which this image lacks: install "
            f"kubetune[optimizers] (the kubetune runtime image has it) or pick another optimizer",
            where,
        )


def training_args(hp: Hyperparameters, cuda: bool, where: str) -> dict[str, Any]:
    """TrainingArguments fields: optim (+ optim_args, optim_target_modules) and Adam betas/epsilon."""
    require(hp, where)
    name = hp.optimizer or ("adamw_torch_fused" if cuda else "adamw_torch")
    args: dict[str, Any] = {}
    if hp.adam_beta1 is not None:
        args["adam_beta1"] = hp.adam_beta1
    if hp.adam_beta2 is not None:
        args["adam_beta2"] = hp.adam_beta2
    if hp.adam_epsilon is not None:
        args["adam_epsilon"] = hp.adam_epsilon
    if name in GALORE_OPTIMIZERS:
        g = hp.galore or GaloreSpec()
        args.update(optim=name + ("_layerwise" if g.layerwise else ""), optim_target_modules=_targets(g.target),
                    optim_args=_optim_args(rank=g.rank, update_proj_gap=g.update_interval, scale=g.scale,
                                           proj_type=g.proj_type))
    elif name == "apollo_adamw":
        a = hp.apollo or ApolloSpec()
        args.update(optim=name + ("_layerwise" if a.layerwise else ""), optim_target_modules=_targets(a.target),
                    optim_args=_optim_args(rank=a.rank, update_proj_gap=a.update_interval, scale=a.scale, proj=a.proj,
                                           proj_type=a.proj_type, scale_type=a.scale_type))
    elif name in BUILT_HERE:
        args["optim"] = "adamw_torch"  # a valid name for TrainingArguments; `install` replaces the optimizer
    else:
        args["optim"] = name
    return args


def _targets(target: list[str]) -> str | list[str]:
    return "all-linear" if target == ["all"] else list(target)


def _optim_args(**kw: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in kw.items())  # transformers parses `k=v,k=v`


def install(trainer, hp: Hyperparameters) -> None:
    """Adam-mini, Muon and BAdam: the Trainer builds them on its model through its factory hook."""
    if hp.optimizer not in BUILT_HERE or trainer.optimizer is not None:
        return
    args = trainer.args
    common = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                  weight_decay=args.weight_decay)
    build = {"adam_mini": _adam_mini, "muon": _muon, "badam": _badam}[hp.optimizer]
    trainer.optimizer_cls_and_kwargs = (lambda: build, {**common, "hp": hp, "decay": trainer.get_decay_parameter_names})


def _split_decay(model, decay) -> tuple[list, list]:
    names = set(decay(model))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [p for n, p in params if n in names], [p for n, p in params if n not in names]


def _adam_mini(model, *, lr, betas, eps, weight_decay, hp, decay):
    """Adam-mini: one learning rate per block (attention head, neuron) instead of per weight."""
    from adam_mini import Adam_mini

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return Adam_mini(
        named_parameters=model.named_parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
        dim=cfg.hidden_size, n_heads=cfg.num_attention_heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, verbose=False,
    )


def _muon(model, *, lr, betas, eps, weight_decay, hp, decay):
    """Muon on the hidden layers' 2-D weights, AdamW on everything else (embeddings, the output head,
    norms, biases), as Muon asks. Muon's step is scaled to AdamW's update size (match_rms_adamw), so
    one learning rate serves both."""
    import torch

    skip = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings())
            if m is not None and getattr(m, "weight", None) is not None}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for _, p in trainable if p.ndim == 2 and id(p) not in skip]
    rest = {n: p for n, p in trainable if p.ndim != 2 or id(p) in skip}
    names = set(decay(model))
    groups = [{"params": [p for n, p in rest.items() if n in names], "weight_decay": weight_decay},
              {"params": [p for n, p in rest.items() if n not in names], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]  # LoRA: every trainable weight is 2-D, nothing for AdamW
    muon = torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw") if hidden else None
    adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps) if groups else None
    return _muon_with_adamw()(muon, adamw)


def _badam(model, *, lr, betas, eps, weight_decay, hp, decay):
    """BAdam: AdamW on one decoder layer at a time, the layers taking turns every switchInterval steps."""
    import torch
    from badam import BlockOptimizer

    b = hp.badam or BadamSpec()
    with_decay, without = _split_decay(model, decay)
    base = torch.optim.AdamW([{"params": with_decay, "weight_decay": weight_decay},
                              {"params": without, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps)
    return BlockOptimizer(base_optimizer=base, named_parameters_list=list(model.named_parameters()),
                          switch_block_every=b.switch_interval, start_block=b.start_block, switch_mode=b.switch_mode,
                          verbose=0)


@functools.cache
def _muon_with_adamw():
    """The class (defined on first use: this module is imported without torch)."""
    import torch

    class MuonWithAdamW(torch.optim.Optimizer):
        """One optimizer over two: its param_groups are Muon's then AdamW's (the very same dicts, so
        the learning-rate scheduler moves both) and its state is theirs, so the Trainer saves, loads
        and schedules it like any optimizer."""

        def __init__(self, muon, adamw):  # either may be None (no parameter of its kind)
            self.muon, self.adamw = muon, adamw
            self.parts = [o for o in (muon, adamw) if o is not None]
            super().__init__([g for o in self.parts for g in o.param_groups], {})
            self._link()

        def _link(self):
            start = 0
            for o in self.parts:
                o.param_groups = self.param_groups[start:start + len(o.param_groups)]
                o.state = self.state
                start += len(o.param_groups)

        def load_state_dict(self, state_dict):
            super().load_state_dict(state_dict)
            self._link()  # loading replaced the group dicts and the state

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for o in self.parts:
                o.step()
            return loss

    MuonWithAdamW.__qualname__ = MuonWithAdamW.__name__
    return MuonWithAdamW
