"""What a model-producing stage makes, read from configs alone (for validation before compute).

A model stage is a ``pretrain``/``extend_context`` stage (``PretrainConfig``), a ``merge``, or a
post-training stage (``sft``, ``rl``: the model of its parent).
``model_of`` gives the ``ModelSpec`` a stage's checkpoint will have, ``context_length_of`` the
sequence length it was last trained at, ``tokenizer_of`` the tokenizer stage behind its data. A
merge takes the spec and length of its longest-context parent (the documented merge config).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from stages.schema import ConfigError, identity_dict
from stages.training.specs import ModelSpec

# Fields a context extension changes; every other field of two merged models must agree.
CONTEXT_FIELDS = ("rope_theta", "max_position_embeddings")


def is_model_stage(config: Any) -> bool:
    from stages.merge import MergeConfig
    from stages.planned import RlConfig, SftConfig
    from stages.pretrain import PretrainConfig
    return isinstance(config, (PretrainConfig, MergeConfig, SftConfig, RlConfig))


def _tuned_from(config: Any) -> str | None:
    """The parent of a post-training stage (sft, rl), which keeps its parent's model."""
    from stages.planned import RlConfig, SftConfig
    return config.from_ if isinstance(config, (SftConfig, RlConfig)) else None


def require_model_stage(name: str | None, configs: dict[str, Any], where: str) -> Any:
    if name not in configs:
        raise ConfigError(f"{where}: no stage named {name!r}; known stages: {', '.join(configs)}")
    if not is_model_stage(configs[name]):
        raise ConfigError(f"{where}: {name!r} is not a model stage "
                          "(pretrain, extend_context, merge, sft or rl); name one of those")
    return configs[name]


def trained_by(stage: str, configs: dict[str, Any]) -> str:
    """The training stage (pretrain / extend_context) whose model and length ``stage`` carries:
    itself, the longest-context parent of a merge, the parent of a post-training stage."""
    from stages.merge import MergeConfig
    config = configs[stage]
    if isinstance(config, MergeConfig):
        return max((trained_by(p, configs) for p in config.from_),
                   key=lambda t: configs[t].seq_length)  # max keeps the first on a tie
    if _tuned_from(config):
        return trained_by(config.from_, configs)
    return stage


def model_of(stage: str, configs: dict[str, Any]) -> ModelSpec:
    return configs[trained_by(stage, configs)].run_model


def context_length_of(stage: str, configs: dict[str, Any]) -> int:
    return configs[trained_by(stage, configs)].seq_length


def tokenizer_of(stage: str, configs: dict[str, Any]) -> str:
    """The train_tokenizer stage whose vocabulary a model stage's data used."""
    return configs[configs[trained_by(stage, configs)].data].tokenizer


def shape_differences(a: ModelSpec, b: ModelSpec) -> list[str]:
    """Identity fields (other than theta and max positions) on which two specs differ."""
    da, db = identity_dict(a), identity_dict(b)
    return [f"{k}: {da[k]} vs {db.get(k)}" for k in da
            if k not in CONTEXT_FIELDS and da[k] != db.get(k)]


def spec_of_artifact(inp: Any) -> ModelSpec:
    """The ``ModelSpec`` a finished model stage recorded in its artifact."""
    from stages.schema import from_dict
    return from_dict(ModelSpec, inp.artifact.extra["model"], f"stage {inp.name}: artifact.extra.model")


def with_context(spec: ModelSpec, seq_length: int, rope_theta: float) -> ModelSpec:
    return dataclasses.replace(spec, max_position_embeddings=seq_length, rope_theta=rope_theta)
