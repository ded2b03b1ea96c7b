"""`kubetune operator` — start the operator.

    kubetune operator [--namespace NS ...] [--runtime-image IMG] [--poll-interval 5] ...
    python -m kubetune.operator ...            (the same, without the CLI wrapper)

Configuration comes from flags, with `KUBETUNE_OPERATOR_*` environment variables as defaults
(see `kubetune operator --help`). Watches every namespace unless namespaces are given. Two
replicas never both act: they join the kopf peering `--peering` (default `kubetune`; the
ClusterKopfPeering/KopfPeering CRDs must be installed, as the Helm chart does) with random
priorities, so the highest live replica works and the others pause; `--standalone` skips
peering for a single replica. Liveness: GET http://<pod>:<health-port>/healthz.
"""

from __future__ import annotations

import logging
import random
import sys

import kopf

from .config import OperatorConfig, parse_config
from .handlers import register
from .peering import peering_yaml

log = logging.getLogger("kubetune.operator")


def run_operator(argv: list[str] | None = None) -> int:
    """Parse flags, register the handlers and run until SIGTERM/SIGINT. Returns the exit code."""
    config, args = parse_config(argv)
    if args.print_peering_manifests:
        sys.stdout.write(peering_yaml(config.peering, config.namespaces))
        return 0
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL,
    )
    if not args.verbose:
        # kopf logs every successful handler/timer run at INFO; ours log what changed
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    registry = register(config, kopf.OperatorRegistry())
    priority = config.priority if config.priority is not None else random.randint(1, 2**31 - 1)
    log.info(
        "kubetune operator starting: namespaces=%s runtime image=%s poll=%ss peering=%s",
        ",".join(config.namespaces) or "(all)", config.runtime_image, config.poll_interval,
        "(standalone)" if config.standalone else f"{config.peering} priority {priority}",
    )
    kopf.run(
        registry=registry,
        clusterwide=not config.namespaces,
        namespaces=list(config.namespaces),
        standalone=config.standalone,
        priority=priority,
        # a named peering is mandatory in kopf: a replica waits until the peering CRDs exist
        peering_name=None if config.standalone else config.peering,
        liveness_endpoint=f"http://0.0.0.0:{config.health_port}/healthz" if config.health_port else None,
    )
    return 0


def main(argv: list[str] | None = None) -> None:
    sys.exit(run_operator(argv))


__all__ = ["OperatorConfig", "main", "run_operator"]
