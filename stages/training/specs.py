"""Light-weight schemas shared by the training stage kinds (no torch import here).

``ModelSpec`` is a Granite-shaped dense decoder (GQA, RoPE, SwiGLU, RMSNorm, tied embeddings);
``ParallelSpec`` comes from the cluster config; ``ScheduleSpec`` names one of the LR schedules of
the recipe; ``PrecisionSpec`` chooses bf16/fp32 or an FP8 recipe (GPU only).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from stages.schema import ConfigError, param, setting
from stages.training.launch_spec import KubernetesSpec, SlurmSpec, check_launch


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    name: str = setting("custom", "preset name, for display only")
    hidden_size: int = param(doc="model width")
    num_layers: int = param(doc="transformer blocks")
    num_attention_heads: int = param(doc="query heads")
    num_query_groups: int = param(doc="KV heads (GQA groups)")
    kv_channels: int = param(doc="head dimension")
    ffn_hidden_size: int = param(doc="SwiGLU inner width")
    vocab_size: int = param(doc="tokenizer vocabulary (padded for TP inside the model)")
    max_position_embeddings: int = param(4096, "longest sequence the model is built for")
    rope_theta: float = param(10000.0, "RoPE base")
    layernorm_epsilon: float = param(1e-5, "RMSNorm epsilon")
    tied_embeddings: bool = param(True, "share input and output embeddings")
    init_std: float = param(0.02, "weight init std")
    # Granite's scaling multipliers; 1.0 each means a plain decoder (what Megatron computes).
    embedding_multiplier: float = param(1.0, "Granite embedding multiplier")
    residual_multiplier: float = param(1.0, "Granite residual multiplier")
    logits_scaling: float = param(1.0, "Granite logits scaling")

    def __post_init__(self) -> None:
        for f in ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
                  "kv_channels", "ffn_hidden_size", "vocab_size", "max_position_embeddings"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"{f}: must be positive, got {getattr(self, f)}")
        for f in ("rope_theta", "layernorm_epsilon", "init_std"):
            if not getattr(self, f) > 0:
                raise ConfigError(f"{f}: must be > 0, got {getattr(self, f)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"num_query_groups: {self.num_query_groups} does not divide "
                f"num_attention_heads={self.num_attention_heads}; pick a divisor")
        if (self.embedding_multiplier, self.residual_multiplier, self.logits_scaling) != (1.0, 1.0, 1.0):
            raise ConfigError("embedding_multiplier: only 1.0 "
                              "is supported by the Megatron-core model (a plain decoder); set them to 1.0")

    def num_parameters(self) -> int:
        """Parameter count (tied embeddings counted once, norms included)."""
        from stages.training.compute import Shape
        return Shape.of(self).params()


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelSpec:
    tensor_parallel: int = setting(1, "TP size (does not change the math, only the layout)")
    pipeline_parallel: int = setting(1, "PP size")
    data_parallel: int = setting(1, "DP size")
    context_parallel: int = setting(1, "CP size")
    device: Literal["cpu", "cuda"] = setting("cpu", "cpu trains through gloo, cuda through NCCL")
    # Where workers run (stages/training/launch_spec.py); `forge launch-command` prints it.
    launcher: Literal["torchrun", "slurm", "kubernetes"] = setting(
        "torchrun", "torchrun on this machine, slurm (salloc + srun, torchrun per node) or "
                    "kubernetes (an Indexed Job of the worker image)")
    slurm: SlurmSpec = setting(SlurmSpec(), "launcher=slurm: partition, account, time, image")
    kubernetes: KubernetesSpec = setting(KubernetesSpec(), "launcher=kubernetes: namespace, "
                                                           "image, store claim")
    threads_per_worker: int = setting(1, "OMP threads per worker process")
    # What `forge plan` needs to estimate time and memory (stages/training/compute.py).
    accelerator: str = setting("cpu", "device type: cpu, a100, h100, h200 or b200 (sets memory "
                                      "and peak FLOP/s for the compute plan)")
    gpus_per_node: int = setting(8, "devices (CPU: worker processes) per node")
    memory_gib: float = setting(0.0, "memory per device in GiB; 0 = the accelerator's")
    mfu: float = setting(0.4, "model FLOPs utilisation assumed for GPU-hour estimates")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.data_parallel * self.context_parallel

    def __post_init__(self) -> None:
        for f in ("tensor_parallel", "pipeline_parallel", "data_parallel", "context_parallel",
                  "threads_per_worker", "gpus_per_node"):
            if getattr(self, f) < 1:
                raise ConfigError(f"{f}: must be >= 1, got {getattr(self, f)}")
        from stages.training.compute import ACCELERATORS
        if self.accelerator not in ACCELERATORS:
            raise ConfigError(f"accelerator: unknown {self.accelerator!r}; known: "
                              f"{', '.join(ACCELERATORS)} (or set memory_gib and pick the closest)")
        if (self.accelerator == "cpu") != (self.device == "cpu"):
            raise ConfigError(f"accelerator: {self.accelerator!r} does not match device "
                              f"{self.device!r}; use accelerator=cpu with device=cpu, a GPU type "
                              "with device=cuda")
        if not 0.0 < self.mfu <= 1.0:
            raise ConfigError(f"mfu: must be in (0, 1], got {self.mfu}")
        if self.memory_gib < 0:
            raise ConfigError(f"memory_gib: must be >= 0, got {self.memory_gib}")
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

    def not_built(self) -> str:
        """Layouts that validate and plan, but that the training loop cannot run yet."""
        if self.pipeline_parallel > 1:
            return ("pipeline parallelism (pipeline_parallel > 1) is not built into the training "
                    "loop yet; it plans, but cannot run")
        if self.context_parallel > 1:
            return ("context parallelism (context_parallel > 1) is not built into the training loop "
                    "yet (it needs ring attention, tested on a GPU); it plans, but cannot run")
        return ""


LAYOUT_FIELDS = ("tensor_parallel", "pipeline_parallel", "context_parallel", "data_parallel")


def stage_cluster(cluster: ParallelSpec, parallel: dict[str, int]) -> ParallelSpec:
    """The cluster layout with a stage's own ``parallel`` overrides applied."""
    return dataclasses.replace(cluster, **parallel) if parallel else cluster


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduleSpec:
    """LR schedule of one phase. ``step`` counts optimizer steps inside the phase."""
    kind: Literal["power", "wsd", "exponential", "linear", "constant"] = param(doc="schedule")
    lr: float = param(doc="peak learning rate")
    min_lr: float = param(0.0, "floor (wsd/exponential)")
    warmup_steps: int = param(0, "linear warm-up steps from 0")
    # Power scheduler (IBM, Shen et al. 2024): lr = min(lr, a * tokens^b), tokens counted over all phases.
    power_a: float = param(4.0, "power: coefficient a")
    power_b: float = param(-0.51, "power: exponent b")
    decay_fraction: float = param(0.0, "power/wsd: final fraction of steps that decays to min_lr")
    gamma: float = param(0.1, "exponential: lr ends at lr * gamma")

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError(f"decay_fraction: must be in [0, 1], got {self.decay_fraction}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0.0 < self.gamma <= 1.0:
            raise ConfigError(f"gamma: must be in (0, 1], got {self.gamma}")


FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrecisionSpec:
    dtype: Literal["fp32", "bf16"] = param("fp32", "parameter/compute dtype")
    fp8: Literal["none", "delayed", "tensorwise", "blockwise", "mxfp8"] = param(
        "none", "FP8 recipe through Transformer Engine (GPU only)")
