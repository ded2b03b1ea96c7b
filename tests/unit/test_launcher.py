"""The launcher: topology from the operator's pod env / the local machine, torchrun's command
line, the Trainer's DDP/FSDP arguments, the hook in `kubetune run` / `stage`, and — with real
torchrun agents on this machine — the env each rank actually gets."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from kubetune.runtime import launcher
from kubetune.runtime.api.errors import UserError
from kubetune.runtime.api.spec import ResourcesSpec


def res(**kw) -> ResourcesSpec:
    return ResourcesSpec.model_validate(kw)


# What operator/manifests.py puts in the env of pod <index> of a nodes: 2 stage
def pod_env(index: int, **extra) -> dict[str, str]:
    return {"KUBETUNE_NODES": "2", "KUBETUNE_NODE_RANK": str(index), "MASTER_ADDR": "j-sft-0.j-sft",
            "MASTER_PORT": "29500", **extra}


def test_pod_topology_from_the_operator_env():
    topo = launcher.topology(res(nodes=2, gpusPerNode=4), cluster=True, env=pod_env(1), gpus=4, rdzv_id="j-sft")
    assert (topo.nnodes, topo.nproc_per_node, topo.node_rank, topo.world_size) == (2, 4, 1, 8)
    assert (topo.master_addr, topo.master_port, topo.device, topo.backend) == ("j-sft-0.j-sft", 29500, "cuda", "nccl")
    assert launcher.torchrun_args(topo, ["-m", "kubetune.runtime", "stage", "--config=/etc/kubetune/stage.json"]) == [
        "--nnodes=2", "--nproc-per-node=4", "--max-restarts=0", "--monitor-interval=0.5",
        "--node-rank=1", "--master-addr=j-sft-0.j-sft", "--master-port=29500",
        "-m", "kubetune.runtime", "stage", "--config=/etc/kubetune/stage.json"]
    cmd = launcher.torchrun_command(topo, ["x.py"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"] and cmd[-1] == "x.py"


def test_dynamic_c10d_rendezvous_on_request():
    topo = launcher.topology(res(nodes=2, gpusPerNode=1), cluster=True, gpus=1, rdzv_id="j-sft",
                             env=pod_env(0, KUBETUNE_RDZV_BACKEND="c10d"))
    args = launcher.torchrun_args(topo, ["t.py"])
    assert "--rdzv-backend=c10d" in args and "--rdzv-endpoint=j-sft-0.j-sft:29500" in args
    assert "--rdzv-id=j-sft" in args and "--rdzv-conf=is_host=true" in args
    with pytest.raises(UserError, match="static or c10d"):
        launcher.topology(res(), cluster=True, env={"KUBETUNE_RDZV_BACKEND": "etcd"}, gpus=0)


def test_node_rank_falls_back_to_the_job_completion_index():
    env = pod_env(0)
    del env["KUBETUNE_NODE_RANK"]
    env["JOB_COMPLETION_INDEX"] = "1"
    assert launcher.topology(res(nodes=2, gpusPerNode=1), cluster=True, env=env, gpus=1).node_rank == 1


def test_bad_pod_env_is_a_user_error():
    with pytest.raises(UserError, match="MASTER_ADDR"):
        launcher.topology(res(nodes=2), cluster=True, env={"KUBETUNE_NODES": "2"}, gpus=1)
    with pytest.raises(UserError, match="outside 0..1"):
        launcher.topology(res(nodes=2), cluster=True, env=pod_env(2), gpus=1)
    with pytest.raises(UserError, match="KUBETUNE_NPROC"):
        launcher.topology(res(), cluster=False, env={"KUBETUNE_NPROC": "two"}, gpus=0)


def test_local_mode_uses_this_machine():
    # one node, no rendezvous host: nodes > 1 stays on this machine, with a note
    topo = launcher.topology(res(nodes=2, gpusPerNode=2), cluster=False, env={}, gpus=2)
    assert (topo.nnodes, topo.nproc_per_node, topo.world_size) == (1, 2, 2) and "MASTER_ADDR" in topo.notes[0]
    assert launcher.torchrun_args(topo, ["t.py"])[:5] == ["--nnodes=1", "--nproc-per-node=2", "--max-restarts=0",
                                                        "--monitor-interval=0.5", "--standalone"]
    # gpusPerNode left unset: every visible GPU; set higher than the machine has: capped
    assert launcher.topology(res(), cluster=False, env={}, gpus=8).nproc_per_node == 8
    capped = launcher.topology(res(gpusPerNode=4), cluster=False, env={}, gpus=2)
    assert capped.nproc_per_node == 2 and "2 GPU(s) visible" in capped.notes[0]
    # in a pod the spec decides (default 1 GPU), not the node's GPU count
    assert launcher.topology(res(), cluster=True, env={}, gpus=8).nproc_per_node == 1
    # CPU: one process, unless KUBETUNE_NPROC says otherwise (CPU tests)
    cpu = launcher.topology(res(gpusPerNode=4), cluster=False, env={}, gpus=0)
    assert (cpu.world_size, cpu.device, cpu.backend) == (1, "cpu", "gloo") and not cpu.distributed
    assert launcher.topology(res(), cluster=False, env={"KUBETUNE_NPROC": "2"}, gpus=0).world_size == 2
    # bare-metal multi-node with `kubetune run`: MASTER_ADDR + KUBETUNE_NODE_RANK
    bare = launcher.topology(res(nodes=2, gpusPerNode=1), cluster=False, gpus=1,
                             env={"MASTER_ADDR": "spark-1", "KUBETUNE_NODE_RANK": "1"})
    assert (bare.nnodes, bare.node_rank, bare.world_size, bare.master_port) == (2, 1, 2, 29500)


def test_already_launched_inside_a_worker():
    assert launcher.already_launched({"LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    assert not launcher.already_launched({"MASTER_ADDR": "x"})


def test_trainer_arguments_for_ddp_and_fsdp(caplog):
    assert launcher.distributed_args(res(), "full", world_size=1) == {}
    ddp = launcher.distributed_args(res(), "full", world_size=2, cuda=False, env={})
    assert ddp["ddp_backend"] == "gloo" and ddp["use_cpu"] and ddp["ddp_find_unused_parameters"] is False
    lora = launcher.distributed_args(res(), "lora", world_size=2, cuda=True, env={})
    assert lora["ddp_backend"] == "nccl" and "use_cpu" not in lora and "ddp_find_unused_parameters" not in lora
    fsdp = launcher.distributed_args(res(strategy="fsdp"), "lora", world_size=8, cuda=True, env={},
                                     gradient_checkpointing=True)
    assert fsdp["fsdp"] is True and fsdp["gradient_checkpointing"] is False
    assert fsdp["fsdp_config"] == {"version": 2, "reshard_after_forward": True, "cpu_offload": False,
                                   "state_dict_type": "FULL_STATE_DICT", "cpu_ram_efficient_loading": True,
                                   "activation_checkpointing": True}
    q = launcher.distributed_args(res(strategy="fsdp", fsdp={"sharding": "shard_grad_op", "cpuOffload": True}),
                                  "qlora", world_size=2, cuda=True, env={})
    assert q["fsdp_config"]["reshard_after_forward"] is False and q["fsdp_config"]["cpu_offload"] is True
    with pytest.raises(ValidationError, match="full_shard"):
        res(strategy="fsdp", fsdp={"sharding": "zero3"})
    # accelerate shards only on GPUs: FSDP on CPU processes is DDP, said out loud
    with caplog.at_level("WARNING", logger="kubetune"):
        cpu = launcher.distributed_args(res(strategy="fsdp"), "full", world_size=2, cuda=False, env={})
    assert "fsdp" not in cpu and cpu["ddp_backend"] == "gloo" and "FSDP needs GPUs" in caplog.text


def test_fsdp_arguments_are_what_transformers_hands_to_accelerate():
    from transformers import TrainingArguments

    args = launcher.distributed_args(res(strategy="fsdp"), "full", world_size=2, cuda=True, env={})
    ta = TrainingArguments.__new__(TrainingArguments)  # no device setup: only the FSDP translation
    ta.fsdp, ta.fsdp_config, ta.activation_checkpointing = args["fsdp"], dict(args["fsdp_config"]), False
    plugin = ta._process_fsdp_args()
    assert plugin["fsdp_version"] == 2 and plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert plugin["reshard_after_forward"] is True and plugin["cpu_ram_efficient_loading"] is True


def _job_file(tmp_path: Path) -> Path:
    import yaml

    from tests.conftest import job_doc

    doc = job_doc("j", "some/model", [{"name": "d", "source": "hf://x"}],
                  [{"name": "sft", "type": "sft", "method": "lora"}], tmp_path / "saves")
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(doc))
    return f


def test_run_and_stage_commands_relaunch_under_torchrun(tmp_path, monkeypatch):
    from kubetune.runtime import local
    from kubetune.runtime.api.plan import plan
    from kubetune.runtime.api.spec import load_job

    calls = []
    monkeypatch.setattr(launcher, "launch", lambda topo, cli: calls.append((topo, cli)) or 0)
    # the pod entry's SIGTERM handler is for PID 1 of a container (tests/unit/test_pid1.py)
    monkeypatch.setattr(local, "exit_on_sigterm", lambda: None)
    monkeypatch.setattr(launcher, "visible_gpus", lambda: 0)
    for k in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "KUBETUNE_NODES", "KUBETUNE_NODE_RANK"):
        monkeypatch.delenv(k, raising=False)
    f = _job_file(tmp_path)
    monkeypatch.setenv("KUBETUNE_NPROC", "2")
    assert local.run_job(str(f), ["stages.0.hyperparameters.maxSteps=3"], progress=False, metrics_port=9400) == 0
    topo, cli = calls.pop()
    assert topo.world_size == 2 and topo.nnodes == 1 and topo.rdzv_id == "j"
    assert cli == ["run", str(f.resolve()), "--set=stages.0.hyperparameters.maxSteps=3", "--metrics-port=9400",
                   "--no-progress"]
    monkeypatch.delenv("KUBETUNE_NPROC")

    # the pod of node 1 of 2 (CPU: one process per node)
    stage = plan(load_job(str(f), ["resources.nodes=2", "resources.gpusPerNode=0"]))[0]
    config = tmp_path / "stage.json"
    config.write_text(json.dumps(stage.to_yaml_dict()))
    for k, v in pod_env(1).items():
        monkeypatch.setenv(k, v)
    assert local.run_stage_config(str(config)) == 0
    topo, cli = calls.pop()
    assert (topo.nnodes, topo.node_rank, topo.nproc_per_node, topo.rdzv_id) == (2, 1, 1, "j-sft")
    assert cli == ["stage", f"--config={config.resolve()}"]
    assert "--node-rank=1" in launcher.torchrun_args(topo, cli)


PROBE = """
import json, os, sys
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"]
with open(os.path.join(sys.argv[1], f"rank-{os.environ['RANK']}.json"), "w") as f:
    json.dump({k: os.environ.get(k) for k in keys}, f)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_env_each_rank_gets_from_torchrun(tmp_path):
    """Real torchrun agents on this machine: two "nodes" of one process each meeting at
    MASTER_ADDR:MASTER_PORT as two pods would (static rendezvous, node rank from the pod env),
    and one node with two processes (`--standalone`)."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    port = _free_port()
    agents = []
    for index in (0, 1):
        env = pod_env(index, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        topo = launcher.topology(res(nodes=2, gpusPerNode=0), cluster=True, env=env, gpus=0)
        out = tmp_path / "nodes"
        out.mkdir(exist_ok=True)
        agents.append(subprocess.Popen(launcher.torchrun_command(topo, [str(probe), str(out)]),
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for a in agents:
        assert a.wait(timeout=120) == 0, a.stdout.read()[-2000:]
    ranks = [json.loads((tmp_path / "nodes" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for r, env in enumerate(ranks):
        assert env == {"RANK": str(r), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
                       "GROUP_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}

    topo = launcher.topology(res(), cluster=False, env={"KUBETUNE_NPROC": "2"}, gpus=0)
    out = tmp_path / "local"
    out.mkdir()
    done = subprocess.run(launcher.torchrun_command(topo, [str(probe), str(out)]), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    local_ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["GROUP_RANK"]) for e in local_ranks] == [
        ("0", "0", "2", "0"), ("1", "1", "2", "0")]


LEAVER = """
import json, os, sys, time
import torch.distributed as dist
from kubetune.runtime.launcher import Coordinator

c = Coordinator()
decided = c.broadcast({"resume": "checkpoint-4"} if c.is_main else None)
if c.rank == 1:
    time.sleep(1.0)  # the last rank to finish
entered = time.time()
c.leave()
left = time.time()
c.leave()  # a second call (an error path after a successful stage) is a no-op
with open(os.path.join(sys.argv[1], f"rank-{c.rank}.json"), "w") as f:
    json.dump({"decided": decided, "entered": entered, "left": left,
               "initialized": dist.is_initialized()}, f)
"""


def test_ranks_leave_together_and_destroy_their_process_groups(tmp_path):
    """Real torchrun, 2 CPU processes: `Coordinator.leave` (the end of a successful `kubetune run`
    or stage pod) waits for the slowest rank, then destroys every process group, so no gloo
    thread is left to the interpreter's teardown (which can abort a rank that finished its work)."""
    script = tmp_path / "leaver.py"
    script.write_text(LEAVER)
    topo = launcher.topology(res(), cluster=False, env={"KUBETUNE_NPROC": "2"}, gpus=0)
    done = subprocess.run(launcher.torchrun_command(topo, [str(script), str(tmp_path)]), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["decided"] for r in ranks] == [{"resume": "checkpoint-4"}] * 2
    assert [r["initialized"] for r in ranks] == [False, False]
    assert ranks[0]["left"] >= ranks[1]["entered"]  # rank 0 waited for rank 1
    assert "destroy_process_group" not in done.stderr  # torch warns about groups left alive


def test_metrics_port_and_rank_per_process(monkeypatch):
    from kubetune.runtime.metrics import default_port

    monkeypatch.setenv("KUBETUNE_METRICS_PORT", "9400")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert default_port() == 9403
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "7")
    c = launcher.Coordinator()
    assert (c.rank, c.local_rank, c.world_size, c.is_main, c.is_local_main) == (7, 3, 8, False, False)
    assert launcher.coordinator().rank == 7 and launcher.rank_suffix() == " [rank 7/8]"
