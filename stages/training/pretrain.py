"""`pretrain` stage kind: one pretraining phase on Megatron-core.

A phase trains ``tokens`` tokens on a weighted blend of the tokenized sources (``mixture``) with its
own LR schedule. With ``from`` it continues from the parent phase's final checkpoint, weights and
optimizer state both; without it the model starts from a seeded random init. Checkpoints go to
``<out_dir>/checkpoints/iter_XXXXXXX`` every ``checkpoint_interval`` steps and at the end; a rerun
of an unfinished phase resumes from the newest complete one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from stages.base import Artifact, RunContext, StageGraph, StageInput
from stages.cluster import check_stage_parallel, check_training_layout
from stages.schema import ConfigError, configclass, identity_dict, param, setting
from stages.specs import ModelSpec, PrecisionSpec, ScheduleSpec, shape_differences
from stages.training.kind import TrainingKind
from stages.training.precision import check_precision


@configclass
class PretrainConfig:
    from_: str | None = param(None, "parent pretrain stage to continue from (weights + optimizer)")
    data: str = param(doc="the `tokenize` stage whose sources this phase blends")
    model: ModelSpec = param(doc="model shape (the `model` config group)")
    tokens: int = param(doc="tokens trained in this phase", gt=0)
    seq_length: int = param(doc="tokens per sequence")
    global_batch_size: int = param(doc="sequences per optimizer step (all data-parallel ranks)",
                                   gt=0)
    mixture: dict[str, float] = param(doc="source name -> weight (normalised)")
    loss_weights: dict[str, float] = param(
        factory=dict, doc="source name -> weight of its loss tokens in the token-mean loss "
                          "(default 1); weigh up completion-only sources, whose few loss tokens "
                          "per sample would otherwise drown")
    schedule: ScheduleSpec = param(doc="LR schedule of this phase")
    precision: PrecisionSpec = param(factory=PrecisionSpec, doc="dtype / FP8 recipe")
    weight_decay: float = param(0.1, "AdamW weight decay (0 turns it off)", ge=0)
    adam_beta1: float = param(0.9, "AdamW beta1", ge=0.0, lt=1.0)
    adam_beta2: float = param(0.95, "AdamW beta2", ge=0.0, lt=1.0)
    adam_eps: float = param(1e-8, "AdamW epsilon", gt=0)
    grad_clip: float = param(1.0, "gradient-norm clip (0 turns it off)", ge=0)
    seed: int = param(1234, "init / data-order seed")
    micro_batch_size: int = setting(0, "sequences per forward pass per rank (0 = the whole local "
                                       "batch)", ge=0)
    parallel: dict[str, int | bool | str] = setting(
        factory=dict, doc="this stage's own layout over the cluster's: tensor_parallel, "
                          "pipeline_parallel, context_parallel, data_parallel, "
                          "distributed_optimizer, recompute (e.g. a 512K-token extension needs "
                          "more model parallelism than a 4K phase)")
    checkpoint_interval: int = setting(50, "save every N steps (and always at the end)", ge=0)
    keep_checkpoints: int = setting(2, "newest checkpoints kept while training", ge=1)
    log_interval: int = setting(10, "print progress every N steps", ge=1)

    carries_optimizer: ClassVar[bool] = True  # a phase continues its parent's AdamW moments
    document_mask: ClassVar[bool] = False     # pretraining attends across packed documents

    @property
    def run_model(self) -> ModelSpec:
        """The model this stage trains (an extension raises theta and max positions)."""
        return self.model

    def __post_init__(self) -> None:
        if self.seq_length <= 0 or self.seq_length > self.run_model.max_position_embeddings:
            raise ConfigError(f"seq_length: {self.seq_length} must be in 1..model.max_position_embeddings "
                              f"({self.run_model.max_position_embeddings})")
        if not self.mixture:
            raise ConfigError("mixture: is empty; give at least one source with a positive weight, "
                              "e.g. mixture: {web: 1.0}")
        for src, w in self.mixture.items():
            if w < 0:
                raise ConfigError(f"mixture.{src}: weight {w} is negative; weights must be >= 0")
        if sum(self.mixture.values()) <= 0:
            raise ConfigError("mixture: all weights are zero; give at least one positive weight")
        for src, w in self.loss_weights.items():  # a source the mixture leaves out: inert
            if not w > 0:
                raise ConfigError(f"loss_weights.{src}: weight {w} must be > 0 (leave a source "
                                  "out of the mixture to drop it)")
        if self.steps < 1:
            raise ConfigError(f"tokens: {self.tokens} is less than one step "
                              f"({self.global_batch_size} x {self.seq_length} tokens)")
        check_stage_parallel(self.parallel)

    @property
    def steps(self) -> int:
        return self.tokens // (self.global_batch_size * self.seq_length)


class Pretrain(TrainingKind):
    name = "pretrain"
    Config = PretrainConfig
    parent_fields = ("from_", "data")

    @classmethod
    def check(cls, config: PretrainConfig, stage: str, graph: StageGraph, cluster: Any) -> None:
        tok = graph.require(config.data, f"stages.{stage}.data", "tokenize")
        known = sorted(graph[tok.data].sources)
        for field, sources in (("mixture", config.mixture), ("loss_weights", config.loss_weights)):
            for src in sources:
                if src not in known:
                    raise ConfigError(f"stages.{stage}.{field}.{src}: no such source in stage "
                                      f"{tok.data!r}; known sources: {', '.join(known)}")
        if config.from_ is not None:
            parent = graph.require(config.from_, f"stages.{stage}.from", "pretrain")
            if identity_dict(parent.model) != identity_dict(config.model):
                diff = "; ".join(shape_differences(config.model, parent.model)) or "rope/positions"
                raise ConfigError(f"stages.{stage}.model: differs from the model of parent "
                                  f"{config.from_!r} ({diff}); a phase continues the same model shape")
        vocab = graph[tok.tokenizer].vocab_size
        if vocab > config.model.vocab_size:
            raise ConfigError(f"stages.{stage}.model.vocab_size: {config.model.vocab_size} is smaller "
                              f"than stage {tok.tokenizer!r}'s vocab_size ({vocab}); raise it")
        check_training_layout(cls.layout(config, cluster), config.model, config.seq_length,
                              config.global_batch_size, config.micro_batch_size, f"stages.{stage}",
                              f"stages.{stage}.model")
        check_precision(config.precision, cluster, f"stages.{stage}.precision")

    @classmethod
    def tokens(cls, config: PretrainConfig) -> int:
        return config.tokens

    @classmethod
    def compute_plan(cls, stage: str, config: PretrainConfig, cluster: Any) -> Any:
        from stages.training.compute import plan_training_stage
        return plan_training_stage(stage, config, cls.layout(config, cluster))

    @classmethod
    def trained_model(cls, config: PretrainConfig) -> ModelSpec:
        return config.run_model

    @classmethod
    def context_length(cls, config: PretrainConfig) -> int:
        return config.seq_length

    @classmethod
    def tokenizer(cls, config: PretrainConfig, graph: StageGraph) -> str | None:
        return graph.tokenizer_of(config.data)

    @classmethod
    def datasets_read(cls, config: PretrainConfig, artifact: Artifact,
                      upstream: dict[str, Artifact]) -> list[dict]:
        """The token files of the sources its mixture blends (train split)."""
        data = upstream.get(config.data)
        return [] if data is None else [
            dict(d, stage=config.data) for d in data.datasets
            if d["name"] in config.mixture and d.get("split", "train") == "train"]

    @classmethod
    def run(cls, config: PretrainConfig, inputs: dict[str, StageInput], out_dir: Path,
            ctx: RunContext) -> Artifact:
        from stages.training.loop import train_phase  # heavy: torch + megatron
        return train_phase(config, inputs, out_dir, ctx)
