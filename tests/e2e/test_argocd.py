"""argocd/health.lua against live FineTuneJobs: the operator (as in test_operator.py, with its
FAKE RUNTIME) runs jobs through Pending, Running, Suspended, Succeeded and two kinds of Failed;
at each point the health script, run through lupa on the object read from the apiserver, must
say what Argo CD should show.

With KUBETUNE_ARGOCD_CAPTURE=1 the objects are also written to argocd/testdata/ (managedFields
dropped, the temporary storage folder written as /data) — that is how those files were made;
tests/chart/test_argocd_health.py then checks every case of argocd/health_test.yaml offline.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chart.argocd_lua import ARGOCD, health  # noqa: E402
from operatorlib import apply, ftj, quickstart, wait_status  # noqa: E402

pytestmark = pytest.mark.e2e

pytest.importorskip("lupa")

CAPTURE = os.environ.get("KUBETUNE_ARGOCD_CAPTURE") == "1"


def capture(obj: dict, name: str, store, note: str = "") -> None:
    if not CAPTURE:
        return
    obj = copy.deepcopy(obj)
    obj["metadata"].pop("managedFields", None)
    text = yaml.safe_dump(obj, sort_keys=False).replace(store.uri(), "s3://data").replace(store.endpoint,
                                                                                          "http://s3.storage:9000")
    head = f"# Captured from a live e2e run (tests/e2e/test_argocd.py){': ' + note if note else ''}\n"
    (ARGOCD / "testdata" / f"{name}.yaml").write_text(head + text)


# Generous timeouts: the host is shared, and one slow run (76 s instead of ~30 s) has been seen.
def test_health_of_live_finetunejobs(control_plane, kube, operator, namespace, store):
    ns = namespace
    pend = quickstart(store, name="argo-pending", step_s=0.3, max_steps=4)
    pend["spec"]["resources"] = {"nodeSelector": {"kubetune.io/no-such-node": "x"}}
    run = quickstart(store, name="argo-run", step_s=0.4, max_steps=12, every=2)
    bad = quickstart(store, name="argo-baddata")
    bad["spec"]["data"][0]["source"] = store.uri("missing.json")
    invalid = quickstart(store, name="argo-invalid")
    del invalid["spec"]["storage"]
    for doc in (pend, run, bad, invalid):
        apply(control_plane, doc, ns)

    # Pending: unschedulable pod
    o = wait_status(kube, ns, "argo-pending", lambda s: s.get("phase") == "Pending" and s.get("conditions"), 120,
                    "Pending", operator)
    hs = health(o)
    assert hs["status"] == "Progressing" and hs["message"].startswith("Pending"), hs
    capture(o, "pending", store, "a stage pod that cannot be scheduled")
    new = copy.deepcopy(o)
    new.pop("status")
    assert health(new)["status"] == "Progressing"
    capture(new, "new", store, "status removed (as just after kubectl apply, before the operator acts)")
    control_plane.kubectl("delete", "ftj", "-n", ns, "argo-pending", "--wait=false")

    # Running with progress
    o = wait_status(kube, ns, "argo-run", lambda s: s.get("phase") == "Running" and (s.get("progress") or {}).get("step"),
                    120, "Running", operator)
    hs = health(o)
    assert hs["status"] == "Progressing" and hs["message"].startswith("Running stage sft (1/1), "), hs
    capture(o, "running", store)
    ahead = copy.deepcopy(o)
    ahead["metadata"]["generation"] += 1
    assert health(ahead) == {"status": "Progressing",
                             "message": f"Waiting for the kubetune operator to observe generation {ahead['metadata']['generation']}"}
    capture(ahead, "running-new-generation", store,
            "metadata.generation bumped by hand (a spec change the operator has not observed yet)")

    # Suspended, then resumed to success
    r = control_plane.kubectl("patch", "ftj", "-n", ns, "argo-run", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    assert r.returncode == 0, r.stderr
    o = wait_status(kube, ns, "argo-run", lambda s: s.get("phase") == "Suspended", 60, "Suspended", operator)
    o = ftj(kube, ns, "argo-run")
    assert health(o)["status"] == "Suspended", health(o)
    capture(o, "suspended", store)
    r = control_plane.kubectl("patch", "ftj", "-n", ns, "argo-run", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    assert r.returncode == 0, r.stderr
    o = wait_status(kube, ns, "argo-run", lambda s: s.get("phase") == "Succeeded", 150, "Succeeded", operator)
    assert health(o) == {"status": "Healthy",
                         "message": f"Succeeded: output at {store.uri('saves', 'argo-run', 'sft', 'output')}"}
    capture(o, "succeeded", store)
    # a spec change after the end: recorded, ignored, still Healthy
    r = control_plane.kubectl("patch", "ftj", "-n", ns, "argo-run", "--type=merge", "-p",
                              '{"spec":{"checkpoint":{"everySteps":3}}}')
    assert r.returncode == 0, r.stderr
    gen = ftj(kube, ns, "argo-run")["metadata"]["generation"]
    o = wait_status(kube, ns, "argo-run", lambda s: s.get("observedGeneration") == gen, 60, "new generation observed",
                    operator)
    assert health(o)["status"] == "Healthy"
    capture(o, "succeeded-spec-changed", store, "a spec change after success (SpecChangeIgnored)")

    # Failed: bad input, and a spec that fails validation
    o = wait_status(kube, ns, "argo-baddata", lambda s: s.get("phase") == "Failed", 120, "Failed", operator)
    hs = health(o)
    assert hs["status"] == "Degraded" and "missing.json: file not found" in hs["message"], hs
    capture(o, "failed-bad-input", store)
    o = wait_status(kube, ns, "argo-invalid", lambda s: s.get("phase") == "Failed", 120, "Failed", operator)
    hs = health(o)
    assert hs["status"] == "Degraded" and "spec.storage.uri" in hs["message"], hs
    capture(o, "failed-validation", store)
    print("\n" + json.dumps({"captured": CAPTURE}))
