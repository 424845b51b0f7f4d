"""`rl` stage kind: on-policy GRPO with the DAPO loss (issue 12).

Validates and plans today; running it stops at validation, naming the issue that builds it.
The model it makes is its parent's (``model_source``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from stages.base import StageGraph, StageKind
from stages.schema import ConfigError, param
from stages.specs import ScheduleSpec

NOT_BUILT = "is not built yet: RL (GRPO with the DAPO loss) is issue 12"


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


class Rl(StageKind):
    name = "rl"
    Config = RlConfig
    parent_fields = ("from_",)
    launcher = "torchrun"
    makes_model = True
    built = False
    not_built_reason = NOT_BUILT

    @classmethod
    def check(cls, config: RlConfig, stage: str, graph: StageGraph, cluster: Any) -> None:
        graph.require_model(config.from_, f"stages.{stage}.from")

    @classmethod
    def model_source(cls, config: RlConfig, graph: StageGraph) -> str | None:
        return config.from_
