"""The torch-free part of kubetune.runtime: the FineTuneJob API (spec, stage types, plan), the failure table,
the overrides, and the contracts between the operator and the runtime (pod names, progress reports).

The operator imports only from here (and kubetune.runtime itself); nothing here may import torch,
transformers, peft, trl, bitsandbytes or datasets, directly or through another module:
tests/unit/test_import_boundary.py fails CI if it does.
"""
