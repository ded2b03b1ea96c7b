"""The chart's copies stay in sync with their sources: the FineTuneJob CRD (`kubetune crd`), the
kopf peering CRDs (`python -m kubetune.operator --print-peering-manifests`) and the Grafana
dashboard (dashboards/kubetune.json). No helm needed."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys

import pytest
import yaml

from kubetune.runtime.crd import crd_yaml

from .chartlib import CHART, REPO


def test_crd_copy_equals_kubetune_crd_output():
    assert (CHART / "crds" / "finetunejob.yaml").read_text() == crd_yaml(), (
        "charts/kubetune/crds/finetunejob.yaml is stale: run `kubetune crd > charts/kubetune/crds/finetunejob.yaml`")
    assert (REPO / "crds" / "finetunejob.yaml").read_text() == crd_yaml()


def test_peering_crds_equal_the_operators():
    out = subprocess.run([sys.executable, "-m", "kubetune.operator", "--print-peering-manifests"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    want = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "CustomResourceDefinition"]
    have = [d for d in yaml.safe_load_all((CHART / "crds" / "kopf-peering.yaml").read_text()) if d]
    assert {d["metadata"]["name"] for d in want} == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    assert have == want


def test_dashboard_copy_equals_dashboards_json():
    copy = (CHART / "files" / "kubetune.json").read_text()
    assert copy == (REPO / "dashboards" / "kubetune.json").read_text(), (
        "charts/kubetune/files/kubetune.json is stale: cp dashboards/kubetune.json charts/kubetune/files/")
    assert json.loads(copy)["uid"]


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "kubetune"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'version = "{chart["appVersion"]}"' in pyproject, "Chart appVersion follows the package version"
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"]), "every top-level value is in the schema and back"


def test_the_version_is_written_once():
    """pyproject.toml holds it; the code asks the installed distribution, the Makefile reads pyproject, the
    Dockerfiles take it as a build argument."""
    from kubetune.operator.config import DEFAULT_RUNTIME_IMAGE
    from kubetune.runtime import __version__
    from kubetune.runtime.cli import build_parser

    written = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert __version__ == written and DEFAULT_RUNTIME_IMAGE.endswith(f":{written}")
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
        build_parser().parse_args(["--version"])
    assert out.getvalue().strip() == f"kubetune {written}"
    for dockerfile in ("images/runtime/Dockerfile", "images/operator/Dockerfile"):
        assert re.search(r"^ARG VERSION$", (REPO / dockerfile).read_text(), re.M), f"{dockerfile}: ARG VERSION, no default"
    copies = [str(p.relative_to(REPO)) for p in (REPO / "runtime").rglob("*.py") if f'"{written}"' in p.read_text()]
    copies += [str(p.relative_to(REPO)) for p in (REPO / "operator").rglob("*.py") if f'"{written}"' in p.read_text()]
    assert not copies, f"the version written again in {copies}"
