"""`kubetune`: run, validate and inspect FineTuneJobs; also usable as `kubectl kubetune`.

Heavy imports (torch, transformers) happen inside the commands that train or chat, so
`kubetune validate`, `kubetune crd` and `--help` stay fast and work without the training stack.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .api.errors import EXIT_BAD_INPUT, EXIT_FAILED, UserError

EPILOG = """examples:
  kubetune demo                                  # build a tiny model + data, fine-tune it, chat
  kubetune validate examples/quickstart.yaml
  kubetune run examples/quickstart.yaml --set stages.0.hyperparameters.maxSteps=50
  kubetune chat --model saves/quickstart/sft/output --prompt "Who are you?"
  kubetune export --model BASE --adapter saves/job/sft/output --out merged/
  kubetune eval --model saves/job/sft/output --data test.json --out eval/    # ROUGE/BLEU
  kubetune eval --model BASE --data mmlu.jsonl --format choice --few-shot 5   # accuracy
  kubetune crd | kubectl apply -f -
  kubetune convert llama3_lora_sft.yaml -o job.yaml   # from LLaMA-Factory (v0 or v1) / NeMo AutoModel
  kubetune estimate job.yaml --gpu-memory 24GB
  kubectl kubetune get; kubectl kubetune logs -f JOB  # cluster views
  kubetune board                                 # web UI: runs, loss curves, new runs, chat
"""


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a spec field, e.g. stages.0.hyperparameters.maxSteps=100 (repeatable; "
        "paths are relative to spec; values are YAML)",
    )


def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kubeconfig", help="kubeconfig file (default $KUBECONFIG, ~/.kube/config, or in-cluster)")
    p.add_argument("--context", help="kubeconfig context")
    p.add_argument("-n", "--namespace", help="namespace (default: the context's, else default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune",
        description="Fine-tune LLMs from one FineTuneJob YAML: locally (`kubetune run`) or on "
        "Kubernetes (`kubectl apply`).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kubetune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run every stage of a FineTuneJob on this machine")
    p.add_argument("file", help="FineTuneJob YAML")
    _add_overrides(p)
    p.add_argument("--output-root", help="storage root when spec.storage.uri is unset (default ./saves/<name>)")
    p.add_argument("--stage", help="run only this stage (its inputs must already exist)")
    p.add_argument("--metrics-port", type=int, help="expose Prometheus metrics on this port")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")

    p = sub.add_parser("validate", help="check a FineTuneJob offline, exactly as the cluster would")
    p.add_argument("file", help="FineTuneJob YAML")
    _add_overrides(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing when valid")

    p = sub.add_parser("plan", help="print the resolved stages (what each reads and writes)")
    p.add_argument("file", help="FineTuneJob YAML")
    _add_overrides(p)
    p.add_argument("--output-root", help="storage root when spec.storage.uri is unset")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")

    sub.add_parser("crd", help="print the FineTuneJob CustomResourceDefinition YAML")

    p = sub.add_parser("demo", help="offline quickstart: tiny model + identity data → fine-tune → chat")
    p.add_argument("--dir", default="kubetune-demo", help="where to put the model, data and outputs")
    p.add_argument("--name", default="Kubi", help="the identity the model is taught")
    p.add_argument("--creator", default="the kubetune team", help="who it says made it")
    p.add_argument("--prepare-only", action="store_true", help="write the model, data and job file; do not train")

    p = sub.add_parser("chat", help="talk to a base model, a trained adapter or an exported model")
    p.add_argument("--model", required=True, help="model folder or id, or an adapter folder (its base is read from adapter_config.json)")
    p.add_argument("--adapter", help="adapter folder to apply on top of --model")
    p.add_argument("--template", help="named chat template for models without one")
    p.add_argument("--prompt", help="answer this one prompt and exit (for scripts)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--quantization", choices=["auto", "none", "4", "8"], default="auto",
                   help="load the base in 4 or 8 bits (bitsandbytes), as a qlora stage does: a 70B base in 4-bit "
                   "needs ~40 GB instead of ~140; auto (default): the run's own quantisation for an adapter "
                   "from a qlora run, else none")

    p = sub.add_parser("export", help="merge an adapter into its base model and save a standalone model")
    p.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + safetensors)")
    p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto")
    p.add_argument("--merge", choices=["auto", "layered", "in-memory"], default="auto",
                   help="layered: stream the base's safetensors shards one at a time (peak memory ≈ one shard + "
                   "the adapter; for models bigger than memory); in-memory: load the whole base and merge with "
                   "peft; auto (default): layered when the base is a local safetensors folder and the adapter "
                   "supports it")

    p = sub.add_parser(
        "eval",
        help="score a model or adapter: ROUGE/BLEU of generated answers, multiple-choice accuracy",
        description="Evaluate a model, a trained adapter or an exported model on local files, with the "
        "code of the eval stage. Generation data (alpaca, sharegpt, messages): greedy answers to each "
        "prompt, scored against the reference answer with ROUGE-1/2/L and BLEU-4 as LLaMA-Factory's "
        "predict mode does (generated_predictions.jsonl, predict_results.json). Choice data "
        "(question, choices A/B/C/D or a `choices` list, answer letter, optional subject): the choice "
        "with the highest log-likelihood is the model's answer; accuracy overall and per subject "
        "(choice_predictions.jsonl, choice_results.json). Scores are × 100.",
    )
    p.add_argument("--model", required=True, help="model folder or id, or an adapter folder (its base is read from adapter_config.json)")
    p.add_argument("--adapter", help="adapter folder to apply on top of --model")
    p.add_argument("--data", required=True, action="append", metavar="FILE",
                   help="dataset file (json, jsonl, parquet, csv); repeat for several (all in --format)")
    p.add_argument("--format", default="alpaca", choices=["alpaca", "sharegpt", "messages", "choice"],
                   help="record layout of --data (default alpaca)")
    p.add_argument("--column", action="append", default=[], metavar="ROLE=COLUMN",
                   help="a column of another name, e.g. question=q or answer=label (repeatable; the roles of "
                   "the dataset's `columns`)")
    p.add_argument("--out", default="eval-results", help="folder for the result files (default ./eval-results)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generation: tokens per answer (default 128)")
    p.add_argument("--few-shot", type=int, default=0, metavar="N", help="choice: solved examples before each question")
    p.add_argument("--few-shot-data", metavar="FILE", help="choice: take the few-shot examples from this file (a dev split)")
    p.add_argument("--scoring", choices=["letter", "text"], default="letter",
                   help="choice: compare the answer letters (MMLU style, default) or the choices' own texts")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    p.add_argument("--cutoff-len", type=int, default=2048, help="longest prompt in tokens (default 2048)")
    p.add_argument("--max-samples", type=int, help="use at most this many records of each file")
    p.add_argument("--template", help="named chat template for models without one")

    p = sub.add_parser(
        "operator",
        help="run the Kubernetes operator (kopf); `kubetune operator --help` lists its flags",
        add_help=False,
    )
    p.add_argument("operator_args", nargs=argparse.REMAINDER)

    p = sub.add_parser("convert", help="turn a LLaMA-Factory (v0 or v1) or NeMo AutoModel config into a FineTuneJob")
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="LLaMA-Factory training YAML (optionally followed by its export YAML), a LLaMA-Factory v1 config "
                        "(model/peft_config/train_dataset; optionally followed by its merge YAML), or a NeMo AutoModel recipe")
    p.add_argument("-o", "--output", help="write the FineTuneJob here (default: stdout)")
    p.add_argument("--dataset-dir", help="folder with dataset_info.json (default: the file's dataset_dir)")
    p.add_argument("--name", help="metadata.name of the job (default: from output_dir or the model)")

    p = sub.add_parser("estimate", help="expected GPU memory per device for each stage of a FineTuneJob")
    p.add_argument("file", help="FineTuneJob YAML")
    _add_overrides(p)
    p.add_argument("--gpu-memory", metavar="SIZE", help="memory of one GPU (e.g. 80GiB, 24GB); warn when a stage won't fit")
    p.add_argument("--params", metavar="N", help="model size when it cannot be read (e.g. 7B)")

    p = sub.add_parser("get", help="list FineTuneJobs with their progress (cluster)")
    p.add_argument("name", nargs="?", help="one job (default: all in the namespace)")
    _add_cluster_flags(p)
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")

    p = sub.add_parser("describe", help="status, conditions, per-stage history and events of a FineTuneJob (cluster)")
    p.add_argument("name")
    _add_cluster_flags(p)

    p = sub.add_parser("logs", help="logs of the current stage's rank-0 pod (cluster)")
    p.add_argument("name")
    _add_cluster_flags(p)
    p.add_argument("-f", "--follow", action="store_true", help="stream until the pod ends")
    p.add_argument("--stage", help="a stage other than the current one")
    p.add_argument("--tail", type=int, help="only the last N lines")
    p.add_argument("-c", "--container", help="container (default trainer)")

    p = sub.add_parser("watch", help="print progress until the FineTuneJob succeeds (exit 0) or fails (exit 1) (cluster)")
    p.add_argument("name")
    _add_cluster_flags(p)
    p.add_argument("--interval", type=float, default=5.0, help="seconds between polls (default 5)")
    p.add_argument("--timeout", type=float, help="give up after this many seconds (exit 2)")

    p = sub.add_parser(
        "board",
        help="a web UI over your runs: local ones (./saves) or a cluster's FineTuneJobs",
        description="Serve a web UI: the runs list with progress, each run's loss curve, logs, events and "
        "checkpoints, suspend/resume/delete, a form for new runs (validation, plan and memory estimate as "
        "`kubetune validate/plan/estimate` give them) and a chat with a finished run. Cluster mode acts with "
        "your kubeconfig's credentials; local mode on the runs `kubetune run` writes under --saves.",
    )
    p.add_argument("--mode", choices=["local", "cluster"],
                   help="default: cluster when a kubeconfig is usable, else local (the board says which)")
    p.add_argument("-n", "--namespace", help="cluster mode: the namespace (default: the context's, else default)")
    p.add_argument("--kubeconfig", help="cluster mode: kubeconfig file (default $KUBECONFIG, ~/.kube/config)")
    p.add_argument("--context", help="cluster mode: kubeconfig context")
    p.add_argument("--saves", default="./saves", help="local mode: where runs live (default ./saves)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; anything "
                   "but 127.0.0.1, ::1 or localhost needs --allow-remote)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--grafana-url", help="link each run to this Grafana dashboard URL")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow --host to be a non-loopback address: anyone who reaches the port acts as you")

    p = sub.add_parser("stage", help="run one resolved stage config (what runtime pods do)")
    p.add_argument("--config", required=True, help="resolved stage JSON (from the operator's ConfigMap)")
    p.add_argument("--metrics-port", type=int)
    return parser


def _cmd_validate(args) -> int:
    from .api.spec import load_job
    from .api.stage_types import stage_kind

    job = load_job(args.file, args.overrides)
    if not args.quiet:
        stages = " → ".join(f"{s.name} ({stage_kind(s.type, s.method)})" for s in job.spec.stages)
        print(f"{args.file}: valid FineTuneJob {job.metadata.name!r}: {stages}")
    return 0


def _cmd_plan(args) -> int:
    from .api.plan import plan
    from .api.spec import load_job
    from .api.stage_types import stage_kind

    stages = plan(load_job(args.file, args.overrides), args.output_root)
    if args.output == "json":
        print(json.dumps([s.to_yaml_dict() for s in stages], indent=2))
        return 0
    for s in stages:
        io = s.io
        src = io.policy.model + (f" + adapter {io.policy.adapter}" if io.policy.adapter else "")
        print(f"[{s.index + 1}/{s.count}] {s.name}: {stage_kind(s.stage.type, s.stage.method)}")
        print(f"    reads   {src}{' (merged first)' if io.merge_adapter else ''}")
        if io.reference:
            print(f"    ref     {io.reference.model}" + (f" + adapter {io.reference.adapter}" if io.reference.adapter else ""))
        if io.reward:
            print(f"    reward  {io.reward.model}" + (f" + adapter {io.reward.adapter}" if io.reward.adapter else ""))
        if s.data:
            print(f"    data    {', '.join(d.name + ' (' + d.source + ')' for d in s.data)}")
        print(f"    writes  {io.output} ({io.output_kind})")
    return 0


def _cmd_crd(args) -> int:
    from .crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def _cmd_run(args) -> int:
    from .local import run_job

    return run_job(
        args.file,
        overrides=args.overrides,
        output_root=args.output_root,
        only_stage=args.stage,
        metrics_port=args.metrics_port,
        progress=not args.no_progress,
    )


def _cmd_stage(args) -> int:
    from .local import run_stage_config

    return run_stage_config(args.config, metrics_port=args.metrics_port)


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(Path(args.dir), name=args.name, creator=args.creator, prepare_only=args.prepare_only)


def _cmd_chat(args) -> int:
    from .chat import chat_main

    return chat_main(args)


def _cmd_export(args) -> int:
    from .export import export_model

    out = export_model(args.adapter, args.out, base=args.model, dtype=args.dtype, merge=args.merge)
    print(f"exported a standalone model to {out}")
    return 0


def _cmd_eval(args) -> int:
    from .evaluate import eval_main

    return eval_main(args)


def _cmd_convert(args) -> int:
    from .convert import convert_files, render

    out_dir = Path(args.output).parent if args.output else None
    doc, warnings = convert_files(args.files, dataset_dir=args.dataset_dir, name=args.name, out_dir=out_dir)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    text = render(doc, warnings, [str(f) for f in args.files])
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output} ({len(warnings)} warning(s)); check it with `kubetune validate {args.output}`",
              file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _cmd_estimate(args) -> int:
    from .estimate import estimate_main

    return estimate_main(args.file, args.overrides, args.params, args.gpu_memory)


def _cmd_board(args) -> int:
    try:
        from .board.server import serve
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if missing not in ("starlette", "uvicorn", "kubernetes"):
            raise
        raise UserError(f"kubetune board needs the `board` extra (pip install 'kubetune[board]'): "
                        f"no module named {missing!r}") from None

    return serve(args)


def _cmd_cluster(args) -> int:
    from . import kubectl_plugin

    return getattr(kubectl_plugin, f"cmd_{args.command}")(args)


def _cmd_operator(args) -> int:
    from kubetune.operator.main import run_operator  # kopf, not torch

    return run_operator(args.operator_args) or 0


COMMANDS = {
    "operator": _cmd_operator,
    "run": _cmd_run,
    "validate": _cmd_validate,
    "plan": _cmd_plan,
    "crd": _cmd_crd,
    "demo": _cmd_demo,
    "chat": _cmd_chat,
    "export": _cmd_export,
    "eval": _cmd_eval,
    "stage": _cmd_stage,
    "convert": _cmd_convert,
    "estimate": _cmd_estimate,
    "get": _cmd_cluster,
    "describe": _cmd_cluster,
    "logs": _cmd_cluster,
    "watch": _cmd_cluster,
    "board": _cmd_board,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["operator"]:  # every flag belongs to the operator's own parser
        return _cmd_operator(argparse.Namespace(operator_args=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
