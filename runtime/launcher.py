"""Multi-process training: one stage over several GPUs and nodes with torchrun.

When a stage needs more than one training process (`resources.gpusPerNode > 1`,
`resources.nodes > 1`, or `KUBETUNE_NPROC` for CPU tests), `kubetune run` and the pod's `stage`
command re-launch themselves under PyTorch's own launcher (`torch.distributed.run`, i.e.
torchrun): it starts one worker per GPU, runs the rendezvous, sets `RANK`, `LOCAL_RANK`,
`WORLD_SIZE`, `MASTER_ADDR`/`MASTER_PORT` for each, and tears every worker down when one fails.
The workers run the very same command (they see `LOCAL_RANK`/`WORLD_SIZE` and do not launch
again); DDP or FSDP then runs through the Trainer's own integration (`distributed_args`).

Topology, from the operator's pod env (operator/manifests.py) or the local machine:

- nodes: `KUBETUNE_NODES` (the operator's Indexed Job) or `resources.nodes`; in local mode
  (`kubetune run`) several nodes need `MASTER_ADDR` (bare-metal multi-node without Kubernetes),
  otherwise the run stays on this machine.
- node rank: `KUBETUNE_NODE_RANK`, else `JOB_COMPLETION_INDEX` (set by Kubernetes for Indexed
  Jobs), else 0.
- processes per node: `KUBETUNE_NPROC`, else the GPUs: `gpusPerNode` (capped at what the machine
  has; in local mode an unset `gpusPerNode` means every visible GPU); one process on CPU.
- rendezvous: one node → torchrun `--standalone` (c10d on a free local port); several nodes →
  torchrun's static rendezvous on a c10d TCPStore hosted by node 0 at `MASTER_ADDR:MASTER_PORT`
  (the operator points it at pod 0 through the headless Service): rank = node rank × nproc +
  local rank, so global rank 0 — the one that uploads, commits and serves the `/progress` the
  operator polls — is always in pod 0. `KUBETUNE_RDZV_BACKEND=c10d` switches to the dynamic c10d
  rendezvous (`--rdzv-endpoint=MASTER_ADDR:MASTER_PORT`, node 0 `is_host`), which orders nodes
  by host name instead of node rank.
- backend: nccl on GPUs, gloo on CPU; control barriers (download, commit) always use a gloo
  group with a long timeout, so a slow upload never trips the NCCL watchdog.

In-stage protocol (`Coordinator`, used by `local.execute_stage`): global rank 0 decides whether
the stage is done and which committed checkpoint to resume from; the local rank 0 of every node
downloads that checkpoint once into the node's work folder, the other ranks wait at a barrier
and resume from the same files; ranks > 0 train into their own scratch folder; only rank 0
uploads checkpoints and commits the output while the others wait at a barrier.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Mapping, Sequence

from .api.contract import ENV_MASTER_ADDR, ENV_MASTER_PORT, ENV_NODE_RANK, ENV_NODES, RENDEZVOUS_PORT

log = logging.getLogger("kubetune")

AGENT_PID_ENV = "KUBETUNE_AGENT_PID"  # launch → its workers: the pid of their torchrun agent
CONTROL_TIMEOUT = timedelta(hours=6)  # barrier waits (a big model's commit can take a while)
FSDP_SHARDINGS = ("full_shard", "shard_grad_op")  # FSDP2's reshard_after_forward true / false


@dataclass(frozen=True)
class Topology:
    """How many training processes a stage runs, where, and how they meet."""

    nnodes: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = RENDEZVOUS_PORT
    rdzv_backend: str = "static"  # static | c10d (several nodes); one node is always --standalone
    rdzv_id: str = "kubetune"
    device: str = "cpu"  # cuda | cpu
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"


def _int_env(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = (env.get(name) or "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                from .api.errors import UserError

                raise UserError(f"{name}={value!r} is not an integer", name) from None
    return None


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no torch / no driver: CPU
        return 0


def topology(resources, *, cluster: bool, env: Mapping[str, str] | None = None, gpus: int | None = None,
             rdzv_id: str = "kubetune") -> Topology:
    """The training processes of a stage with these `resources` (a `ResourcesSpec`).

    `cluster`: a pod started by the operator (`stage` command) rather than `kubetune run`.
    `gpus`: the GPUs this machine has (default: ask torch)."""
    env = os.environ if env is None else env
    gpus = visible_gpus() if gpus is None else gpus
    notes: list[str] = []
    nnodes = _int_env(env, ENV_NODES) or resources.nodes
    master_addr = env.get(ENV_MASTER_ADDR) or None
    if nnodes > 1 and not master_addr:
        if cluster:
            from .api.errors import UserError

            raise UserError(f"{nnodes} nodes need MASTER_ADDR (the rendezvous host)", "MASTER_ADDR")
        notes.append(f"resources.nodes={nnodes} without MASTER_ADDR: training on this machine only")
        nnodes = 1
    node_rank = _int_env(env, ENV_NODE_RANK, "JOB_COMPLETION_INDEX") or 0
    if nnodes == 1:
        node_rank = 0
    elif not 0 <= node_rank < nnodes:
        from .api.errors import UserError

        raise UserError(f"node rank {node_rank} is outside 0..{nnodes - 1}", ENV_NODE_RANK)
    nproc = _int_env(env, "KUBETUNE_NPROC")
    wanted = resources.gpus_per_node
    if not cluster and "gpus_per_node" not in resources.model_fields_set:
        wanted = gpus  # local mode, gpusPerNode left unset: what the machine has
    if nproc is None:
        if gpus > 0 and wanted > 0:
            if wanted > gpus:
                notes.append(f"resources.gpusPerNode={wanted} but {gpus} GPU(s) visible: starting {gpus}")
            nproc = min(wanted, gpus)
        else:
            nproc = 1  # CPU: one process per node
    nproc = max(1, nproc)
    device = "cuda" if gpus > 0 and wanted > 0 else "cpu"
    backend = (env.get("KUBETUNE_RDZV_BACKEND") or "static").strip()
    if backend not in ("c10d", "static"):
        from .api.errors import UserError

        raise UserError(f"KUBETUNE_RDZV_BACKEND={backend!r}: use static or c10d", "KUBETUNE_RDZV_BACKEND")
    port = _int_env(env, ENV_MASTER_PORT) or RENDEZVOUS_PORT
    return Topology(nnodes=nnodes, nproc_per_node=nproc, node_rank=node_rank, master_addr=master_addr,
                    master_port=port, rdzv_backend=backend, rdzv_id=rdzv_id, device=device, notes=tuple(notes))


def already_launched(env: Mapping[str, str] | None = None) -> bool:
    """True inside a torchrun worker (this process is one rank; never launch again)."""
    env = os.environ if env is None else env
    return "LOCAL_RANK" in env and "WORLD_SIZE" in env


def torchrun_args(topo: Topology, program: Sequence[str]) -> list[str]:
    """torchrun's arguments (after `python -m torch.distributed.run`) for `program`: either
    `["-m", module, *args]` or `[script, *args]`."""
    args = [f"--nnodes={topo.nnodes}", f"--nproc-per-node={topo.nproc_per_node}", "--max-restarts=0",
            "--monitor-interval=0.5"]
    if topo.nnodes == 1:
        args.append("--standalone")
    elif topo.rdzv_backend == "static":
        args += [f"--node-rank={topo.node_rank}", f"--master-addr={topo.master_addr}",
                 f"--master-port={topo.master_port}"]
    else:
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={topo.master_addr}:{topo.master_port}",
                 f"--rdzv-id={topo.rdzv_id}", f"--rdzv-conf=is_host={str(topo.node_rank == 0).lower()}",
                 f"--node-rank={topo.node_rank}"]
    return [*args, *program]


def torchrun_command(topo: Topology, program: Sequence[str]) -> list[str]:
    """The same as a command line (for logs and for running it as a subprocess)."""
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args(topo, program)]


def launch(topo: Topology, cli_args: Sequence[str]) -> int:
    """Run `python -m kubetune.runtime *cli_args` as every local rank under torchrun (in this
    process: torch.distributed.run's own API) and return an exit code for the pod: bad input
    (42) or out of memory (43) when any rank failed with it, else the most telling of the ranks'
    codes by the table of failures (errors.combine_exit_codes); SIGTERM to this agent: torchrun
    passes it on to the workers, which commit a checkpoint and stop (Interrupted, 143)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from torch.distributed.elastic.multiprocessing.api import SignalException

    from .api.errors import EXIT_FAILED, EXIT_INTERRUPTED, combine_exit_codes

    for note in topo.notes:
        log.warning("%s", note)
    program = ["-m", "kubetune.runtime", *cli_args]
    log.info("launching %d process(es) on node %d/%d (world size %d, %s): %s", topo.nproc_per_node, topo.node_rank,
             topo.nnodes, topo.world_size, topo.backend, shlex.join(torchrun_command(topo, program)))
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "TORCH_NCCL_ASYNC_ERROR_HANDLING", AGENT_PID_ENV)}
    os.environ[AGENT_PID_ENV] = str(os.getpid())  # the workers' parent: see die_with_agent
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun's default is 1 thread per rank
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ["OMP_NUM_THREADS"] = str(max(1, cpus // topo.nproc_per_node))
    try:
        run(parse_args(torchrun_args(topo, program)))
        return 0
    except ChildFailedError as err:
        codes = sorted({f.exitcode for f in err.failures.values()})
        log.error("training process(es) failed: %s", ", ".join(f"rank {r}: exit {f.exitcode}"
                                                               for r, f in sorted(err.failures.items())))
        return combine_exit_codes(codes)
    except SignalException as err:  # torchrun stopped the workers with the same signal (30 s)
        log.warning("training stopped by %s", err.sigval.name if hasattr(err.sigval, "name") else err.sigval)
        return EXIT_INTERRUPTED
    except Exception as err:  # rendezvous timeouts, a peer node gone
        log.error("distributed launch failed: %s: %s", type(err).__name__, err)
        return EXIT_FAILED
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------- inside a rank


def die_with_agent() -> None:
    """In a torchrun worker: get SIGKILLed when the agent (our parent) dies. torchrun starts its
    workers in sessions of their own, so a SIGKILLed `kubetune run` (no chance to clean up)
    would otherwise leave them training — and rank 0 uploading — as orphans. Linux only; a
    no-op elsewhere. (In a pod the container's end kills them anyway.)

    The agent may already be gone before prctl takes effect: then our parent is no longer the
    agent whose pid `launch` left in the environment. (Not "our parent is PID 1": in a
    container the agent is PID 1.)"""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    agent = os.environ.get(AGENT_PID_ENV)
    if agent and os.getppid() != int(agent):  # the agent was already gone before prctl
        os._exit(1)



class Coordinator:
    """This process's place among the training processes, and the few collective steps the
    storage protocol needs. In a single process every call is a no-op."""

    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        self.world_size = int(env.get("WORLD_SIZE") or 1)
        self.rank = int(env.get("RANK") or 0)
        self.local_rank = int(env.get("LOCAL_RANK") or 0)
        self.local_world_size = int(env.get("LOCAL_WORLD_SIZE") or self.world_size)
        self.node_rank = int(env.get("GROUP_RANK") or 0)  # torchrun's node rank
        self._group = None

    @property
    def multi_node(self) -> bool:
        return self.world_size > self.local_world_size

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    def _ensure(self):
        if not self.distributed:
            return None
        if self._group is None:
            import torch
            import torch.distributed as dist

            if not dist.is_initialized():
                cuda = torch.cuda.is_available() and os.environ.get("KUBETUNE_DEVICE", "") != "cpu"
                if cuda:
                    torch.cuda.set_device(self.local_rank)
                dist.init_process_group(backend="nccl" if cuda else "gloo")
            self._group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        return self._group

    def join(self) -> None:
        """Start the default process group now (nccl on GPUs, gloo on CPU), for a stage that runs
        its own collectives; a no-op in a single process."""
        self._ensure()

    def barrier(self) -> None:
        group = self._ensure()
        if group is not None:
            import torch.distributed as dist

            dist.barrier(group=group)

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank's `flag` is (a SIGTERM seen by one rank stops all at the
        same step)."""
        group = self._ensure()
        if group is None:
            return bool(flag)
        import torch
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return bool(t.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        group = self._ensure()
        if group is None:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]

    def leave(self) -> None:
        """After the last stage succeeded on every rank: wait for the others, then destroy the
        process groups. A process that exits with its groups alive leaves gloo's worker threads
        to the interpreter's teardown, which can abort it (SIGABRT, "terminate called without an
        active exception") after it finished its work, and torchrun then reports the run as
        failed. A no-op in a single process or when no group was started."""
        if not self.distributed:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            return
        if self._group is not None:
            dist.barrier(group=self._group)  # no rank tears down while another still talks
        dist.destroy_process_group()  # every group, the default one last
        self._group = None


_coordinator: Coordinator | None = None


def coordinator() -> Coordinator:
    """The process-wide coordinator (one process group per process, shared by its stages)."""
    global _coordinator
    if _coordinator is None or _coordinator.world_size != int(os.environ.get("WORLD_SIZE") or 1):
        _coordinator = Coordinator()
    return _coordinator


def rank_suffix() -> str:
    """`" [rank N/W]"` inside a multi-process run, else empty (for log lines)."""
    c = coordinator()
    return f" [rank {c.rank}/{c.world_size}]" if c.distributed else ""


# ---------------------------------------------------------------------------- trainer arguments


def fsdp_options(resources) -> tuple[str, bool]:
    """(sharding, CPU offload) for FSDP from `resources.fsdp`: full_shard reshards parameters
    after the forward (ZeRO-3-like), shard_grad_op keeps them gathered until the backward
    (ZeRO-2-like); cpuOffload keeps parameters, gradients and optimizer state in host memory.
    The spec's Literal type already limits the sharding to FSDP_SHARDINGS."""
    return resources.fsdp.sharding, resources.fsdp.cpu_offload


def distributed_args(resources, method: str, *, world_size: int | None = None, cuda: bool = False,
                     gradient_checkpointing: bool = False, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """TrainingArguments fields for DDP / FSDP (empty in a single process). The Trainer (through
    accelerate) wraps the model; nothing here wraps anything itself.

    FSDP is FSDP2 (transformers 5's default: per-parameter sharding, so frozen and trainable
    parameters — LoRA, freeze, and QLoRA's 4-bit base — shard together) with full state dicts,
    so that rank 0 alone writes whole checkpoints and outputs that it can upload. accelerate
    applies FSDP only on GPUs: on CPU a `strategy: fsdp` stage trains with DDP, with a warning."""
    env = os.environ if env is None else env
    world_size = int(env.get("WORLD_SIZE") or 1) if world_size is None else world_size
    if world_size <= 1:
        return {}
    # ddp_timeout stays the Trainer's 30 min: a peer node that died surfaces as a collective
    # timeout; slow uploads never block training collectives (they run in the background, and
    # the final commit is waited for on the separate gloo control group)
    args: dict[str, Any] = {"ddp_backend": "nccl" if cuda else "gloo"}
    if not cuda:
        args["use_cpu"] = True  # accelerate: MULTI_CPU (DDP over gloo) only when told it is on CPU
    if resources.strategy == "ddp" or not cuda:
        if resources.strategy == "fsdp":
            log.warning("strategy fsdp: FSDP needs GPUs (accelerate shards only on them); %d CPU processes train "
                        "with DDP", world_size)
        if method == "full":  # every parameter gets a gradient: skip DDP's unused-parameter search
            args["ddp_find_unused_parameters"] = False
        return args
    sharding, offload = fsdp_options(resources)
    config: dict[str, Any] = {
        "version": 2,
        "reshard_after_forward": sharding == "full_shard",
        "cpu_offload": offload,
        "state_dict_type": "FULL_STATE_DICT",  # rank 0 alone writes (and uploads) whole checkpoints
        "cpu_ram_efficient_loading": True,  # rank 0 loads the weights, the others get them sharded
        "activation_checkpointing": bool(gradient_checkpointing),
    }
    args.update(fsdp=True, fsdp_config=config)
    if gradient_checkpointing:
        args["gradient_checkpointing"] = False  # FSDP's own activation checkpointing does it
    return args
