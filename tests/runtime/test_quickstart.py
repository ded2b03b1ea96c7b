"""The README's quickstart, run as a new user would: `bash scripts/quickstart.sh DIR` builds a
tiny model and an identity dataset, fine-tunes it with `kubetune run`, and the model then
answers "Who are you?" with the identity it was taught."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_readme_quickstart_teaches_the_identity(tmp_path):
    readme = (REPO / "README.md").read_text()
    assert "bash scripts/quickstart.sh" in readme  # the command we run is the one the README gives
    env = dict(os.environ)
    if (Path(sys.prefix) / ".complete").exists():  # inside the venv scripts/env.sh made: reuse it
        env["KUBETUNE_VENV"] = sys.prefix
    demo = tmp_path / "demo"
    r = subprocess.run(["bash", str(REPO / "scripts" / "quickstart.sh"), str(demo)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    # the demo's own answer, then the `kubetune chat --prompt` the script runs last
    assert "bot> I am Kubi, an AI assistant fine-tuned by the kubetune team." in r.stdout, r.stdout
    assert r.stdout.strip().splitlines()[-1] == "I am Kubi, an AI assistant fine-tuned by the kubetune team."
    assert (demo / "saves" / "sft" / "output" / "adapter_model.safetensors").exists()
    assert (demo / "saves" / "sft" / "output" / "training_loss.png").exists()
