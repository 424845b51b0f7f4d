"""The command that starts one stage worker, per launcher (``cluster.launcher``).

- ``torchrun``: ``torchrun --standalone`` on this machine (training kinds), else plain Python.
- ``slurm``: a batch job (``sbatch``) whose script, written beside the spec, asks for the nodes in
  ``#SBATCH`` lines, reads the first node's name with ``scontrol`` and starts one ``torchrun`` per
  node with ``srun``, all meeting at that node (c10d rendezvous), inside the worker image when
  ``slurm.container_image`` is set. The job outlives the orchestrator: ``flows/slurm.py`` submits,
  follows, re-attaches, cancels and chains it (the local launchers go through flows/launch.py).
- ``kubernetes``: an Indexed Job of the worker image (one pod per node, ``torchrun`` in each, static
  rendezvous on pod 0 through a headless Service), applied with ``kubectl``; the script follows pod
  0's log (rank 0 reports progress) and exits with the Job's verdict.

The orchestrator runs each local command as a subprocess and streams its output to
``worker.log``; a Slurm job's output file is tailed into it the same way. Single-process kinds (data, merge, evaluate) get
one task (and one GPU on a cuda cluster). The spec file lives in the stage's output dir in the store,
which the nodes must see at the same path (a shared file system, or the claim mounted there).
``launch_plan`` shows a command without running it; ``check_available`` stops a run, before any
compute, when this machine cannot launch.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from stages.schema import ConfigError
from stages.launch_spec import node_layout

WORKER = ["-m", "stages.worker"]
TORCHRUN = ["-m", "torch.distributed.run"]
MANIFEST = "k8s-job.json"   # written next to spec.json for the kubernetes launcher
IMAGE_UID = 10001           # the worker image's user (Dockerfile); owns what pods write to the store


class StageFailed(RuntimeError):
    """A stage's worker (a local process, a Slurm job, a Kubernetes Job) ended without success;
    ``tail``: the end of its output and the launcher's word, for failure.json."""

    def __init__(self, stage: str, code: int, tail: list[str], log_path: Path):
        self.stage, self.code, self.tail, self.log_path = stage, code, tail, log_path
        super().__init__(f"stage {stage} failed: worker exited with code {code}; last lines of "
                         f"{log_path}:\n" + "\n".join("    " + t for t in tail))


def worth_showing(line: str) -> bool:
    """Progress and errors of a worker go to the console; library chatter stays in worker.log."""
    return line.startswith("[") or "Error" in line or "error:" in line


class WorkerLog:
    """A worker's output, however it runs: every line to worker.log (``fh``), progress and errors
    to ``log`` (Prefect's run logger), the last 20 kept for a failure's tail."""

    def __init__(self, fh: Any, log: Any):
        self.fh, self.log = fh, log
        self.tail: deque[str] = deque(maxlen=20)

    def header(self, text: str) -> None:
        """An attempt's first line in worker.log: ``--- time what``."""
        self.fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        self.fh.flush()

    def show(self, line: str) -> None:
        self.fh.write(line + "\n")
        self.fh.flush()
        self.tail.append(line)
        if worth_showing(line):
            self.log(line)


def settings_env(cluster: Any) -> dict[str, str]:
    """Environment every worker gets, wherever it runs (threads, unbuffered logs, offline hubs)."""
    threads = str(cluster.threads_per_worker)
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "RAYON_NUM_THREADS": threads,
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    if cluster.threads_per_worker > 1:
        env["OMP_WAIT_POLICY"] = "PASSIVE"  # spin-waiting threads make 2 threads slower than 1
    if cluster.device == "cpu":
        # a CPU cluster on a GPU machine: the CPU shim refuses to run where CUDA is visible
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def worker_command(launcher: str, cluster: Any, spec_path: Path) -> list[str]:
    """``launcher`` is the stage kind's ("torchrun" for training, "python" for the rest)."""
    if cluster.launcher == "slurm":
        return slurm_command(launcher, cluster, spec_path)
    if cluster.launcher == "kubernetes":
        return kubernetes_command(cluster, spec_path)
    if launcher == "torchrun":
        return [sys.executable, *TORCHRUN, "--standalone", f"--nproc_per_node={cluster.world_size}",
                "--max_restarts=0", *WORKER, str(spec_path)]
    return [sys.executable, *WORKER, str(spec_path)]


def prepare(launcher: str, cluster: Any, spec_path: Path) -> None:
    """Write what the command reads besides the spec (the Kubernetes manifest)."""
    if cluster.launcher == "kubernetes":
        manifest = kubernetes_manifest(launcher, cluster, spec_path)
        spec_path.with_name(MANIFEST).write_text(json.dumps(manifest, indent=2))
    elif cluster.launcher == "slurm":
        spec_path.with_name(SLURM_SCRIPT).write_text(slurm_script(launcher, cluster, spec_path))


def _per_node(launcher: str, cluster: Any) -> tuple[int, int, int]:
    """(nodes, processes per node, GPUs per node) of one stage."""
    nodes, procs = node_layout(cluster) if launcher == "torchrun" else (1, 1)
    return nodes, procs, (procs if cluster.device == "cuda" else 0)


# --- Slurm -----------------------------------------------------------------------------------

SLURM_SCRIPT = "slurm-job.sh"   # written next to spec.json; `sbatch` submits it (flows/slurm.py)
SLURM_CLIENTS = ("sbatch", "squeue", "scontrol", "scancel")
# The line the job's deadline watch prints when it stops the worker before the time limit, and the
# file forge leaves beside the job's output when it stops the job (`forge cancel`, Ctrl-C).
DEADLINE_MARK = "[forge] time limit near"
CANCEL_SUFFIX = ".cancel"


def slurm_output(out_dir: Path, job_id: str = "%j") -> Path:
    """The job's output file (``%j``: sbatch fills in the job id)."""
    return Path(out_dir) / f"slurm-{job_id}.out"


def slurm_script(launcher: str, cluster: Any, spec_path: Path) -> str:
    """The batch script of one stage: its allocation as ``#SBATCH`` lines, the worker's settings,
    a deadline watch, then ``srun`` of the worker (one ``torchrun`` per node for training)."""
    s = cluster.slurm
    out_dir = spec_path.parent
    nodes, procs, gpus = _per_node(launcher, cluster)
    cpus = procs * cluster.threads_per_worker
    opts = [f"--job-name=forge-{out_dir.name}", f"--output={slurm_output(out_dir)}",
            f"--nodes={nodes}", "--ntasks-per-node=1", f"--cpus-per-task={cpus}"]
    opts += [f"--gpus-per-node={gpus}"] if gpus else []
    opts += [f"--{flag}={value}" for flag, value in
             (("partition", s.partition), ("account", s.account), ("time", s.time)) if value]
    opts += list(s.extra_args)
    # srun does not inherit --cpus-per-task from the allocation (Slurm >= 22.05): repeat it
    step = ["srun", "--kill-on-bad-exit=1", f"--nodes={nodes}", "--ntasks-per-node=1",
            f"--cpus-per-task={cpus}"]
    if s.container_image:
        step.append(f"--container-image={s.container_image}")
        step += [f"--container-mounts={','.join(s.container_mounts)}"] if s.container_mounts else []
    worker = [*WORKER, str(spec_path)]
    if launcher != "torchrun":
        run = shlex.join([*step, s.python, *worker])
    elif nodes == 1:  # --standalone picks a free port: two stages may share a node
        run = shlex.join([*step, s.python, *TORCHRUN, "--standalone", f"--nproc_per_node={procs}",
                          "--max_restarts=0", *worker])
    else:
        # $head and $SLURM_JOB_ID expand on the job's first node, in the batch shell
        run = ('head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
               + shlex.join([*step, s.python, *TORCHRUN, f"--nnodes={nodes}",
                             f"--nproc_per_node={procs}", "--rdzv_backend=c10d"])
               + f' --rdzv_endpoint="$head:{s.rdzv_port}" --rdzv_id="$SLURM_JOB_ID" '
               + shlex.join(["--max_restarts=0", *worker]))
    env = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in settings_env(cluster).items())
    header = "\n".join(f"#SBATCH {shlex.quote(o)}" for o in opts)
    return f"""#!/bin/bash
{header}
# forge's batch job of stage {out_dir.name}: flows/slurm.py submits it, follows it and chains the
# next job when this one stops at its time limit (the worker checkpoints first).
out={shlex.quote(str(out_dir))}
lead={s.signal_lead_s}
{env}
# Deadline watch: SIGTERM to the worker's steps $lead s before the job's end time (read again after
# each wait: the limit may be changed); the worker finishes its step, checkpoints and exits.
forge_deadline() {{
  trap 'kill "$nap" 2>/dev/null; exit 0' TERM   # the sleep too: it holds the output open
  while :; do
    if end=$(date -d "$(squeue -h -j "$SLURM_JOB_ID" -o %e)" +%s 2>/dev/null); then
      left=$(( end - lead - $(date +%s) ))
      if [ "$left" -le 0 ]; then
        echo "{DEADLINE_MARK}: Slurm job $SLURM_JOB_ID ends at $(date -d "@$end" +%T); SIGTERM to the worker"
        scancel --signal=TERM "$SLURM_JOB_ID"
        return
      fi
    else
      left=60   # no end time (no limit): look again later
    fi
    sleep $(( left < 60 ? left : 60 )) & nap=$!
    wait "$nap"
  done
}}
forge_deadline &
watch=$!
{run}
code=$?
kill "$watch" 2>/dev/null
# forge stopped the worker (it has checkpointed): end the job as CANCELLED, not FAILED
if [ -e "$out/slurm-$SLURM_JOB_ID{CANCEL_SUFFIX}" ]; then scancel "$SLURM_JOB_ID"; sleep 5; fi
exit "$code"
"""


def slurm_command(launcher: str, cluster: Any, spec_path: Path) -> list[str]:
    """What submits the stage: ``sbatch --parsable`` of its script (``prepare`` writes it)."""
    return ["sbatch", "--parsable", str(spec_path.with_name(SLURM_SCRIPT))]


# --- Kubernetes ------------------------------------------------------------------------------

def job_name(spec_path: Path) -> str:
    """forge-<stage>-<key12>: a DNS label short enough for pod hostnames <name>-<index>."""
    stage, _, key = spec_path.parent.name.rpartition("-")
    stage = re.sub(r"[^a-z0-9-]+", "-", stage.lower()).strip("-")[:52 - 6 - len(key) - 1]
    return f"forge-{stage.rstrip('-')}-{key}"


def kubernetes_manifest(launcher: str, cluster: Any, spec_path: Path) -> dict:
    """A v1 List: the headless Service (multi-node only) and the Indexed Job of one stage."""
    k = cluster.kubernetes
    name = job_name(spec_path)
    nodes, procs, gpus = _per_node(launcher, cluster)
    def labels() -> dict:  # a fresh dict each time: no YAML anchors in the printed manifest
        return {"app.kubernetes.io/part-of": "granite-forge", "granite-forge/job": name}
    env = [{"name": key, "value": value} for key, value in settings_env(cluster).items()]
    worker = [*WORKER, str(spec_path)]
    if launcher != "torchrun":
        command = ["python", *worker]
    elif nodes == 1:
        command = ["python", *TORCHRUN, "--standalone", f"--nproc_per_node={procs}",
                   "--max_restarts=0", *worker]
    else:
        # NODE_RANK is the pod's completion index; pod 0 hosts the rendezvous store
        env.append({"name": "NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}})
        command = ["python", *TORCHRUN, f"--nnodes={nodes}", f"--nproc_per_node={procs}",
                   "--node_rank=$(NODE_RANK)", f"--master_addr={name}-0.{name}",
                   f"--master_port={k.rdzv_port}", "--max_restarts=0", *worker]
    resources = {"requests": {"cpu": procs * cluster.threads_per_worker}}
    if gpus:
        resources["limits"] = {"nvidia.com/gpu": gpus}
    store = str(spec_path.parent.parent)
    container = {"name": "worker", "image": k.image, "imagePullPolicy": k.image_pull_policy,
                 "command": command, "env": env, "resources": resources,
                 "volumeMounts": [{"name": "store", "mountPath": store},
                                  {"name": "dshm", "mountPath": "/dev/shm"}]}
    pod: dict[str, Any] = {"restartPolicy": "Never", "containers": [container], "volumes": [
        {"name": "store", "persistentVolumeClaim": {"claimName": k.store_claim}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{k.shm_gib}Gi"}}],
        # the store's group is the image user's; OnRootMismatch: no chown walk over a large store
        "securityContext": {"runAsNonRoot": True, "runAsUser": IMAGE_UID, "fsGroup": IMAGE_UID,
                            "fsGroupChangePolicy": "OnRootMismatch"}}
    if nodes > 1:
        pod["subdomain"] = name  # pod i answers at <name>-i.<name> through the Service
    if k.service_account:
        pod["serviceAccountName"] = k.service_account
    if k.node_selector:
        pod["nodeSelector"] = dict(k.node_selector)
    def meta() -> dict:
        return {"name": name, "namespace": k.namespace, "labels": labels()}
    # backoffLimit 0: a failed stage is retried by `forge run`, which resumes from checkpoints
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta(),
           "spec": {"completionMode": "Indexed", "completions": nodes, "parallelism": nodes,
                    "backoffLimit": 0,
                    "template": {"metadata": {"labels": labels()}, "spec": pod}}}
    items = [job]
    if nodes > 1:
        service = {"apiVersion": "v1", "kind": "Service", "metadata": meta(),
                   "spec": {"clusterIP": "None", "selector": labels(),
                            "publishNotReadyAddresses": True,  # resolvable before any readiness
                            "ports": [{"name": "rdzv", "port": k.rdzv_port}]}}
        items.insert(0, service)
    return {"apiVersion": "v1", "kind": "List", "items": items}


def kubernetes_command(cluster: Any, spec_path: Path) -> list[str]:
    ns, name = cluster.kubernetes.namespace, job_name(spec_path)
    manifest = shlex.quote(str(spec_path.with_name(MANIFEST)))
    pod0 = f"batch.kubernetes.io/job-name={name},batch.kubernetes.io/job-completion-index=0"
    script = f"""set -eu
ns={ns}; job={name}; manifest={manifest}
# Jobs are immutable: a rerun replaces the last attempt (checkpoints stay in the store)
kubectl delete --namespace="$ns" --ignore-not-found --cascade=foreground --wait=true -f "$manifest"
kubectl create -f "$manifest"
until pod=$(kubectl get pods --namespace="$ns" -l {pod0} -o name) && [ -n "$pod" ]; do sleep 5; done
kubectl logs --namespace="$ns" --follow --pod-running-timeout=24h "$pod" || true
while :; do
  state=$(kubectl get job "$job" --namespace="$ns" \\
          -o 'jsonpath={{.status.conditions[?(@.status=="True")].type}}') || state=""
  case "$state" in
    *Complete*) exit 0 ;;
    *Failed*) echo "Error: Kubernetes Job $job failed; kubectl describe job $job -n $ns"; exit 1 ;;
  esac
  sleep 10
done"""
    return ["bash", "-c", script]


# --- before any compute -----------------------------------------------------------------------

def check_available(cluster: Any) -> None:
    """Raise ConfigError when this machine cannot start workers with the cluster's launcher."""
    see = "`forge launch-command STAGE` prints the command without running it"
    if cluster.launcher == "torchrun":
        nodes, per_node = node_layout(cluster)
        if nodes > 1:
            raise ConfigError(f"cluster.launcher: torchrun starts workers on this one machine, but "
                              f"the layout needs {nodes} nodes of {per_node} (world size "
                              f"{cluster.world_size}); use cluster=slurm or cluster=k8s, or a "
                              "smaller layout")
    elif cluster.launcher == "slurm":
        missing = [tool for tool in SLURM_CLIENTS if shutil.which(tool) is None]
        if missing:
            raise ConfigError(f"cluster.launcher: slurm needs {', '.join(missing)} on PATH; run "
                              f"forge on a Slurm login node ({see})")
    elif cluster.launcher == "kubernetes":
        if shutil.which("kubectl") is None:
            raise ConfigError("cluster.launcher: kubernetes needs kubectl on PATH, with a context "
                              f"for the cluster (the orchestrator image has both; {see})")
        ns = cluster.kubernetes.namespace
        try:
            done = subprocess.run(["kubectl", "auth", "can-i", "create", "jobs", f"--namespace={ns}"],
                                  capture_output=True, text=True, timeout=30)
            answer, ok = (done.stdout + done.stderr).strip(), done.returncode == 0
        except subprocess.TimeoutExpired:
            answer, ok = "no answer from the API server within 30 s", False
        if not ok or answer.splitlines()[:1] != ["yes"]:
            raise ConfigError(f"cluster.launcher: kubernetes: cannot create Jobs in namespace "
                              f"{ns!r} ({answer.splitlines()[-1] if answer else 'no output'}); "
                              "check kubectl's context (KUBECONFIG) and the RBAC of its account "
                              "(jobs, services, pods, pods/log)")


def launch_plan(cluster: Any, spec_path: Path, launcher: str = "torchrun") -> str:
    """The command (and, for Kubernetes, the manifest) a stage would start with, as text."""
    command = worker_command(launcher, cluster, spec_path)
    if cluster.launcher == "slurm":
        return (f"# {shlex.join(command)}\n# {spec_path.with_name(SLURM_SCRIPT)}:\n"
                + slurm_script(launcher, cluster, spec_path))
    if cluster.launcher != "kubernetes":
        return shlex.join(command)
    import yaml  # the orchestrator's (through omegaconf)
    manifest = kubernetes_manifest(launcher, cluster, spec_path)
    return (f"# bash -c:\n{command[-1]}\n# {spec_path.with_name(MANIFEST)}:\n"
            + yaml.safe_dump(manifest, sort_keys=False, width=100))
