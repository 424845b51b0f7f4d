"""Where stage workers run: the launcher settings of the cluster config, and the node arithmetic.

``cluster.launcher`` picks one of
- ``torchrun``: this machine, ``torchrun --standalone`` (a laptop, CI, or one GPU node);
- ``slurm``: a batch job per stage (``sbatch``), ``srun`` starts one ``torchrun`` per node,
  rendezvous on the job's first node; inside the worker image through Pyxis/enroot when one is
  named. A stage longer than the time limit runs as a chain of jobs (``flows/slurm.py``);
- ``kubernetes``: an Indexed Job of the worker image, one pod per node with ``torchrun`` in it,
  rendezvous on pod 0 behind a headless Service.

Every field is a setting, not an identity field: moving a pipeline to another cluster never changes
a stage's key. The commands are built in ``flows/launchers.py``; nothing here imports torch.
"""
from __future__ import annotations

import re
from typing import Any, Literal

from stages.schema import ConfigError, configclass, setting

LAUNCHERS = ("torchrun", "slurm", "kubernetes")

# Slurm's --time forms: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (and no limit at all)
_SLURM_TIME = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|UNLIMITED|INFINITE")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


# sbatch options forge sets itself (extra_args may not repeat them)
_SBATCH_OWN = {"--output", "-o", "--job-name", "-J", "--nodes", "-N", "--ntasks-per-node",
               "--cpus-per-task", "-c", "--gpus-per-node", "--time", "-t", "--signal", "--parsable"}


def slurm_seconds(limit: str) -> int | None:
    """Seconds of a Slurm time limit (None: empty or unlimited)."""
    if not limit or limit in ("UNLIMITED", "INFINITE"):
        return None
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:                 # D-HH, D-HH:MM, D-HH:MM:SS
        h, m, sec = (parts + [0, 0])[:3]
    elif len(parts) == 3:    # HH:MM:SS
        h, m, sec = parts
    else:                    # MM, MM:SS
        h, (m, sec) = 0, (parts + [0])[:2]
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + sec


def _check_port(port: int) -> None:
    if not 1024 <= port <= 65535:
        raise ConfigError(f"rdzv_port: {port} is not a free-to-use port; pick one in 1024..65535")


@configclass
class SlurmSpec:
    partition: str = setting("", "partition of the stage jobs (sbatch --partition); empty = the "
                                 "cluster's default")
    account: str = setting("", "account charged (sbatch --account); empty = the user's default")
    time: str = setting("", "wall-clock limit of one job: MM, HH:MM:SS or D-HH:MM:SS; empty = the "
                            "partition's default. A stage longer than that runs as a chain of jobs, "
                            "each resuming from the checkpoint the last one wrote before its limit")
    container_image: str = setting("", "worker image run through Pyxis/enroot (srun "
                                       "--container-image); empty = the nodes' own environment")
    container_mounts: tuple[str, ...] = setting((), "SRC:DST mounts for the image (srun "
                                                    "--container-mounts); the store must appear "
                                                    "at the same path inside")
    python: str = setting("python", "Python of the worker environment on the nodes (in the "
                                    "image: the image's own)")
    rdzv_port: int = setting(29500, "torchrun rendezvous port on the first node")
    extra_args: tuple[str, ...] = setting((), "more sbatch options, e.g. [--exclusive, --qos=high]")
    signal_lead_s: int = setting(600, "seconds before a job's time limit at which its worker gets "
                                      "SIGTERM, finishes its step, checkpoints and exits, so the "
                                      "next job of the chain resumes there: one step plus one "
                                      "checkpoint save must fit (a 30B save to a parallel file "
                                      "system takes minutes)", ge=1)
    max_jobs: int = setting(1000, "most jobs one stage may take (a chain that ends a job at each "
                                  "time limit); reaching it fails the stage instead of queueing "
                                  "forever", ge=1)
    poll_s: float = setting(10.0, "seconds between looks at a job's state (scontrol/squeue); its "
                                  "output is read every second", gt=0)

    def __post_init__(self) -> None:
        if self.time and not _SLURM_TIME.fullmatch(self.time):
            raise ConfigError(f"time: {self.time!r} is not a Slurm time limit; use MM, HH:MM:SS or "
                              "D-HH:MM:SS (e.g. 48:00:00 or 2-00:00:00)")
        _check_port(self.rdzv_port)
        for mount in self.container_mounts:
            if ":" not in mount:
                raise ConfigError(f"container_mounts: {mount!r} is not SRC:DST[:FLAGS]; mount the "
                                  "store at its own path, e.g. /lustre/forge:/lustre/forge")
        if self.container_mounts and not self.container_image:
            raise ConfigError("container_mounts: mounts are given but no container_image; set "
                              "container_image, or drop the mounts to run on the nodes' own Python")
        for arg in self.extra_args:
            if not arg.startswith("-"):
                raise ConfigError(f"extra_args: {arg!r} is not an sbatch option (they start with "
                                  "'-', e.g. --exclusive)")
            if arg.split("=")[0] in _SBATCH_OWN:
                raise ConfigError(f"extra_args: {arg!r} is set by forge (output, job name, nodes, "
                                  "tasks, CPUs and GPUs come from the cluster layout, the time "
                                  "limit from slurm.time); drop it")
        limit = slurm_seconds(self.time)
        if limit is not None and self.signal_lead_s >= limit:
            raise ConfigError(f"signal_lead_s: {self.signal_lead_s} s is not less than the time "
                              f"limit {self.time} ({limit} s): the worker would be stopped before it "
                              "trains; lower signal_lead_s or raise time")
        if not self.python:
            raise ConfigError("python: empty; name the worker environment's Python on the nodes")


@configclass
class KubernetesSpec:
    namespace: str = setting("default", "namespace of the stage Jobs")
    image: str = setting("", "worker image (the repository's Dockerfile, pushed to a registry the "
                             "cluster pulls from); required with launcher=kubernetes")
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = setting(
        "IfNotPresent", "when the kubelet pulls the image")
    store_claim: str = setting("", "PersistentVolumeClaim that holds the store; mounted at the "
                                   "store's own path in every pod (the orchestrator mounts it at "
                                   "the same path); required with launcher=kubernetes")
    service_account: str = setting("", "service account of the worker pods; empty = the "
                                       "namespace's default")
    node_selector: dict[str, str] = setting(doc="node labels the worker pods must match, e.g. "
                                                "{nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}",
                                            factory=dict)
    shm_gib: int = setting(64, "size of /dev/shm in GiB (memory-backed); NCCL and data loaders "
                               "outgrow the container default of 64 MiB", ge=1)
    rdzv_port: int = setting(29500, "torchrun rendezvous port on pod 0")

    def __post_init__(self) -> None:
        if not _DNS_LABEL.fullmatch(self.namespace):
            raise ConfigError(f"namespace: {self.namespace!r} is not a Kubernetes name (lower-case "
                              "letters, digits and '-', at most 63)")
        if self.store_claim and not re.fullmatch(r"[a-z0-9]([-.a-z0-9]*[a-z0-9])?", self.store_claim):
            raise ConfigError(f"store_claim: {self.store_claim!r} is not a Kubernetes name")
        _check_port(self.rdzv_port)


def node_layout(cluster: Any) -> tuple[int, int]:
    """(nodes, worker processes per node). A world smaller than one node runs on one node."""
    world, per_node = cluster.world_size, cluster.gpus_per_node
    if world <= per_node:
        return 1, world
    return world // per_node, per_node


def check_launch(cluster: Any) -> None:
    """Cross-field checks of a ParallelSpec (called from its __post_init__); messages name fields
    relative to ``cluster`` (from_dict adds the prefix)."""
    world, per_node = cluster.world_size, cluster.gpus_per_node
    if world > per_node and world % per_node:
        rest = world // cluster.data_parallel
        dp_ok = next(d for d in range(cluster.data_parallel, cluster.data_parallel + per_node + 1)
                     if (rest * d) % per_node == 0)
        raise ConfigError(
            f"gpus_per_node: the world size {world} (tensor {cluster.tensor_parallel} x pipeline "
            f"{cluster.pipeline_parallel} x data {cluster.data_parallel} x context "
            f"{cluster.context_parallel}) is not a whole number of nodes of {per_node}; use e.g. "
            f"data_parallel={dp_ok}, or set gpus_per_node to the devices each node really gives")
    if cluster.launcher == "kubernetes":
        for name in ("image", "store_claim"):
            if not getattr(cluster.kubernetes, name):
                raise ConfigError(f"kubernetes.{name}: required with launcher=kubernetes (see "
                                  "conf/cluster/k8s.yaml)")
