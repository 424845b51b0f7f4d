"""Schemas shared by the model-making stage kinds (no torch import here).

``ModelSpec`` is a Granite-shaped dense decoder (GQA, RoPE, SwiGLU, RMSNorm, tied embeddings);
``ScheduleSpec`` names one of the LR schedules of the recipe; ``PrecisionSpec`` chooses bf16/fp32
or an FP8 recipe (GPU only). The cluster and its launchers are ``stages/cluster.py``.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from stages.schema import ConfigError, configclass, param, setting


@configclass
class ModelSpec:
    name: str = setting("custom", "preset name, for display only")
    hidden_size: int = param(doc="model width", gt=0)
    num_layers: int = param(doc="transformer blocks", gt=0)
    num_attention_heads: int = param(doc="query heads", gt=0)
    num_query_groups: int = param(doc="KV heads (GQA groups)", gt=0)
    kv_channels: int = param(doc="head dimension", gt=0)
    ffn_hidden_size: int = param(doc="SwiGLU inner width", gt=0)
    vocab_size: int = param(doc="tokenizer vocabulary (padded for TP inside the model)", gt=0)
    max_position_embeddings: int = param(4096, "longest sequence the model is built for", gt=0)
    rope_theta: float = param(10000.0, "RoPE base", gt=0)
    layernorm_epsilon: float = param(1e-5, "RMSNorm epsilon", gt=0)
    tied_embeddings: bool = param(True, "share input and output embeddings")
    init_std: float = param(0.02, "weight init std", gt=0)
    # Granite's muP multipliers (what transformers' GraniteForCausalLM computes): token embeddings
    # times embedding_multiplier; each attention and MLP output times residual_multiplier before
    # it joins the residual stream; attention scores times attention_multiplier instead of
    # 1/sqrt(kv_channels); logits divided by logits_scaling. 1.0 and None: a plain decoder.
    embedding_multiplier: float = param(1.0, "Granite embedding multiplier", gt=0)
    residual_multiplier: float = param(1.0, "Granite residual multiplier", gt=0)
    logits_scaling: float = param(1.0, "Granite logits scaling (logits are divided by it)", gt=0)
    # Added after stages were run: keyed only when set, so every earlier stage key stays valid.
    attention_multiplier: float | None = param(
        None, "Granite attention score scale; None: 1/sqrt(kv_channels)", gt=0, keyed_if_set=True)

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"num_query_groups: {self.num_query_groups} does not divide "
                f"num_attention_heads={self.num_attention_heads}; pick a divisor")

    def num_parameters(self) -> int:
        """Parameter count (tied embeddings counted once, norms included)."""
        from stages.training.compute import Shape
        return Shape.of(self).params()


@configclass
class ScheduleSpec:
    """LR schedule of one phase. ``step`` counts optimizer steps inside the phase."""
    kind: Literal["power", "wsd", "exponential", "linear", "constant"] = param(doc="schedule")
    lr: float = param(doc="peak learning rate", gt=0)
    min_lr: float = param(0.0, "floor (wsd/exponential)")
    warmup_steps: int = param(0, "linear warm-up steps from 0", ge=0)
    # Power scheduler (IBM, Shen et al. 2024): lr = min(lr, a * tokens^b), tokens counted over all phases.
    power_a: float = param(4.0, "power: coefficient a")
    power_b: float = param(-0.51, "power: exponent b")
    decay_fraction: float = param(0.0, "power/wsd: final fraction of steps that decays to min_lr",
                                  ge=0.0, le=1.0)
    gamma: float = param(0.1, "exponential: lr ends at lr * gamma", gt=0.0, le=1.0)


FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")


@configclass
class PrecisionSpec:
    dtype: Literal["fp32", "bf16"] = param("fp32", "parameter/compute dtype")
    fp8: Literal["none", "delayed", "tensorwise", "blockwise", "mxfp8"] = param(
        "none", "FP8 recipe through Transformer Engine (GPU only)")


# Fields a context extension changes; every other field of two merged models must agree.
CONTEXT_FIELDS = ("rope_theta", "max_position_embeddings")


def shape_differences(a: ModelSpec, b: ModelSpec) -> list[str]:
    """Identity fields (other than theta and max positions) on which two specs differ."""
    from stages.schema import identity_dict
    # Both sides' keys: a field keyed only when set (attention_multiplier) is absent at its default.
    keys = {**identity_dict(a), **identity_dict(b)}
    return [f"{k}: {getattr(a, k)} vs {getattr(b, k)}" for k in keys
            if k not in CONTEXT_FIELDS and getattr(a, k) != getattr(b, k)]


def with_context(spec: ModelSpec, seq_length: int, rope_theta: float) -> ModelSpec:
    return dataclasses.replace(spec, max_position_embeddings=seq_length, rope_theta=rope_theta)


def spec_of_artifact(inp) -> ModelSpec:
    """The ``ModelSpec`` a finished model stage recorded in its artifact (``extra.model``)."""
    from stages.schema import from_dict
    return from_dict(ModelSpec, inp.artifact.extra["model"], f"stage {inp.name}: artifact.extra.model")


def check_source_choice(spec, embedded: str, made: str, builders: str = "json, parquet") -> None:
    """What every data source (prepare_data's, curate's chats, RL prompts) checks alike: exactly
    one of ``generator`` (the embedded ``embedded``) and ``builder`` (a datasets builder of
    ``builders`` or a hub id, with ``data_files``); ``made``: what a generator makes."""
    if (spec.generator is None) == (spec.builder is None):
        raise ConfigError(f"give exactly one of `generator` ({embedded}) or `builder` "
                          "(a datasets builder with data_files)")
    if spec.builder is not None and not spec.builder.strip():
        raise ConfigError(f"builder: is empty; name a datasets builder ({builders}) or a hub "
                          "dataset (org/name)")
    if spec.generator is not None and spec.data_files:
        raise ConfigError(f"data_files: are read by a `builder`; a generator makes its own "
                          f"{made} (drop data_files, or use builder: json/parquet)")
