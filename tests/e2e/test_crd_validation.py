"""The apiserver itself rejects invalid FineTuneJobs — OpenAPI schema and CEL rules from the
generated CRD — with messages that name the field; and the same documents fail `kubetune
validate` offline with its own message, so the two validations cannot drift apart. The cases are
the unit tests' too (tests/invalid_specs.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.invalid_specs import INVALID, patched


pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("case", INVALID, ids=[c.name for c in INVALID])
def test_apiserver_rejects_invalid_finetunejob(control_plane, crd, namespace, tmp_path, case):  # noqa: F811
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(patched(case.patch, "bad")))
    r = control_plane.kubectl("apply", "-n", namespace, "-f", str(f))
    assert r.returncode != 0, f"apiserver accepted {case.name}"
    missing = case.apiserver.missing_from(r.stderr)
    assert not missing, f"{missing} not in: {r.stderr}"
    offline = subprocess.run([sys.executable, "-m", "kubetune.runtime", "validate", str(f)], capture_output=True, text=True)
    assert offline.returncode == 42, offline.stdout + offline.stderr
    missing = case.offline.missing_from(offline.stderr)
    assert not missing, f"{missing} not in: {offline.stderr}"


def test_valid_twin_is_accepted(control_plane, crd, namespace, tmp_path):  # noqa: F811
    """The base document of the cases above is valid: each rejection comes from its one change."""
    f = tmp_path / "good.yaml"
    f.write_text(yaml.safe_dump(patched({}, "good")))
    r = control_plane.kubectl("apply", "-n", namespace, "-f", str(f))
    assert r.returncode == 0, r.stderr
