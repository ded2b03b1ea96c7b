"""kind-config.yaml, argocd/application.yaml and the guides: they parse, and what they promise
is there (the RuntimeClass the chart defaults to, the sync options docs/argocd.md explains)."""

from __future__ import annotations

import re

import yaml

from .chartlib import REPO


def test_kind_config():
    cfg = yaml.safe_load((REPO / "kind-config.yaml").read_text())
    assert cfg["kind"] == "Cluster" and cfg["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    roles = [n["role"] for n in cfg["nodes"]]
    assert roles[0] == "control-plane" and "worker" in roles
    text = (REPO / "kind-config.yaml").read_text()
    assert "/var/run/nvidia-container-devices/all" in text and "accept-nvidia-visible-devices-as-volume-mounts" in text


def test_argocd_applications():
    apps = [d for d in yaml.safe_load_all((REPO / "argocd" / "application.yaml").read_text()) if d]
    assert [a["kind"] for a in apps] == ["Application", "Application"]
    chart, jobs = apps
    assert chart["spec"]["source"]["path"] == "charts/kubetune"
    assert "ServerSideApply=true" in chart["spec"]["syncPolicy"]["syncOptions"]
    (ign,) = jobs["spec"]["ignoreDifferences"]
    assert ign["group"] == "kubetune.io" and ign["kind"] == "FineTuneJob" and "/status" in ign["jsonPointers"]
    assert "RespectIgnoreDifferences=true" in jobs["spec"]["syncPolicy"]["syncOptions"]
    doc = (REPO / "docs" / "argocd.md").read_text()
    for p in ign["jsonPointers"]:
        assert p in doc
    assert "Force=true,Replace=true" in doc and "resource.customizations.health.kubetune.io_FineTuneJob" in doc


def test_k3s_guide_covers_the_issue():
    doc = (REPO / "docs" / "k3s-dgx-spark.md").read_text()
    for needle in ("handler: nvidia", "nvidia-device-plugin", "gpu-operator", "minio", "kube-prometheus-stack",
                   "NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "ConnectX-7", "Unified memory", "grafana_dashboard",
                   "jobLabel", "runtime.runtimeClassName=nvidia", "AWS_ACCESS_KEY_ID"):
        assert needle in doc, needle
    # every relative link resolves
    for link in re.findall(r"\]\(((?:\.\./)?[\w./-]+)\)", doc):
        assert (REPO / "docs" / link).resolve().exists(), link
