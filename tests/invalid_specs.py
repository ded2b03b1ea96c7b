"""One table of invalid FineTuneJobs for both validations: offline (the pydantic model behind
`kubetune validate`, tests/unit/test_spec.py) and the kube-apiserver's OpenAPI schema and CEL rules
from the generated CRD (tests/e2e/test_crd_validation.py). A case added here is checked by both.

Each row is a name, a patch to the valid document BASE (top-level spec fields replaced), and what
each layer's message must contain: the field path it names and a fragment of its message. Where
the two layers word or place an error differently (pydantic's "Input should be …" against the
apiserver's "Unsupported value", a CEL rule's fieldPath), the row says so with its own apiserver
expectation; otherwise the apiserver must say the same as the offline validation.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

BASE = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "job"},
    "spec": {
        "model": {"name": "org/model"},
        "data": [{"name": "d", "source": "data.json"}],
        "stages": [{"name": "sft", "type": "sft"}],
    },
}


def patched(patch: dict[str, Any], name: str = "job") -> dict:
    """BASE with the spec fields in `patch` replaced, named `name`."""
    d = copy.deepcopy(BASE)
    d["metadata"]["name"] = name
    d["spec"].update(patch)
    return d


class Expect(NamedTuple):
    field: str  # the field path the message names
    message: str  # a fragment of the message

    def missing_from(self, text: str) -> list[str]:
        return [f for f in self if f not in text]


class Invalid(NamedTuple):
    name: str
    patch: dict[str, Any]
    offline: Expect
    served: Expect | None = None  # the apiserver's, where it differs from offline

    @property
    def apiserver(self) -> Expect:
        return self.offline if self.served is None else self.served


def _stage(**fields) -> dict[str, Any]:
    return {"stages": [{"name": "a", "type": "sft", **fields}]}


INVALID = [
    Invalid("unknown stage type", {"stages": [{"name": "a", "type": "sftt"}]},
            Expect("spec.stages[0].type", "Input should be 'pt', 'sft', 'rm', 'dpo'"),
            Expect("spec.stages[0].type", 'Unsupported value: "sftt"')),
    Invalid("qlora without bits", _stage(method="qlora"),
            Expect("spec.stages[0].method", "method qlora needs quantization.bits (4 or 8)")),
    Invalid("negative learning rate", _stage(hyperparameters={"learningRate": -1}),
            Expect("spec.stages[0].hyperparameters.learningRate", "Input should be greater than 0"),
            Expect("spec.stages[0].hyperparameters.learningRate", "should be greater than 0")),
    Invalid("duplicate stage names", {"stages": [{"name": "a", "type": "sft"}, {"name": "a", "type": "dpo"}]},
            Expect("spec.stages", "stage names must be unique")),
    Invalid("duplicate stage names of one type", {"stages": [{"name": "a", "type": "sft"}, {"name": "a", "type": "sft"}]},
            Expect("spec.stages", "stage names must be unique")),
    Invalid("export first", {"stages": [{"name": "e", "type": "export"}]},
            Expect("spec.stages", "the first stage cannot be export: there is nothing to merge yet")),
    Invalid("unknown template", {"template": "llama9"},
            Expect("spec.template", "Input should be 'chatml', 'llama3'"),
            Expect("spec.template", 'Unsupported value: "llama9"')),
    Invalid("unknown method", _stage(method="lorra"),
            Expect("spec.stages[0].method", "Input should be 'lora', 'qlora', 'full' or 'freeze'"),
            Expect("spec.stages[0].method", 'Unsupported value: "lorra"')),
    Invalid("typo in a field", _stage(hyperparameter={}),
            Expect("spec.stages[0].hyperparameter", "unknown field `hyperparameter` (did you mean `hyperparameters`?)"),
            Expect('"spec.stages[0].hyperparameter"', "strict decoding error: unknown field")),
    Invalid("quantization bits 3", _stage(method="qlora", quantization={"bits": 3}),
            Expect("spec.stages[0].quantization.bits", "Input should be 4 or 8"),
            Expect("spec.stages[0].quantization.bits", "Unsupported value: 3")),
    Invalid("zero batch size", _stage(hyperparameters={"batchSize": 0}),
            Expect("spec.stages[0].hyperparameters.batchSize", "Input should be greater than or equal to 1"),
            Expect("spec.stages[0].hyperparameters.batchSize", "should be greater than or equal to 1")),
    Invalid("stage name not a DNS label", {"stages": [{"name": "SFT_1", "type": "sft"}]},
            Expect("spec.stages[0].name", "must be a DNS label"),
            Expect("spec.stages[0].name", "should match")),
    Invalid("no stages", {"stages": []},
            Expect("spec.stages", "List should have at least 1 item"),
            Expect("spec.stages", "should have at least 1 items")),
    Invalid("no data", {"data": []},
            Expect("spec.data", "every training stage needs data: set spec.data or the stage's data")),
    Invalid("unknown dataset format", {"data": [{"name": "d", "source": "x.json", "format": "alpacca"}]},
            Expect("spec.data[0].format", "Input should be 'alpaca', 'sharegpt'"),
            Expect("spec.data[0].format", 'Unsupported value: "alpacca"')),
    Invalid("lora dropout 1", _stage(lora={"dropout": 1.0}),
            Expect("spec.stages[0].lora.dropout", "Input should be less than 1"),
            Expect("spec.stages[0].lora.dropout", "should be less than 1")),
    Invalid("negative gpus", {"resources": {"gpusPerNode": -1}},
            Expect("spec.resources.gpusPerNode", "Input should be greater than or equal to 0"),
            Expect("spec.resources.gpusPerNode", "should be greater than or equal to 0")),
    Invalid("distill without teacher", {"stages": [{"name": "a", "type": "distill"}]},
            Expect("spec.stages[0].type", "a distill stage needs `teacher` (the teacher model)")),
    Invalid("choice data in an sft stage", {"stages": [{"name": "a", "type": "sft", "data": [
                {"name": "quiz", "source": "quiz.jsonl", "format": "choice"}]}]},
            Expect("spec.stages[0].data", "format choice (multiple-choice questions) is read by eval stages only")),
    Invalid("choice job data reaching an sft stage", {
                "data": [{"name": "quiz", "source": "quiz.jsonl", "format": "choice"}],
                "stages": [{"name": "a", "type": "sft"}, {"name": "e", "type": "eval"}]},
            Expect("spec.data", "format choice (multiple-choice questions) is read by eval stages only: give")),
    Invalid("eval few-shot over 64", {"stages": [{"name": "e", "type": "eval", "evaluation": {"fewShot": 65}}]},
            Expect("spec.stages[0].evaluation.fewShot", "Input should be less than or equal to 64"),
            Expect("spec.stages[0].evaluation.fewShot", "should be less than or equal to 64")),
    Invalid("grpo without reward", {"stages": [{"name": "a", "type": "grpo"}]},
            Expect("spec.stages[0].reward", "ppo, grpo and rloo stages need reward.modelStage")),
    Invalid("reward stage not rm", {"stages": [{"name": "s", "type": "sft"},
                                               {"name": "g", "type": "grpo", "reward": {"modelStage": "s"}}]},
            Expect("spec.stages", "reward.modelStage must name an rm stage of this job")),
    Invalid("streaming without maxSteps", {"data": [{"name": "d", "source": "big.jsonl", "streaming": True}]},
            Expect("spec.stages", "a stage that reads a streaming dataset needs hyperparameters.maxSteps")),
    Invalid("stage streaming without maxSteps", _stage(data=[{"name": "d", "source": "big.jsonl", "streaming": True}],
                                                       hyperparameters={"epochs": 2}),
            Expect("spec.stages", "a stage that reads a streaming dataset needs hyperparameters.maxSteps")),
    Invalid("zero preprocessing workers", {"data": [{"name": "d", "source": "d.json", "preprocessingWorkers": 0}]},
            Expect("spec.data[0].preprocessingWorkers", "Input should be greater than or equal to 1"),
            Expect("spec.data[0].preprocessingWorkers", "should be greater than or equal to 1")),
    Invalid("checkpoint every 0 steps", {"checkpoint": {"everySteps": 0}},
            Expect("spec.checkpoint.everySteps", "Input should be greater than or equal to 1"),
            Expect("spec.checkpoint.everySteps", "should be greater than or equal to 1")),
    Invalid("bad addressing style", {"storage": {"uri": "s3://b/p", "addressingStyle": "sideways"}},
            Expect("spec.storage.addressingStyle", "Input should be 'path', 'virtual' or 'auto'"),
            Expect("spec.storage.addressingStyle", 'Unsupported value: "sideways"')),
    Invalid("unknown dtype", {"model": {"name": "m", "dtype": "fp8"}},
            Expect("spec.model.dtype", "Input should be 'auto', 'bfloat16', 'float16' or 'float32'"),
            Expect("spec.model.dtype", 'Unsupported value: "fp8"')),
    Invalid("missing model", {"model": None},
            Expect("spec.model", "Input should be a valid dictionary"),
            Expect("spec.model", "Required value")),
    Invalid("gpus through podOverrides", {"resources": {"podOverrides": {"resources": {"nvidia.com/gpu": "2"}}}},
            Expect("spec.resources.podOverrides.resources", "podOverrides.resources cannot set cpu, memory or "
                                                            "nvidia.com/gpu: use resources.cpu")),
    Invalid("extra resource not a quantity", {"resources": {"podOverrides": {"resources": {"rdma/hca": "lots"}}}},
            Expect("spec.resources.podOverrides.resources",
                   "podOverrides.resources: every value must be a Kubernetes quantity")),
    Invalid("env with a value and a secret", {"resources": {"podOverrides": {"env": [
                {"name": "K", "value": "v", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}}},
            Expect("spec.resources.podOverrides.env[0].valueFrom", "podOverrides.env: set value or valueFrom, not both")),
    Invalid("credentials in the endpoint", {"storage": {"uri": "s3://b/p", "endpoint": "http://minio:minio123@minio:9000"}},
            Expect("spec.storage.endpoint", "storage.endpoint must not carry credentials (user:password@)")),
    Invalid("unknown dpo loss type", {"stages": [{"name": "s", "type": "sft"},
                                                 {"name": "d", "type": "dpo", "preference": {"lossType": "ipo2"}}]},
            Expect("spec.stages[1].preference.lossType", "a dpo stage takes one of sigmoid, hinge, ipo")),
    Invalid("dpo loss type on a kto stage", {"stages": [{"name": "k", "type": "kto", "preference": {"lossType": "ipo"}}]},
            Expect("spec.stages[0].preference.lossType", "a kto stage takes one of sigmoid, kto, apo_zero_unpaired")),
    Invalid("unknown reward function", {"stages": [{"name": "g", "type": "grpo", "reward": {"functions": ["exact-match"]}}]},
            Expect("spec.stages[0].reward.functions",
                   "reward.functions: each is one of exact_match, format, length or the import path")),
    Invalid("galore with lora", _stage(hyperparameters={"optimizer": "galore_adamw"}),
            Expect("spec.stages[0].method", "GaLore, APOLLO, BAdam and Adam-mini optimizers work on the model's own "
                                            "weights, not on adapters: set method: full")),
    Invalid("adam-mini with lora", _stage(hyperparameters={"optimizer": "adam_mini"}),
            Expect("spec.stages[0].method", "GaLore, APOLLO, BAdam and Adam-mini optimizers work on the model's own")),
    Invalid("apollo with qlora", _stage(method="qlora", quantization={"bits": 4},
                                        hyperparameters={"optimizer": "apollo_adamw"}),
            Expect("spec.stages[0].method", "GaLore, APOLLO, BAdam and Adam-mini optimizers work on the model's own")),
    Invalid("badam with freeze", _stage(method="freeze", hyperparameters={"optimizer": "badam"}),
            Expect("spec.stages[0].method", "set method: full (or freeze, except for badam)")),
    Invalid("galore settings without galore", _stage(method="full", hyperparameters={"galore": {"rank": 8}}),
            Expect("spec.stages[0].hyperparameters.galore", "hyperparameters.galore applies to the GaLore optimizers only")),
    Invalid("apollo settings on galore", _stage(method="full", hyperparameters={"optimizer": "galore_adamw",
                                                                                "apollo": {"rank": 8}}),
            Expect("spec.stages[0].hyperparameters.apollo", "hyperparameters.apollo applies to optimizer apollo_adamw only")),
    Invalid("badam settings without badam", _stage(method="full", hyperparameters={"badam": {"switchInterval": 10}}),
            Expect("spec.stages[0].hyperparameters.badam", "hyperparameters.badam applies to optimizer badam only")),
    Invalid("layerwise galore with accumulation", _stage(method="full", hyperparameters={
                "optimizer": "galore_adamw", "galore": {"layerwise": True}}),
            Expect("spec.stages[0].hyperparameters.gradientAccumulation",
                   "a layerwise GaLore or APOLLO optimizer steps inside the backward pass")),
    Invalid("adam betas on galore", _stage(method="full", hyperparameters={"optimizer": "galore_adamw", "adamBeta2": 0.95}),
            Expect("spec.stages[0].hyperparameters.optimizer", "hyperparameters.adamBeta1/adamBeta2 reach only")),
    Invalid("adam epsilon on lion", _stage(hyperparameters={"optimizer": "lion_8bit", "adamEpsilon": 1e-6}),
            Expect("spec.stages[0].hyperparameters.adamEpsilon", "hyperparameters.adamEpsilon reaches only")),
    Invalid("adam beta 1", _stage(hyperparameters={"adamBeta1": 1.0}),
            Expect("spec.stages[0].hyperparameters.adamBeta1", "Input should be less than 1"),
            Expect("spec.stages[0].hyperparameters.adamBeta1", "should be less than 1")),
    Invalid("weight decay on apollo", _stage(method="full", hyperparameters={"optimizer": "apollo_adamw", "weightDecay": 0.1}),
            Expect("spec.stages[0].hyperparameters.weightDecay", "GaLore and APOLLO optimizers apply no weight decay")),
    Invalid("muon on a ppo stage", {"stages": [{"name": "p", "type": "ppo", "reward": {"functions": ["length"]},
                                                "hyperparameters": {"optimizer": "muon"}}]},
            Expect("spec.stages[0].hyperparameters.optimizer", "a ppo stage builds its optimizer in its own loop")),
    Invalid("lora+ with muon", _stage(lora={"loraplusLrRatio": 16}, hyperparameters={"optimizer": "muon"}),
            Expect("spec.stages[0].lora.loraplusLrRatio", "lora.loraplusLrRatio puts the B matrices in parameter groups")),
    Invalid("badam on two gpus", {"stages": [{"name": "a", "type": "sft", "method": "full",
                                              "hyperparameters": {"optimizer": "badam"}}],
                                  "resources": {"gpusPerNode": 2}},
            Expect("spec.resources", "optimizer badam and layerwise GaLore/APOLLO train in a single process")),
    Invalid("muon with fsdp", {"stages": [{"name": "a", "type": "sft", "method": "full",
                                           "hyperparameters": {"optimizer": "muon"}}],
                               "resources": {"gpusPerNode": 4, "strategy": "fsdp"}},
            Expect("spec.resources.strategy", "GaLore, APOLLO and Muon transform whole weight matrices")),
    Invalid("unknown optimizer", _stage(hyperparameters={"optimizer": "galore"}),
            Expect("spec.stages[0].hyperparameters.optimizer", "Input should be 'adamw_torch'"),
            Expect("spec.stages[0].hyperparameters.optimizer", 'Unsupported value: "galore"')),
    Invalid("format reward without pattern", {"stages": [{"name": "g", "type": "grpo", "reward": {"functions": ["format"]}}]},
            Expect("spec.stages[0].reward.pattern", "the format reward needs reward.pattern (a regular expression)")),
    Invalid("column path with a bad index", {"data": [{"name": "d", "source": "s.json", "columns": {"response": "answers.text[x]"}}]},
            Expect("spec.data[0].columns", "columns.response: 'answers.text[x]' is not a column path"),
            Expect("spec.data[0].columns.response", "should match")),
    Invalid("evalData and valSize", {"evalData": [{"name": "v", "source": "v.json"}],
                                     "stages": [{"name": "a", "type": "sft", "hyperparameters": {"valSize": 0.1}}]},
            Expect("spec.stages", "a stage evaluates either on evalData or on a held-out hyperparameters.valSize")),
    Invalid("evalData on a ppo stage", {"stages": [{"name": "p", "type": "ppo", "reward": {"functions": ["length"]},
                                                    "evalData": [{"name": "v", "source": "v.json"}]}]},
            Expect("spec.stages[0].evalData", "evalData: ppo and export stages have no evaluation pass")),
    Invalid("minLr without its schedule", _stage(hyperparameters={"minLr": 1e-6}),
            Expect("spec.stages[0].hyperparameters.minLr", "lrScheduler cosine_with_min_lr and minLr go together")),
    Invalid("neftuneAlpha on a dpo stage", {"stages": [{"name": "d", "type": "dpo", "hyperparameters": {"neftuneAlpha": 5}}]},
            Expect("spec.stages[0].hyperparameters.neftuneAlpha",
                   "hyperparameters.neftuneAlpha applies to pt and sft stages only")),
    Invalid("torchCompile on a ppo stage", {"stages": [{"name": "p", "type": "ppo", "reward": {"functions": ["length"]},
                                                        "hyperparameters": {"torchCompile": True}}]},
            Expect("spec.stages[0].hyperparameters.torchCompile",
                   "hyperparameters.torchCompile has no effect in ppo, export or eval stages")),
    Invalid("streaming data reaching a dpo stage", {"data": [{"name": "d", "source": "big.jsonl", "streaming": True}],
                                                    "stages": [{"name": "a", "type": "dpo", "hyperparameters": {"maxSteps": 9}}]},
            Expect("spec.stages", "a streaming dataset is read by pt and sft stages only")),
    Invalid("streaming with valSize", _stage(data=[{"name": "d", "source": "big.jsonl", "streaming": True}],
                                             hyperparameters={"maxSteps": 9, "valSize": 0.1}),
            Expect("spec.stages", "a stage that reads a streaming dataset cannot hold out hyperparameters.valSize")),
    Invalid("torchCompileMode without torchCompile", _stage(hyperparameters={"torchCompileMode": "max-autotune"}),
            Expect("spec.stages[0].hyperparameters.torchCompileMode",
                   "hyperparameters.torchCompileMode applies only with torchCompile: true")),
    Invalid("ftx on an orpo stage", {"stages": [{"name": "o", "type": "orpo", "preference": {"ftx": 1}}]},
            Expect("spec.stages[0].preference.ftx",
                   "preference.ftx (an SFT loss on the chosen answer) applies to dpo and simpo stages only")),
    Invalid("labelSmoothing with the sigmoid loss", {"stages": [{"name": "d", "type": "dpo",
                                                                 "preference": {"labelSmoothing": 0.1}}]},
            Expect("spec.stages[0].preference.labelSmoothing",
                   "preference.labelSmoothing is read by dpo stages with lossType exo_pair, robust, aot or "
                   "aot_unpaired only")),
    Invalid("exo_pair without labelSmoothing", {"stages": [{"name": "d", "type": "dpo",
                                                            "preference": {"lossType": "exo_pair"}}]},
            Expect("spec.stages[0].preference.labelSmoothing",
                   "lossType exo_pair needs preference.labelSmoothing above 0")),
    Invalid("robust with labelSmoothing 0.5", {"stages": [{"name": "d", "type": "dpo",
                                                           "preference": {"lossType": "robust", "labelSmoothing": 0.5}}]},
            Expect("spec.stages[0].preference.labelSmoothing",
                   "lossType robust needs preference.labelSmoothing below 0.5")),
]
