"""Kinds of the recipe that later issues build. Their configs validate and plan today; running one
stops at validation with the issue that builds it (``StageKind.built = False``).

When a kind is built it moves into a module of its own and leaves this file.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from stages.base import StageKind
from stages.schema import ConfigError, param
from stages.training.specs import ScheduleSpec

ISSUE_POST_TRAINING = "not built yet: SFT, curation and RL come after issue 3 (no issue filed yet)"


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
    _planned("curate", CurateConfig, ("data", "judge"), ISSUE_POST_TRAINING),
    _planned("sft", SftConfig, ("from_", "data"), ISSUE_POST_TRAINING, "torchrun"),
    _planned("rl", RlConfig, ("from_",), ISSUE_POST_TRAINING, "torchrun"),
)
