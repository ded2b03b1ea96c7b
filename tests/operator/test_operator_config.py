"""Operator flags and environment; peering manifests; the layering rule (no training stack)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from kubetune.operator.config import parse_config
from kubetune.operator.peering import peering_manifests


def test_defaults_flags_and_environment(monkeypatch):
    cfg, _ = parse_config([])
    assert cfg.namespaces == () and cfg.poll_interval == 5.0 and cfg.runtime_metrics_port == 9400
    assert cfg.runtime_command == ("python", "-m", "kubetune.runtime", "stage")
    monkeypatch.setenv("KUBETUNE_OPERATOR_RUNTIME_IMAGE", "reg/runtime:9")
    monkeypatch.setenv("KUBETUNE_OPERATOR_NAMESPACES", "ml, research")
    monkeypatch.setenv("KUBETUNE_OPERATOR_POLL_INTERVAL", "2.5")
    cfg, _ = parse_config([])
    assert (cfg.runtime_image, cfg.namespaces, cfg.poll_interval) == ("reg/runtime:9", ("ml", "research"), 2.5)
    cfg, _ = parse_config(["-n", "a", "--runtime-image", "x:1", "--metrics-port", "0", "--standalone",
                           "--runtime-command", "python /opt/stage.py --verbose"])
    assert cfg.namespaces == ("a",) and cfg.runtime_image == "x:1" and cfg.metrics_port == 0 and cfg.standalone
    assert cfg.runtime_command == ("python", "/opt/stage.py", "--verbose")
    cfg, _ = parse_config(["-A"])
    assert cfg.namespaces == ()


def test_peering_manifests():
    kinds = [(d["kind"], d["metadata"]["name"]) for d in peering_manifests("kubetune")]
    assert kinds == [("CustomResourceDefinition", "clusterkopfpeerings.kopf.dev"),
                     ("CustomResourceDefinition", "kopfpeerings.kopf.dev"), ("ClusterKopfPeering", "kubetune")]
    ns = peering_manifests("kubetune", ("a", "b"))[2:]
    assert [(d["kind"], d["metadata"]["namespace"]) for d in ns] == [("KopfPeering", "a"), ("KopfPeering", "b")]


def test_operator_starts_without_the_training_stack():
    code = ("import sys; from kubetune.operator.main import run_operator; import kubetune.operator.handlers;"
            "rc = run_operator(['--print-peering-manifests']);"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft', 'trl', 'datasets')];"
            "print('HEAVY', heavy, rc, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "HEAVY [] 0" in r.stderr
    assert len(list(yaml.safe_load_all(r.stdout))) == 3


def test_kopf_settings_let_a_deleted_finetunejob_go_within_seconds():
    import kopf

    from kubetune.operator.handlers import configure_settings

    settings = kopf.OperatorSettings()
    assert settings.background.cancellation_polling == 60  # kopf's default: a minute per deletion re-check
    configure_settings(settings)
    assert settings.persistence.finalizer == "kubetune.io/finalizer"
    assert settings.background.cancellation_polling <= 1.0 and settings.background.instant_exit_timeout <= 0.1
    assert settings.posting.enabled and not settings.posting.loggers


def test_model_cache_settings(monkeypatch):
    cfg, _ = parse_config([])
    assert cfg.model_cache_claim is None and cfg.model_cache_sub_path is None
    monkeypatch.setenv("KUBETUNE_OPERATOR_MODEL_CACHE_CLAIM", "models")
    monkeypatch.setenv("KUBETUNE_OPERATOR_MODEL_CACHE_SUB_PATH", "hf")
    cfg, _ = parse_config([])
    assert (cfg.model_cache_claim, cfg.model_cache_sub_path) == ("models", "hf")
    assert parse_config(["--model-cache-claim", "other"])[0].model_cache_claim == "other"
    with pytest.raises(SystemExit, match="--model-cache-sub-path"):
        parse_config(["--model-cache-sub-path", "../x"])
    monkeypatch.delenv("KUBETUNE_OPERATOR_MODEL_CACHE_SUB_PATH")
    with pytest.raises(SystemExit, match="--model-cache-claim"):
        parse_config(["--model-cache-claim", "Bad_Name"])
