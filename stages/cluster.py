"""The cluster a stage runs on: its parallel layout, device and launcher (``ParallelSpec``).

Every kind gets the cluster of the pipeline (the ``cluster`` config group), with the stage's own
layout over it (``StageKind.layout``). Every field is a setting: moving a pipeline to another
cluster never changes a stage's key. Where the workers run (torchrun, Slurm, Kubernetes) is
``stages/launch_spec.py``; the commands are built in ``flows/launchers.py``. No torch import here.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Literal

from stages.launch_spec import KubernetesSpec, SlurmSpec, check_launch
from stages.schema import ConfigError, configclass, setting
from stages.specs import ModelSpec


@configclass
class ParallelSpec:
    tensor_parallel: int = setting(1, "TP size (does not change the math, only the layout)", ge=1)
    pipeline_parallel: int = setting(1, "PP size", ge=1)
    data_parallel: int = setting(1, "DP size", ge=1)
    context_parallel: int = setting(1, "CP size", ge=1)
    device: Literal["cpu", "cuda"] = setting("cpu", "cpu trains through gloo, cuda through NCCL")
    # Where workers run (stages/launch_spec.py); `forge launch-command` prints it.
    launcher: Literal["torchrun", "slurm", "kubernetes"] = setting(
        "torchrun", "torchrun on this machine, slurm (a batch job: sbatch + srun, torchrun per node) or "
                    "kubernetes (an Indexed Job of the worker image)")
    slurm: SlurmSpec = setting(SlurmSpec(), "launcher=slurm: partition, account, time, image")
    kubernetes: KubernetesSpec = setting(KubernetesSpec(), "launcher=kubernetes: namespace, "
                                                           "image, store claim")
    threads_per_worker: int = setting(1, "OMP threads per worker process", ge=1)
    # How much of one run goes at once (flows/scheduler.py): every stage whose parents are complete
    # starts while both limits allow. Settings: how many stages run beside each other never
    # changes what any of them computes.
    max_parallel_stages: int = setting(
        1, "stages of one run that may run at the same time (1: one after another); a stage "
           "starts once its parents are complete", ge=1)
    max_parallel_devices: int = setting(
        0, "devices the stages running at the same time may take together (a training stage takes "
           "its layout's world size, any other kind 1); 0 = the launcher's default: torchrun -> "
           "this machine's devices (gpus_per_node; on CPU its cores / threads_per_worker), slurm "
           "and kubernetes -> no limit here (each stage gets an allocation of its own; the "
           "cluster's scheduler queues what does not fit). A stage larger than the budget still "
           "runs, alone", ge=0)
    # What `forge plan` needs to estimate time and memory (stages/training/compute.py).
    accelerator: str = setting("cpu", "device type: cpu, a100, h100, h200 or b200 (sets memory "
                                      "and peak FLOP/s for the compute plan)")
    gpus_per_node: int = setting(8, "devices (CPU: worker processes) per node", ge=1)
    memory_gib: float = setting(0.0, "memory per device in GiB; 0 = the accelerator's", ge=0)
    mfu: float = setting(0.4, "model FLOPs utilisation assumed for GPU-hour estimates", gt=0.0,
                         le=1.0)
    # Memory savers that never change the math (so settings, like the layout): a stage's
    # `parallel:` may override them. GPU only: Megatron's implementations need CUDA (check_device).
    distributed_optimizer: bool = setting(
        False, "shard the optimizer state (the Adam moments, and the fp32 master weights where "
               "the weights are bf16) over the data-parallel x context-parallel ranks (Megatron's "
               "distributed optimizer; GPU only)")
    recompute: Literal["none", "selective", "full"] = setting(
        "none", "activation recompute: none, selective (the attention core; nothing to save "
                "with flash attention) or full (keep each layer's input, rerun the layer in "
                "backward: ~1/3 more layer FLOPs); GPU only")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.data_parallel * self.context_parallel

    @property
    def device_budget(self) -> int | None:
        """Devices the stages running at once may take together; None: no limit here. The
        default (``max_parallel_devices: 0``) is this machine's under torchrun (its GPUs, or on
        CPU its cores / threads_per_worker) and none under Slurm or Kubernetes."""
        if self.max_parallel_devices:
            return self.max_parallel_devices
        if self.launcher != "torchrun":
            return None
        if self.device == "cpu":
            return max(1, (os.cpu_count() or 1) // self.threads_per_worker)
        return self.gpus_per_node

    def __post_init__(self) -> None:
        from stages.training.compute import ACCELERATORS
        if self.accelerator not in ACCELERATORS:
            raise ConfigError(f"accelerator: unknown {self.accelerator!r}; known: "
                              f"{', '.join(ACCELERATORS)} (or set memory_gib and pick the closest)")
        if (self.accelerator == "cpu") != (self.device == "cpu"):
            raise ConfigError(f"accelerator: {self.accelerator!r} does not match device "
                              f"{self.device!r}; use accelerator=cpu with device=cpu, a GPU type "
                              "with device=cuda")
        check_launch(self)  # whole nodes; what the chosen launcher needs

    def check_model(self, model: ModelSpec, where: str) -> None:
        tp = self.tensor_parallel
        if model.num_attention_heads % tp or model.num_query_groups % tp:
            ok = [d for d in range(1, model.num_query_groups + 1)
                  if model.num_query_groups % d == 0 and model.num_attention_heads % d == 0]
            raise ConfigError(
                f"cluster.tensor_parallel: {tp} does not divide {where} heads "
                f"({model.num_attention_heads} query / {model.num_query_groups} KV); "
                f"use one of {ok}")
        if model.num_layers % self.pipeline_parallel:
            raise ConfigError(f"cluster.pipeline_parallel: {self.pipeline_parallel} does not divide "
                              f"{where} num_layers={model.num_layers}")

    def check_context(self, seq_length: int, where: str) -> None:
        """Context parallelism splits each sequence into 2 x CP chunks (load-balanced causal)."""
        cp = self.context_parallel
        if cp == 1:
            return
        if seq_length % (2 * cp):
            ok = [c for c in range(1, seq_length // 2 + 1) if seq_length % (2 * c) == 0][:8]
            raise ConfigError(f"cluster.context_parallel: {where}.seq_length={seq_length} is not "
                              f"divisible by 2 x context_parallel = {2 * cp}; use a context_parallel "
                              f"in {ok} or change the length")
        if self.device == "cpu":
            raise ConfigError("cluster.context_parallel: context parallelism needs Transformer "
                              "Engine's ring attention on GPUs; on CPU set cluster.context_parallel=1")

    def check_device(self, where: str) -> None:
        """The memory savers run on GPUs only: Megatron's distributed optimizer allocates on CUDA
        and its recompute saves the CUDA RNG state, so on CPU they are refused, not ignored (a
        plan that counted on them would promise memory the CPU run does not save)."""
        if self.device == "cuda":
            return
        if self.distributed_optimizer:
            raise ConfigError(f"{where}: distributed_optimizer=true needs Megatron's distributed "
                              "optimizer, which runs on GPUs only (device=cuda); on CPU set "
                              f"cluster.distributed_optimizer=false (or {where}.parallel."
                              "distributed_optimizer=false): the CPU loop keeps torch AdamW")
        if self.recompute != "none":
            raise ConfigError(f"{where}: recompute={self.recompute!r} needs Megatron's activation "
                              "recompute, which runs on GPUs only (device=cuda); on CPU set "
                              f"cluster.recompute=none (or {where}.parallel.recompute=none)")

    def not_built(self) -> str:
        """Layouts that validate and plan, but that the training loop cannot run yet (pipeline
        parallelism runs: Megatron's 1F1B schedule, stages/training/step.py)."""
        if self.context_parallel > 1:
            return ("context parallelism (context_parallel > 1) is wired into the training loop "
                    "for GPUs (Transformer Engine's ring attention) but has not passed its GPU test "
                    "yet (tests/gpu/test_context_parallel.py, 2+ GPUs); it plans, but cannot run")
        return ""


LAYOUT_FIELDS = ("tensor_parallel", "pipeline_parallel", "context_parallel", "data_parallel")
# What else a stage's `parallel:` may set, and the values it takes.
LAYOUT_SETTINGS = {"distributed_optimizer": (True, False), "recompute": ("none", "selective", "full")}


def check_stage_parallel(parallel: dict) -> None:
    """A stage's ``parallel`` overrides: sizes are integers >= 1, the memory savers take their
    values (ConfigError naming ``parallel.<key>``; the stage's path is put in front)."""
    known = ", ".join((*LAYOUT_FIELDS, *LAYOUT_SETTINGS))
    for key, value in parallel.items():
        if key in LAYOUT_SETTINGS:
            ok = LAYOUT_SETTINGS[key]
            if isinstance(value, bool) != isinstance(ok[0], bool) or value not in ok:
                raise ConfigError(f"parallel.{key}: must be one of "
                                  f"{', '.join(str(o).lower() for o in ok)}, got {value!r}")
        elif key not in LAYOUT_FIELDS:
            raise ConfigError(f"parallel.{key}: unknown; a stage may set {known}")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"parallel.{key}: must be an integer >= 1, got {value!r}")


def stage_cluster(cluster: ParallelSpec, parallel: dict) -> ParallelSpec:
    """The cluster layout with a stage's own ``parallel`` overrides applied."""
    return dataclasses.replace(cluster, **parallel) if parallel else cluster


def check_batch_split(global_batch_size: int, micro_batch_size: int, data_parallel: int,
                      where: str) -> None:
    """The global batch splits evenly over the data-parallel ranks, and each rank's share into
    micro-batches (0: the whole share in one)."""
    gbs, dp, mbs = global_batch_size, data_parallel, micro_batch_size
    if gbs % dp:
        raise ConfigError(f"{where}.global_batch_size: {gbs} is not divisible by "
                          f"data_parallel={dp}")
    if mbs and (gbs // dp) % mbs:
        raise ConfigError(f"{where}.micro_batch_size: {mbs} does not divide the batch per "
                          f"data-parallel rank ({gbs} / {dp} = {gbs // dp})")


def check_training_layout(layout: "ParallelSpec", model: ModelSpec, seq_length: int,
                          global_batch_size: int, micro_batch_size: int, where: str,
                          model_where: str) -> None:
    """A training stage's layout fits its model, its length, its devices and its batch."""
    layout.check_model(model, model_where)
    layout.check_context(seq_length, where)
    layout.check_device(where)
    check_batch_split(global_batch_size, micro_batch_size, layout.data_parallel, where)
