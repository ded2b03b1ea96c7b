"""`kubetune board`: a local web UI over FineTuneJobs (issue #22).

- `server.py`: the Starlette app of the HTTP contract in `API.md`, and the CLI command;
- `local.py`: local mode, the runs `kubetune run` writes under `--saves`;
- `cluster.py`: cluster mode, the FineTuneJobs of a namespace through the user's kubeconfig;
- `forms.py`: the new-run form's schema, LLaMA-Factory names, presets, validation and estimate;
- `chat.py`: streamed chat with a run's output (imports the training stack on first use);
- `static/`: the front end's pages.

Nothing here imports torch at import time.
"""
