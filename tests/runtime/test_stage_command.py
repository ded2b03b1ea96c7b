"""`python -m kubetune.runtime stage --config stage.json`, what a pod runs, as a process: in a
pod's environment (a scratch folder, a termination-message file) it trains, puts its caches and
work files on the scratch folder, and leaves its final progress as the termination message."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from tests.conftest import job_doc, write_alpaca
from tests.storage.support import free_port


def test_a_stage_pod_leaves_its_final_progress_and_writes_only_to_scratch(tiny_model, tmp_path):
    from kubetune.runtime.api.plan import plan
    from kubetune.runtime.api.spec import load_job

    data = write_alpaca(tmp_path / "data" / "identity.json")
    stage = {"name": "sft", "type": "sft", "method": "lora",
             "hyperparameters": {"maxSteps": 4, "batchSize": 2, "loggingSteps": 1, "cutoffLen": 64,
                                 "gradientCheckpointing": False}}
    doc = job_doc("pod", tiny_model, [{"name": "d", "source": str(data)}], [stage], tmp_path / "storage",
                  resources={"gpusPerNode": 0})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    config = tmp_path / "stage.json"
    config.write_text(json.dumps(plan(load_job(str(tmp_path / "job.yaml")))[0].to_yaml_dict()))
    scratch, termination = tmp_path / "scratch", tmp_path / "termination-log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBETUNE_", "TMPDIR", "XDG_", "HF_HOME"))}
    env.update(KUBETUNE_SCRATCH=str(scratch), KUBETUNE_TERMINATION_LOG=str(termination), POD_IP="127.0.0.1",
               KUBETUNE_METRICS_PORT=str(free_port()), KUBETUNE_DEVICE="cpu")
    r = subprocess.run([sys.executable, "-m", "kubetune.runtime", "stage", "--config", str(config)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    final = json.loads(termination.read_text())["progress"]
    assert final["phase"] == "finished" and final["step"] == final["totalSteps"] == 4
    assert isinstance(final["loss"], float) and final["job"] == "pod" and final["stage"] == "sft"
    # the work folder and temp files went to the scratch folder
    assert (scratch / "work" / "pod" / "sft").is_dir() and (scratch / "tmp").is_dir()
