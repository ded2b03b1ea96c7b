"""Operator configuration: flags, with environment variables as their defaults.

Every setting has a flag and a `KUBETUNE_OPERATOR_*` variable (the Helm chart sets the
variables); flags win. Nothing here talks to the cluster.
"""

from __future__ import annotations

import argparse
import json
import dataclasses
import os
import shlex

from kubetune.runtime import __version__
from kubetune.runtime.api.contract import METRICS_PORT

from .policy import Policy, parse_policy

DEFAULT_RUNTIME_IMAGE = f"ghcr.io/kubetune/runtime:{__version__}"


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    runtime_image: str = DEFAULT_RUNTIME_IMAGE
    image_pull_policy: str = "IfNotPresent"
    namespaces: tuple[str, ...] = ()  # empty: every namespace (cluster-wide)
    metrics_port: int = 8080  # the operator's own Prometheus /metrics (0 = off)
    health_port: int = 8081  # kopf liveness endpoint /healthz (0 = off)
    runtime_metrics_port: int = METRICS_PORT  # where runtime pods serve /metrics and /progress
    poll_interval: float = 5.0  # seconds between /progress polls of a running job, at the fastest
    max_poll_interval: float = 60.0  # ... and at the slowest (slow steps, many running jobs)
    resync_interval: float | None = None  # seconds between looks at a waiting job; None: 10 × poll, at most 30
    status_writes_per_second: float = 10.0  # progress updates of all running jobs together, at most
    workers: int = 16  # reconcile threads
    progress_timeout: float = 2.0  # seconds one /progress request may take
    peering: str = "kubetune"  # kopf peering object; two replicas never both act
    priority: int | None = None  # peering priority; None: random, so exactly one replica leads
    standalone: bool = False  # no peering at all (one replica only, e.g. tests)
    runtime_command: tuple[str, ...] = ("python", "-m", "kubetune.runtime", "stage")
    service_account: str | None = None  # ServiceAccount of training pods (no API rights needed)
    # GPU scheduling defaults for training pods whose FineTuneJob sets none of its own
    default_runtime_class_name: str | None = None
    default_node_selector: tuple[tuple[str, str], ...] = ()
    default_tolerations: tuple[str, ...] = ()  # JSON of each toleration (hashable)
    policy: Policy | None = None  # what a FineTuneJob may ask of its pods (operator/policy.py); None: anything
    # a NetworkPolicy per stage (manifests.build_network_policy): JSON of the chart's
    # trainingNetworkPolicy values; empty: none
    network_policy: str = ""
    # the cluster model cache (a PVC in each job's namespace) of jobs whose spec names none:
    # the chart's modelCache values; None: no cache unless the spec asks (manifests.model_cache)
    model_cache_claim: str | None = None
    model_cache_sub_path: str | None = None

    @property
    def resync_seconds(self) -> float:
        """Seconds between looks at a job that waits (handlers.next_tick)."""
        return self.resync_interval or min(30.0, 10 * self.poll_interval)


def _env(name: str, default: str) -> str:
    return os.environ.get(f"KUBETUNE_OPERATOR_{name}", default)


def _bool_env(name: str) -> bool:
    return _env(name, "").strip().lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    d = OperatorConfig()
    p = argparse.ArgumentParser(
        prog="kubetune operator",
        description="Run the kubetune operator: reconcile FineTuneJobs into Jobs and status.",
    )
    p.add_argument("--runtime-image", default=_env("RUNTIME_IMAGE", d.runtime_image),
                   help="default runtime image of training pods (env KUBETUNE_OPERATOR_RUNTIME_IMAGE)")
    p.add_argument("--image-pull-policy", choices=["Always", "IfNotPresent", "Never"],
                   default=_env("IMAGE_PULL_POLICY", d.image_pull_policy),
                   help="default pull policy of the runtime image (env KUBETUNE_OPERATOR_IMAGE_PULL_POLICY)")
    p.add_argument("-n", "--namespace", action="append", dest="namespaces", default=None,
                   help="namespace to watch; repeat for several; default: all namespaces "
                        "(env KUBETUNE_OPERATOR_NAMESPACES, comma-separated)")
    p.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)")
    p.add_argument("--metrics-port", type=int, default=int(_env("METRICS_PORT", str(d.metrics_port))),
                   help="port of the operator's Prometheus /metrics; 0 turns it off (env KUBETUNE_OPERATOR_METRICS_PORT)")
    p.add_argument("--health-port", type=int, default=int(_env("HEALTH_PORT", str(d.health_port))),
                   help="port of the liveness endpoint /healthz; 0 turns it off (env KUBETUNE_OPERATOR_HEALTH_PORT)")
    p.add_argument("--runtime-metrics-port", type=int,
                   default=int(_env("RUNTIME_METRICS_PORT", str(d.runtime_metrics_port))),
                   help="port runtime pods serve /metrics and /progress on (env KUBETUNE_OPERATOR_RUNTIME_METRICS_PORT)")
    p.add_argument("--poll-interval", type=float, default=float(_env("POLL_INTERVAL", str(d.poll_interval))),
                   help="seconds between reconciles and progress polls of each job (env KUBETUNE_OPERATOR_POLL_INTERVAL)")
    p.add_argument("--max-poll-interval", type=float, default=float(_env("MAX_POLL_INTERVAL", str(d.max_poll_interval))),
                   help="the slowest a running job is polled: jobs are polled once per training step, at least every "
                        "--poll-interval, and slower when many run (env KUBETUNE_OPERATOR_MAX_POLL_INTERVAL)")
    p.add_argument("--resync-interval", type=float, default=float(_env("RESYNC_INTERVAL", "0")) or None,
                   help="seconds between looks at a job that waits (queued, suspended, pods not created); default "
                        "10 × --poll-interval, at most 30 (env KUBETUNE_OPERATOR_RESYNC_INTERVAL)")
    p.add_argument("--status-writes-per-second", type=float,
                   default=float(_env("STATUS_WRITES_PER_SECOND", str(d.status_writes_per_second))),
                   help="progress updates written to the status of all running jobs together, at most "
                        "(env KUBETUNE_OPERATOR_STATUS_WRITES_PER_SECOND)")
    p.add_argument("--workers", type=int, default=int(_env("WORKERS", str(d.workers))),
                   help="reconcile threads (env KUBETUNE_OPERATOR_WORKERS)")
    p.add_argument("--peering", default=_env("PEERING", d.peering),
                   help="kopf peering name; replicas with the same name never act together (env KUBETUNE_OPERATOR_PEERING)")
    p.add_argument("--priority", type=int, default=None,
                   help="peering priority (default random: the highest live replica acts, the others pause)")
    p.add_argument("--standalone", action="store_true", default=_bool_env("STANDALONE"),
                   help="no peering: only for a single replica (env KUBETUNE_OPERATOR_STANDALONE)")
    p.add_argument("--service-account", default=_env("SERVICE_ACCOUNT", "") or None,
                   help="ServiceAccount for training pods (default: the namespace's default)")
    p.add_argument("--runtime-command", default=_env("RUNTIME_COMMAND", " ".join(d.runtime_command)),
                   help="command that runs one stage inside the runtime image; `--config <stage.json>` is "
                        "appended (env KUBETUNE_OPERATOR_RUNTIME_COMMAND)")
    p.add_argument("--default-runtime-class-name", default=_env("DEFAULT_RUNTIME_CLASS_NAME", "") or None,
                   help="runtimeClassName of training pods whose spec sets none, e.g. nvidia "
                        "(env KUBETUNE_OPERATOR_DEFAULT_RUNTIME_CLASS_NAME)")
    p.add_argument("--default-node-selector", default=_env("DEFAULT_NODE_SELECTOR", "{}"),
                   help="JSON node selector of training pods whose spec sets none "
                        "(env KUBETUNE_OPERATOR_DEFAULT_NODE_SELECTOR)")
    p.add_argument("--default-tolerations", default=_env("DEFAULT_TOLERATIONS", "[]"),
                   help="JSON list of tolerations of training pods whose spec sets none "
                        "(env KUBETUNE_OPERATOR_DEFAULT_TOLERATIONS)")
    p.add_argument("--policy", default=_env("POLICY", ""),
                   help="JSON of the chart's `policy` values: what a FineTuneJob may ask of its training pods "
                        "(images, hostNetwork, placement, annotations, labels, Secrets); a job that asks for "
                        "more fails with reason PolicyViolation before anything is created; empty: no policy "
                        "(env KUBETUNE_OPERATOR_POLICY)")
    p.add_argument("--training-network-policy", default=_env("TRAINING_NETWORK_POLICY", ""),
                   help="JSON {operatorNamespace, operatorPodLabels, monitoringNamespaces, egress}: give every "
                        "stage a NetworkPolicy (its pods reach each other, the operator and the monitoring "
                        "namespaces reach /metrics and /progress, nothing else gets in; egress as given, or "
                        "open when egress is null); empty: none (env KUBETUNE_OPERATOR_TRAINING_NETWORK_POLICY)")
    p.add_argument("--model-cache-claim", default=_env("MODEL_CACHE_CLAIM", "") or None,
                   help="PersistentVolumeClaim (in each job's namespace) mounted in every stage pod as the model "
                        "cache (HF_HUB_CACHE and the cache of s3:// models) when the job's spec.resources.modelCache "
                        "says nothing; default: none (env KUBETUNE_OPERATOR_MODEL_CACHE_CLAIM)")
    p.add_argument("--model-cache-sub-path", default=_env("MODEL_CACHE_SUB_PATH", "") or None,
                   help="folder inside the --model-cache-claim volume (env KUBETUNE_OPERATOR_MODEL_CACHE_SUB_PATH)")
    p.add_argument("--log-format", choices=["json", "plain"], default=_env("LOG_FORMAT", "json"),
                   help="structured JSON logs (default) or plain text (env KUBETUNE_OPERATOR_LOG_FORMAT)")
    p.add_argument("--print-peering-manifests", action="store_true",
                   help="print the kopf peering CRDs and objects this configuration needs, then exit")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def parse_config(argv: list[str] | None = None) -> tuple[OperatorConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    namespaces: tuple[str, ...] = ()
    if not args.all_namespaces:
        if args.namespaces:
            namespaces = tuple(args.namespaces)
        elif _env("NAMESPACES", ""):
            namespaces = tuple(n.strip() for n in _env("NAMESPACES", "").split(",") if n.strip())
    if args.poll_interval <= 0:
        raise SystemExit("kubetune operator: --poll-interval must be > 0")
    for flag, value in (("--max-poll-interval", args.max_poll_interval), ("--status-writes-per-second",
                        args.status_writes_per_second), ("--workers", args.workers),
                        ("--resync-interval", args.resync_interval if args.resync_interval is not None else 1)):
        if value <= 0:
            raise SystemExit(f"kubetune operator: {flag} must be > 0")
    selector, tolerations = _json_arg(args.default_node_selector, dict, "--default-node-selector"), \
        _json_arg(args.default_tolerations, list, "--default-tolerations")
    try:
        policy = parse_policy(args.policy)
    except ValueError as err:
        raise SystemExit(f"kubetune operator: {err}") from None
    cache_claim, cache_sub_path = _model_cache_arg(args.model_cache_claim, args.model_cache_sub_path)
    # the flags whose value is the setting as it is; the others are parsed first
    as_given = ("runtime_image", "image_pull_policy", "metrics_port", "health_port", "runtime_metrics_port",
                "poll_interval", "max_poll_interval", "resync_interval", "status_writes_per_second", "workers",
                "peering", "priority", "standalone", "service_account", "default_runtime_class_name")
    cfg = OperatorConfig(
        **{name: getattr(args, name) for name in as_given},
        namespaces=namespaces,
        runtime_command=tuple(shlex.split(args.runtime_command)),
        default_node_selector=tuple(sorted((str(k), str(v)) for k, v in selector.items())),
        default_tolerations=tuple(json.dumps(t, sort_keys=True) for t in tolerations),
        policy=policy,
        network_policy=_network_policy_arg(args.training_network_policy),
        model_cache_claim=cache_claim,
        model_cache_sub_path=cache_sub_path,
    )
    return cfg, args


def _model_cache_arg(claim: str | None, sub_path: str | None) -> tuple[str | None, str | None]:
    """Checked as the spec's own field (a typo fails at start, not in every pod)."""
    if not claim:
        if sub_path:
            raise SystemExit("kubetune operator: --model-cache-sub-path needs --model-cache-claim")
        return None, None
    from pydantic import ValidationError

    from kubetune.runtime.api.spec import ModelCacheSpec

    try:
        ModelCacheSpec(claimName=claim, subPath=sub_path)
    except ValidationError as err:
        first = err.errors()[0]
        raise SystemExit(f"kubetune operator: --model-cache-{'claim' if first['loc'][0] == 'claimName' else 'sub-path'}"
                         f": {first['msg']}") from None
    return claim, sub_path


def _network_policy_arg(text: str) -> str:
    """Checked here (a typo fails at start, not at the first stage); kept as JSON (hashable)."""
    if not text.strip():
        return ""
    doc = _json_arg(text, dict, "--training-network-policy")
    known = {"operatorNamespace", "operatorPodLabels", "monitoringNamespaces", "egress", "enabled"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise SystemExit(f"kubetune operator: --training-network-policy: unknown key(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    if not doc.get("operatorNamespace"):
        raise SystemExit("kubetune operator: --training-network-policy: operatorNamespace is required")
    if doc.get("enabled") is False:
        return ""
    return json.dumps(doc, sort_keys=True)


def _json_arg(text: str, kind: type, flag: str):
    try:
        value = json.loads(text or ("{}" if kind is dict else "[]"))
    except json.JSONDecodeError as err:
        raise SystemExit(f"kubetune operator: {flag}: not valid JSON: {err}") from None
    if not isinstance(value, kind):
        raise SystemExit(f"kubetune operator: {flag}: expected a JSON {kind.__name__}")
    return value
