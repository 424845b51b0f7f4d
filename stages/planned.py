"""Kinds of the recipe that later issues build. Their configs validate and plan today; running one
stops at validation with the issue that builds it (``StageKind.built = False``).

When a kind is built it moves into a module of its own and leaves this file.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from stages.base import StageKind
from stages.schema import ConfigError, param, setting
from stages.training.specs import ModelSpec, ScheduleSpec

ISSUE_LONG_CONTEXT = "built by issue 3 (context extension, merges, evaluation)"
ISSUE_POST_TRAINING = "not built yet: SFT, curation and RL come after issue 3 (no issue filed yet)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExtendContextConfig:
    from_: str = param(doc="model stage to extend (a pretrain, merge or extend_context stage)")
    data: str = param(doc="the tokenize stage")
    model: ModelSpec = param(doc="model shape")
    seq_length: int = param(doc="new context length")
    rope_theta: float = param(doc="raised RoPE base for the new length")
    tokens: int = param(doc="tokens trained at the new length")
    global_batch_size: int = param(doc="sequences per optimizer step")
    mixture: dict[str, float] = param(doc="long-document and short-context sources -> weight")
    schedule: ScheduleSpec = param(doc="LR schedule")
    log_interval: int = setting(10, "print progress every N steps")

    def __post_init__(self) -> None:
        if self.seq_length <= 0 or self.tokens <= 0 or self.rope_theta <= 0:
            raise ConfigError("seq_length, tokens and rope_theta must be > 0")
        if not self.mixture or any(w < 0 for w in self.mixture.values()):
            raise ConfigError("mixture: must be non-empty with weights >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MergeConfig:
    from_: tuple[str, ...] = param(doc="two or more model stages to merge")
    method: Literal["linear", "slerp", "ties", "task_arithmetic"] = param("linear", "mergekit method")
    weights: tuple[float, ...] = param((), "one weight per parent (default: equal)")
    base: str | None = param(None, "base model stage (ties / task_arithmetic)")

    def __post_init__(self) -> None:
        if len(self.from_) < 2:
            raise ConfigError(f"from: a merge needs two or more parents, got {list(self.from_)}")
        if self.weights and len(self.weights) != len(self.from_):
            raise ConfigError(f"weights: {len(self.weights)} weights for {len(self.from_)} parents")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    from_: str = param(doc="model stage to evaluate")
    data: str = param(doc="the tokenize stage (held-out split)")
    lengths: tuple[int, ...] = param((), "context lengths for needle-in-a-haystack retrieval")
    samples: int = param(64, "retrieval samples per length and depth")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CurateConfig:
    data: str = param(doc="prepare_data stage with the instruction/chat sources")
    rules: tuple[str, ...] = param(("min_length", "dedup", "language"), "rule-based filters")
    judge: str | None = param(None, "LLM-as-judge model stage (vLLM on GPU)")
    target_samples: int = param(doc="samples to keep")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SftConfig:
    from_: str = param(doc="model stage to fine-tune")
    data: str = param(doc="curate stage")
    epochs: int = param(1, "passes over the curated data")
    seq_length: int = param(doc="tokens per packed sequence")
    global_batch_size: int = param(doc="sequences per step")
    schedule: ScheduleSpec = param(doc="LR schedule")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RlConfig:
    """On-policy GRPO with the DAPO loss: decoupled clip (eps_low, eps_high), token-level loss,
    dynamic sampling of groups whose rewards are not all equal, overlong shaping, no KL."""
    from_: str = param(doc="policy model stage")
    task: Literal["math", "code", "instruction_following", "chat"] = param(doc="reward domain")
    group_size: int = param(8, "completions per prompt (G)")
    prompts_per_step: int = param(16, "groups per rollout batch")
    steps: int = param(doc="policy updates")
    eps_low: float = param(0.2, "DAPO lower clip")
    eps_high: float = param(0.28, "DAPO upper clip (clip-higher)")
    max_new_tokens: int = param(256, "rollout length cap")
    overlong_buffer: int = param(32, "soft overlong-penalty window (tokens)")
    schedule: ScheduleSpec = param(doc="LR schedule")

    def __post_init__(self) -> None:
        if not 0 < self.eps_low < 1 or not 0 < self.eps_high < 1:
            raise ConfigError("eps_low/eps_high: must be in (0, 1)")
        if self.group_size < 2:
            raise ConfigError(f"group_size: GRPO needs >= 2 completions per prompt, got {self.group_size}")


def _planned(kind: str, cfg: type, parents: tuple[str, ...], reason: str, launcher: str = "python",
             tokens_field: str | None = None) -> type[StageKind]:
    def tokens(cls: Any, config: Any) -> int:
        return int(getattr(config, tokens_field)) if tokens_field else 0
    return type(kind.title().replace("_", ""), (StageKind,), {
        "name": kind, "Config": cfg, "parent_fields": parents, "launcher": launcher,
        "built": False, "not_built_reason": reason, "tokens": classmethod(tokens),
        "__doc__": f"`{kind}` stage kind: {reason}."})


PLANNED_KINDS = (
    _planned("extend_context", ExtendContextConfig, ("from_", "data"), ISSUE_LONG_CONTEXT, "torchrun",
             "tokens"),
    _planned("merge", MergeConfig, ("from_", "base"), ISSUE_LONG_CONTEXT),
    _planned("evaluate", EvaluateConfig, ("from_", "data"), ISSUE_LONG_CONTEXT),
    _planned("curate", CurateConfig, ("data", "judge"), ISSUE_POST_TRAINING),
    _planned("sft", SftConfig, ("from_", "data"), ISSUE_POST_TRAINING, "torchrun"),
    _planned("rl", RlConfig, ("from_",), ISSUE_POST_TRAINING, "torchrun"),
)
