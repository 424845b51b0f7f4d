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

    def __post_init__(self) -> None:
        if self.target_samples < 1:
            raise ConfigError(f"target_samples: must be >= 1, got {self.target_samples}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SftConfig:
    from_: str = param(doc="model stage to fine-tune")
    data: str = param(doc="curate stage")
    epochs: int = param(1, "passes over the curated data")
    seq_length: int = param(doc="tokens per packed sequence")
    global_batch_size: int = param(doc="sequences per step")
    schedule: ScheduleSpec = param(doc="LR schedule")

    def __post_init__(self) -> None:
        for f in ("epochs", "seq_length", "global_batch_size"):
            if getattr(self, f) < 1:
                raise ConfigError(f"{f}: must be >= 1, got {getattr(self, f)}")


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
        for f in ("eps_low", "eps_high"):
            if not 0 < getattr(self, f) < 1:
                raise ConfigError(f"{f}: must be in (0, 1), got {getattr(self, f)}")
        for f in ("prompts_per_step", "steps", "max_new_tokens"):
            if getattr(self, f) < 1:
                raise ConfigError(f"{f}: must be >= 1, got {getattr(self, f)}")
        if self.overlong_buffer < 0:
            raise ConfigError(f"overlong_buffer: must be >= 0, got {self.overlong_buffer}")
        if self.group_size < 2:
            raise ConfigError(f"group_size: GRPO needs >= 2 completions per prompt, got {self.group_size}")


def _check_curate(config: CurateConfig, stage: str, configs: dict[str, Any]) -> None:
    from stages.data_kinds import PrepareDataConfig
    from stages.model_stages import require_model_stage
    if not isinstance(configs[config.data], PrepareDataConfig):
        raise ConfigError(f"stages.{stage}.data: {config.data!r} is not a prepare_data stage")
    if config.judge is not None:
        require_model_stage(config.judge, configs, f"stages.{stage}.judge")


def _check_sft(config: SftConfig, stage: str, configs: dict[str, Any]) -> None:
    from stages.model_stages import require_model_stage
    require_model_stage(config.from_, configs, f"stages.{stage}.from")
    if not isinstance(configs[config.data], CurateConfig):
        raise ConfigError(f"stages.{stage}.data: {config.data!r} is not a curate stage")


def _check_rl(config: RlConfig, stage: str, configs: dict[str, Any]) -> None:
    from stages.model_stages import require_model_stage
    require_model_stage(config.from_, configs, f"stages.{stage}.from")


def _planned(kind: str, cfg: type, parents: tuple[str, ...], reason: str, launcher: str = "python",
             tokens_field: str | None = None, check: Any = None) -> type[StageKind]:
    def tokens(cls: Any, config: Any) -> int:
        return int(getattr(config, tokens_field)) if tokens_field else 0

    def check_refs(cls: Any, config: Any, stage: str, configs: dict[str, Any], cluster: Any) -> None:
        if check is not None:  # parents of the right kinds: a wrong one fails here, not at run time
            check(config, stage, configs)
    return type(kind.title().replace("_", ""), (StageKind,), {
        "name": kind, "Config": cfg, "parent_fields": parents, "launcher": launcher,
        "built": False, "not_built_reason": reason, "tokens": classmethod(tokens),
        "check": classmethod(check_refs), "__doc__": f"`{kind}` stage kind: {reason}."})


PLANNED_KINDS = (
    _planned("curate", CurateConfig, ("data", "judge"), ISSUE_POST_TRAINING, check=_check_curate),
    _planned("sft", SftConfig, ("from_", "data"), ISSUE_POST_TRAINING, "torchrun", check=_check_sft),
    _planned("rl", RlConfig, ("from_",), ISSUE_POST_TRAINING, "torchrun", check=_check_rl),
)
