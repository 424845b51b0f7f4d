"""Launchers: the exact worker command per cluster config (one node, Slurm, Kubernetes), the
scripts run against stand-in srun/scontrol/squeue/scancel/kubectl binaries (real Slurm jobs:
tests/integration/test_slurm.py), the decisions after a Slurm job ends,
the checks that stop a run before compute, and the cluster fields' error messages."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import config as config_mod
from flows.cli import main as forge
from flows.dag import build
from flows.launch import StageFailed, run_worker, worker_env
from flows.launchers import (DEADLINE_MARK, MANIFEST, SLURM_SCRIPT, check_available, job_name,
                             kubernetes_manifest, launch_plan, slurm_script, worker_command)
from flows.slurm import exit_status, verdict
from stages.schema import ConfigError, from_dict, to_dict
from stages.cluster import ParallelSpec

KEY = "0123456789ab"
WORKER_ENV = [{"name": "OMP_NUM_THREADS", "value": "4"}, {"name": "MKL_NUM_THREADS", "value": "4"},
              {"name": "RAYON_NUM_THREADS", "value": "4"}, {"name": "PYTHONUNBUFFERED", "value": "1"},
              {"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "HF_DATASETS_OFFLINE", "value": "1"},
              {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
              {"name": "PYTHONWARNINGS", "value": "ignore"},
              {"name": "OMP_WAIT_POLICY", "value": "PASSIVE"}]


@functools.cache
def cluster(*overrides: str) -> ParallelSpec:
    return config_mod.load(list(overrides)).cluster


def spec_in(store: Path, stage: str = "pretrain-1") -> Path:
    return store / f"{stage}-{KEY}" / "spec.json"


def fake_bin(tmp_path: Path, monkeypatch, **scripts: str) -> Path:
    """Stand-ins for cluster tools, first on PATH; each records its argv in calls.jsonl."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        f"with open({str(log)!r}, 'a') as f:\n"
                        f"    f.write(json.dumps([{name!r}, *sys.argv[1:]]) + '\\n')\n" + body)
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def calls(log: Path, tool: str) -> list[list[str]]:
    return [c[1:] for c in map(json.loads, log.read_text().splitlines()) if c[0] == tool]


# --- one GPU node -----------------------------------------------------------------------------

def test_gpu_node_runs_torchrun_standalone_with_one_process_per_gpu(tmp_path):
    c, spec = cluster("cluster=gpu-node"), spec_in(tmp_path)
    assert worker_command("torchrun", c, spec) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8",
        "--max_restarts=0", "-m", "stages.worker", str(spec)]
    assert worker_command("python", c, spec) == [sys.executable, "-m", "stages.worker", str(spec)]
    env = worker_env(c)
    assert (env["OMP_NUM_THREADS"], env["OMP_WAIT_POLICY"]) == ("4", "PASSIVE")
    check_available(c)  # nothing to check for one machine


def test_torchrun_refuses_a_layout_larger_than_one_node():
    c = from_dict(ParallelSpec, {"device": "cuda", "accelerator": "h100", "gpus_per_node": 8,
                                 "tensor_parallel": 2, "data_parallel": 8}, "cluster")
    with pytest.raises(ConfigError, match=r"^cluster\.launcher: torchrun .* needs 2 nodes of 8 "
                                          r"\(world size 16\); use cluster=slurm or cluster=k8s"):
        check_available(c)


def test_cpu_cluster_workers_hide_the_gpus(monkeypatch):
    """The CPU shim refuses to run where CUDA is visible: on a GPU machine, the workers of a CPU
    cluster get CUDA_VISIBLE_DEVICES="" (over the caller's own); a cuda cluster's keep it."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    for name in ("cpu", "cpu-dp2", "cpu-tp2"):
        assert worker_env(cluster(f"cluster={name}"))["CUDA_VISIBLE_DEVICES"] == "", name
    assert worker_env(cluster("cluster=gpu-node"))["CUDA_VISIBLE_DEVICES"] == "0,1"
    cpu_pods = cluster("cluster=k8s", "cluster.device=cpu", "cluster.accelerator=cpu")
    container = kubernetes_manifest("torchrun", cpu_pods, spec_in(Path("/store")))[
        "items"][-1]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "CUDA_VISIBLE_DEVICES", "value": ""} in container["env"]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})


# --- Slurm ------------------------------------------------------------------------------------

def slurm_lines(script: str) -> tuple[list[str], str]:
    """(the #SBATCH options, the srun line) of a batch script."""
    opts = [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]
    return opts, next(line for line in script.splitlines() if line.startswith("srun "))


def test_slurm_batch_script_takes_four_nodes_and_meets_on_the_first(tmp_path):
    spec = spec_in(tmp_path)
    out = spec.parent
    c = cluster("cluster=slurm")
    assert worker_command("torchrun", c, spec) == ["sbatch", "--parsable", str(out / SLURM_SCRIPT)]
    script = slurm_script("torchrun", c, spec)
    opts, srun = slurm_lines(script)
    assert opts == [f"--job-name=forge-pretrain-1-{KEY}", f"--output={out}/slurm-%j.out",
                    "--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=32", "--gpus-per-node=8",
                    "--partition=gpu", "--account=llm-training", "--time=48:00:00", "--exclusive"]
    assert 'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n' + srun in script
    assert srun == (
        "srun --kill-on-bad-exit=1 --nodes=4 --ntasks-per-node=1 --cpus-per-task=32 "
        "--container-image=registry.example.com/granite-forge/worker:0.1.0 "
        "--container-mounts=/lustre/forge:/lustre/forge python -m torch.distributed.run --nnodes=4 "
        '--nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint="$head:29500" '
        f'--rdzv_id="$SLURM_JOB_ID" --max_restarts=0 -m stages.worker {spec}')
    assert "lead=600\n" in script and "export OMP_NUM_THREADS=4\n" in script
    plan = launch_plan(c, spec)
    assert plan.startswith(f"# sbatch --parsable {out / SLURM_SCRIPT}\n") and plan.endswith(script)


FAKE_SRUN = """\
print("[pretrain-1] step 1/10 loss 3.25", flush=True)
import time; time.sleep(float(os.environ.get("FAKE_STEP_S", "0")))
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""
FAKE_SCONTROL = """\
import signal
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head -n 1` closes the pipe: die quietly, as C does
assert sys.argv[1:] == ["show", "hostnames", "gpu[017-020]"], sys.argv
print("gpu017\\ngpu018\\ngpu019\\ngpu020")
"""
FAKE_SQUEUE = """\
import time
print(time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(float(os.environ["FAKE_END"]))))
"""
FAKE_SCANCEL = """\
if sys.argv[1:] == [os.environ["SLURM_JOB_ID"]]:   # a plain scancel ends the job's script at once
    os.kill(os.getppid(), 15)
"""


def run_batch_script(tmp_path: Path, monkeypatch, left_s: float = 3600, **env: str):
    """Run a stage's batch script as the job would, ``left_s`` before its end time."""
    log = fake_bin(tmp_path, monkeypatch, scontrol=FAKE_SCONTROL, srun=FAKE_SRUN,
                   squeue=FAKE_SQUEUE, scancel=FAKE_SCANCEL)
    spec = spec_in(tmp_path / "my store")
    spec.parent.mkdir(parents=True, exist_ok=True)
    script = spec.with_name(SLURM_SCRIPT)
    script.write_text(slurm_script("torchrun", cluster("cluster=slurm"), spec))
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SLURM_JOB_ID": "4242",
                               "SLURM_JOB_NODELIST": "gpu[017-020]",
                               "FAKE_END": str(time.time() + float(left_s)), **env})
    return done, log, spec


def test_slurm_batch_script_expands_the_first_node_and_job_id_in_the_job(tmp_path, monkeypatch):
    """The script really runs (bash, stand-in scontrol/srun/squeue/scancel): srun gets one argv per
    argument, a store path with a space intact, and the rendezvous on the first node; the exit
    status is the worker's; far from its time limit nothing is signalled."""
    done, log, spec = run_batch_script(tmp_path, monkeypatch, FAKE_EXIT="3")
    assert done.returncode == 3, done.stderr
    assert calls(log, "srun") == [[
        "--kill-on-bad-exit=1", "--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=32",
        "--container-image=registry.example.com/granite-forge/worker:0.1.0",
        "--container-mounts=/lustre/forge:/lustre/forge", "python", "-m", "torch.distributed.run",
        "--nnodes=4", "--nproc_per_node=8", "--rdzv_backend=c10d", "--rdzv_endpoint=gpu017:29500",
        "--rdzv_id=4242", "--max_restarts=0", "-m", "stages.worker", str(spec)]]
    assert calls(log, "scancel") == []


def test_slurm_deadline_watch_stops_the_worker_lead_seconds_before_the_end(tmp_path, monkeypatch):
    """600 + 1 s before the end time squeue reports, the watch SIGTERMs the job's steps (the
    worker checkpoints) and says so in the output, which is how forge tells a chain's stop."""
    done, log, _ = run_batch_script(tmp_path, monkeypatch, left_s=601.5, FAKE_STEP_S="3")
    assert calls(log, "squeue")[0] == ["-h", "-j", "4242", "-o", "%e"]
    assert calls(log, "scancel") == [["--signal=TERM", "4242"]]
    assert f"{DEADLINE_MARK}: Slurm job 4242 ends at " in done.stdout


def test_slurm_job_stopped_by_forge_cancels_itself(tmp_path, monkeypatch):
    """forge leaves slurm-<id>.cancel before it signals the worker: once the worker has
    checkpointed and exited, the script ends its own job as CANCELLED (not FAILED)."""
    (tmp_path / "my store" / f"pretrain-1-{KEY}").mkdir(parents=True)
    (tmp_path / "my store" / f"pretrain-1-{KEY}" / "slurm-4242.cancel").write_text("{}")
    done, log, _ = run_batch_script(tmp_path, monkeypatch, FAKE_EXIT="143")
    assert calls(log, "scancel") == [["4242"]]
    assert done.returncode == -15   # cancelled by Slurm, not ended with the worker's code


def test_slurm_one_node_layout_runs_torchrun_standalone(tmp_path):
    spec = spec_in(tmp_path)
    opts, srun = slurm_lines(slurm_script("torchrun", cluster("cluster=slurm",
                                                              "cluster.data_parallel=4"), spec))
    assert opts[2:6] == ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=32",
                         "--gpus-per-node=8"]
    assert srun.startswith("srun --kill-on-bad-exit=1 --nodes=1 ")
    assert srun.endswith("python -m torch.distributed.run --standalone --nproc_per_node=8 "
                         f"--max_restarts=0 -m stages.worker {spec}")


def test_slurm_single_process_stage_takes_one_task_and_one_gpu(tmp_path):
    spec = spec_in(tmp_path, "data")
    opts, srun = slurm_lines(slurm_script("python", cluster("cluster=slurm"), spec))
    assert opts[:5] == [f"--job-name=forge-data-{KEY}", f"--output={spec.parent}/slurm-%j.out",
                        "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=4"]
    assert "--gpus-per-node=1" in opts
    assert srun.startswith("srun --kill-on-bad-exit=1 --nodes=1 ")
    assert srun.endswith(f"python -m stages.worker {spec}")


JOB = {"job_id": "7", "state": "COMPLETED", "exit_code": "0:0", "reason": "None", "stopped_by": ""}


@pytest.mark.parametrize("job, progressed, jobs, what, why", [
    ({}, False, 1, "done", "Slurm job 7 COMPLETED, exit code 0:0"),
    ({"state": "FAILED", "exit_code": "1:0", "reason": "NonZeroExitCode"}, True, 1, "failed",
     "Slurm job 7 FAILED, exit code 1:0, reason NonZeroExitCode"),
    ({"state": "OUT_OF_MEMORY", "exit_code": "0:125"}, True, 1, "failed",
     "Slurm job 7 OUT_OF_MEMORY, exit code 0:125"),
    # the deadline watch stopped it (torchrun exits 1 after the ranks' 143): the chain goes on
    ({"state": "FAILED", "exit_code": "1:0", "stopped_by": "time limit"}, True, 3, "next",
     "Slurm job 7 FAILED, exit code 1:0 at its time limit after a new checkpoint"),
    ({"state": "TIMEOUT", "exit_code": "0:15"}, True, 1, "next", "Slurm job 7 TIMEOUT"),
    ({"state": "PREEMPTED", "exit_code": "0:15"}, True, 1, "next", "Slurm job 7 PREEMPTED"),
    ({"state": "TIMEOUT", "exit_code": "0:15"}, False, 1, "failed",
     "stopped at its time limit without a new checkpoint; raise cluster.slurm.time or lower "
     "cluster.slurm.signal_lead_s"),
    ({"state": "TIMEOUT", "exit_code": "0:15"}, True, 5, "failed",
     "the stage has taken 5 jobs, cluster.slurm.max_jobs"),
    ({"state": "CANCELLED", "exit_code": "0:15", "stopped_by": "forge SIGTERM"}, True, 1,
     "stopped", "stopped by forge SIGTERM"),
])
def test_slurm_verdict_after_a_job(job, progressed, jobs, what, why):
    got_what, got_why = verdict(dict(JOB, **job), progressed, jobs, max_jobs=5)
    assert (got_what, why in got_why) == (what, True), got_why


def test_slurm_exit_status_reads_code_and_signal():
    assert [exit_status(c) for c in ("0:0", "1:0", "0:15", "0:9", "")] == [0, 1, 143, 137, 0]


def test_slurm_without_its_tools_fails_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = tmp_path / f"pretrain-1-{KEY}"
    with pytest.raises(ConfigError, match=r"^cluster\.launcher: slurm needs sbatch, squeue, "
                                          r"scontrol, scancel on PATH; run forge on a Slurm login"):
        run_worker("pretrain-1", "torchrun", cluster("cluster=slurm"), {}, out, print)
    assert not out.exists()


# --- Kubernetes -------------------------------------------------------------------------------

def test_k8s_manifest_is_an_indexed_job_per_node_behind_a_headless_service():
    spec = spec_in(Path("/store"))
    name = f"forge-pretrain-1-{KEY}"
    labels = {"app.kubernetes.io/part-of": "granite-forge", "granite-forge/job": name}
    meta = {"name": name, "namespace": "granite-forge", "labels": labels}
    rank = {"name": "NODE_RANK", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}
    pod = {
        "restartPolicy": "Never",
        "containers": [{
            "name": "worker", "image": "registry.example.com/granite-forge/worker:0.1.0",
            "imagePullPolicy": "IfNotPresent",
            "command": ["python", "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=8",
                        "--node_rank=$(NODE_RANK)", f"--master_addr={name}-0.{name}",
                        "--master_port=29500", "--max_restarts=0", "-m", "stages.worker",
                        "/store/pretrain-1-0123456789ab/spec.json"],
            "env": WORKER_ENV + [rank],
            "resources": {"requests": {"cpu": 32}, "limits": {"nvidia.com/gpu": 8}},
            "volumeMounts": [{"name": "store", "mountPath": "/store"},
                             {"name": "dshm", "mountPath": "/dev/shm"}]}],
        "volumes": [{"name": "store", "persistentVolumeClaim": {"claimName": "forge-store"}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001,
                            "fsGroupChangePolicy": "OnRootMismatch"},
        "subdomain": name,
        "serviceAccountName": "forge-worker",
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}
    assert kubernetes_manifest("torchrun", cluster("cluster=k8s"), spec) == {
        "apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Service", "metadata": meta,
             "spec": {"clusterIP": "None", "selector": labels, "publishNotReadyAddresses": True,
                      "ports": [{"name": "rdzv", "port": 29500}]}},
            {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
             "spec": {"completionMode": "Indexed", "completions": 2, "parallelism": 2,
                      "backoffLimit": 0, "template": {"metadata": {"labels": labels}, "spec": pod}}}]}


def test_k8s_one_node_and_single_process_stages_need_no_rendezvous():
    one_node = cluster("cluster=k8s", "cluster.data_parallel=4")  # 2 x 4 = 8 GPUs
    items = kubernetes_manifest("torchrun", one_node, spec_in(Path("/store")))["items"]
    assert [i["kind"] for i in items] == ["Job"]
    pod = items[0]["spec"]["template"]["spec"]
    assert "subdomain" not in pod and items[0]["spec"]["completions"] == 1
    assert pod["containers"][0]["command"][:5] == ["python", "-m", "torch.distributed.run",
                                                   "--standalone", "--nproc_per_node=8"]
    single = kubernetes_manifest("python", cluster("cluster=k8s"), spec_in(Path("/store"), "data"))
    container = single["items"][0]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "stages.worker",
                                    f"/store/data-{KEY}/spec.json"]
    assert container["resources"] == {"requests": {"cpu": 4}, "limits": {"nvidia.com/gpu": 1}}


def test_k8s_job_names_are_dns_labels_that_keep_the_key():
    name = job_name(Path(f"/s/Eval_Extend.Long-Context-{'x' * 60}-{KEY}/spec.json"))
    assert len(name) <= 52 and name.endswith(f"-{KEY}") and name.startswith("forge-eval-extend-long")
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")


FAKE_KUBECTL = """\
args = sys.argv[1:]
if args[:2] == ["auth", "can-i"]:
    print(os.environ.get("FAKE_CAN_I", "yes"))
    sys.exit(0 if os.environ.get("FAKE_CAN_I", "yes") == "yes" else 1)
if args[0] == "create":
    open(os.environ["FAKE_CREATED"], "w").write(open(args[args.index("-f") + 1]).read())
elif args[:2] == ["get", "pods"]:
    print("pod/forge-pretrain-1-0123456789ab-0-x7k2q")
elif args[0] == "logs":
    print("[pretrain-1] step 1/10 loss 3.25")
elif args[:2] == ["get", "job"]:
    print(os.environ["FAKE_JOB_STATE"])
"""


def test_k8s_stage_through_run_worker_follows_pod_0_and_takes_the_jobs_verdict(tmp_path, monkeypatch):
    log = fake_bin(tmp_path, monkeypatch, kubectl=FAKE_KUBECTL)
    monkeypatch.setenv("FAKE_CREATED", str(tmp_path / "created.json"))
    monkeypatch.setenv("FAKE_JOB_STATE", "Complete")
    c, out = cluster("cluster=k8s"), tmp_path / "store" / f"pretrain-1-{KEY}"
    shown: list[str] = []
    run_worker("pretrain-1", "torchrun", c, {"kind": "pretrain"}, out, shown.append)
    manifest = kubernetes_manifest("torchrun", c, out / "spec.json")
    assert json.loads((tmp_path / "created.json").read_text()) == manifest
    assert json.loads((out / MANIFEST).read_text()) == manifest
    assert shown == ["[pretrain-1] step 1/10 loss 3.25"]
    kube = calls(log, "kubectl")
    assert kube[0] == ["auth", "can-i", "create", "jobs", "--namespace=granite-forge"]
    assert kube[1][:1] == ["delete"] and kube[2] == ["create", "-f", str(out / MANIFEST)]
    assert kube[4] == ["logs", "--namespace=granite-forge", "--follow", "--pod-running-timeout=24h",
                       "pod/forge-pretrain-1-0123456789ab-0-x7k2q"]
    monkeypatch.setenv("FAKE_JOB_STATE", "FailureTarget Failed")
    with pytest.raises(StageFailed) as failed:
        run_worker("pretrain-1", "torchrun", c, {"kind": "pretrain"}, out, shown.append)
    assert failed.value.code == 1
    assert failed.value.tail[-1].startswith(f"Error: Kubernetes Job forge-pretrain-1-{KEY} failed")


def test_k8s_without_kubectl_or_api_access_fails_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"^cluster\.launcher: kubernetes needs kubectl on PATH"):
        check_available(cluster("cluster=k8s"))
    fake_bin(tmp_path, monkeypatch, kubectl=FAKE_KUBECTL)
    monkeypatch.setenv("FAKE_CAN_I", "no")
    with pytest.raises(ConfigError, match=r"cannot create Jobs in namespace 'granite-forge' \(no\)"):
        check_available(cluster("cluster=k8s"))


def test_generated_scripts_are_valid_bash(tmp_path):
    for launcher, overrides in (("torchrun", ("cluster=slurm",)), ("python", ("cluster=slurm",)),
                                ("torchrun", ("cluster=k8s",))):
        c = cluster(*overrides)
        script = (slurm_script(launcher, c, spec_in(tmp_path)) if c.launcher == "slurm"
                  else worker_command(launcher, c, spec_in(tmp_path))[-1])
        done = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
        assert done.returncode == 0, (overrides, done.stderr)


# --- config: fields, messages, identity -------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["cluster=slurm", "cluster.data_parallel=5"],
     r"^cluster\.gpus_per_node: the world size 10 \(tensor 2 x pipeline 1 x data 5 x context 1\) "
     r"is not a whole number of nodes of 8; use e\.g\. data_parallel=8"),
    (["cluster=slurm", "cluster.slurm.time=forever"],
     r"^cluster\.slurm\.time: 'forever' is not a Slurm time limit"),
    (["cluster=slurm", "cluster.slurm.container_image="],
     r"^cluster\.slurm\.container_mounts: mounts are given but no container_image"),
    (["cluster=slurm", "cluster.slurm.extra_args=[exclusive]"],
     r"^cluster\.slurm\.extra_args: 'exclusive' is not an sbatch option"),
    (["cluster=slurm", "cluster.slurm.extra_args=['--time=10']"],
     r"^cluster\.slurm\.extra_args: '--time=10' is set by forge .* the time limit from slurm\.time"),
    (["cluster=slurm", "cluster.slurm.time=00:10:00", "cluster.slurm.signal_lead_s=600"],
     r"^cluster\.slurm\.signal_lead_s: 600 s is not less than the time limit 00:10:00 \(600 s\)"),
    (["cluster=slurm", "cluster.slurm.max_jobs=0"], r"^cluster\.slurm\.max_jobs: must be >= 1"),
    (["cluster=k8s", "cluster.kubernetes.image="],
     r"^cluster\.kubernetes\.image: required with launcher=kubernetes"),
    (["cluster=k8s", "cluster.kubernetes.namespace=Forge_NS"],
     r"^cluster\.kubernetes\.namespace: 'Forge_NS' is not a Kubernetes name"),
    (["cluster=k8s", "cluster.kubernetes.rdzv_port=80"],
     r"^cluster\.kubernetes\.rdzv_port: 80 is not a free-to-use port"),
    (["cluster=cpu", "cluster.launcher=pbs"],
     r"^cluster\.launcher: 'pbs' is not one of 'torchrun', 'slurm', 'kubernetes'"),
    (["cluster=slurm", "+cluster.slurm.partiton=gpu"],
     r"^cluster\.slurm\.partiton: unknown field\. Known fields: account, container_image"),
])
def test_bad_cluster_fields_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_mod.load(overrides)


def test_worker_rebuilds_the_launch_settings_from_its_spec_file():
    for name in ("slurm", "k8s"):
        c = cluster(f"cluster={name}")
        assert from_dict(ParallelSpec, json.loads(json.dumps(to_dict(c))), "cluster") == c


def test_moving_to_another_cluster_changes_no_stage_key(tmp_path):
    """Launcher settings are not identity fields: a pipeline moved from one node to Slurm or
    Kubernetes (same layout) reuses every finished stage."""
    layouts = (["cluster=gpu-node"], ["cluster=slurm", "cluster.data_parallel=4"],
               ["cluster=k8s", "cluster.data_parallel=4", "cluster.kubernetes.shm_gib=8"])
    # GPU clusters refuse document masking (no THD packing yet)
    on_gpus = [*(f"stages.extend-{i}.document_mask=false" for i in (1, 2, 3)),
               "stages.sft.document_mask=false"]
    keys = [{n: node.key for n, node in
             build(config_mod.load([*o, *on_gpus, f"store={tmp_path}"])).nodes.items()}
            for o in layouts]
    assert keys[0] == keys[1] == keys[2]


def test_forge_launch_command_prints_the_manifest(tmp_path, capsys):
    assert forge(["launch-command", "pipeline=granite-4.1", "cluster=k8s", f"store={tmp_path}",
                  "--stage", "pretrain-1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# stage pretrain-1 (pretrain), launcher kubernetes; forge writes "
                          f"{tmp_path}/pretrain-1-")
    assert "kubectl create -f" in out and "completionMode: Indexed" in out
    assert "nvidia.com/gpu: 8" in out and "- --node_rank=$(NODE_RANK)" in out
