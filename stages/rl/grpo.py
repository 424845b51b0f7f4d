"""`rl` stage kind: on-policy GRPO with the DAPO loss (issue 12).

Validates and plans today; running it stops at validation, naming the issue that builds it.
The model it makes is its parent's (``model_source``).
"""
from __future__ import annotations

from typing import Any, Literal

from stages.base import StageGraph, StageKind
from stages.schema import configclass, param
from stages.specs import ScheduleSpec

NOT_BUILT = "is not built yet: RL (GRPO with the DAPO loss) is issue 12"


@configclass
class RlConfig:
    """On-policy GRPO with the DAPO loss: decoupled clip (eps_low, eps_high), token-level loss,
    dynamic sampling of groups whose rewards are not all equal, overlong shaping, no KL."""
    from_: str = param(doc="policy model stage")
    task: Literal["math", "code", "instruction_following", "chat"] = param(doc="reward domain")
    group_size: int = param(8, "completions per prompt (G); GRPO needs two or more", ge=2)
    prompts_per_step: int = param(16, "groups per rollout batch", ge=1)
    steps: int = param(doc="policy updates", ge=1)
    eps_low: float = param(0.2, "DAPO lower clip", gt=0.0, lt=1.0)
    eps_high: float = param(0.28, "DAPO upper clip (clip-higher)", gt=0.0, lt=1.0)
    max_new_tokens: int = param(256, "rollout length cap", ge=1)
    overlong_buffer: int = param(32, "soft overlong-penalty window (tokens)", ge=0)
    schedule: ScheduleSpec = param(doc="LR schedule")


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
