"""`sft` stage kind: supervised fine-tuning on curated chat data (issue 11).

Validates and plans today; running it stops at validation, naming the issue that builds it.
The model it makes is its parent's (``model_source``).
"""
from __future__ import annotations

from typing import Any

from stages.base import StageGraph, StageKind
from stages.schema import configclass, param
from stages.specs import ScheduleSpec

NOT_BUILT = "is not built yet: SFT on curated data is issue 11"


@configclass
class SftConfig:
    from_: str = param(doc="model stage to fine-tune")
    data: str = param(doc="curate stage")
    epochs: int = param(1, "passes over the curated data", ge=1)
    seq_length: int = param(doc="tokens per packed sequence", ge=1)
    global_batch_size: int = param(doc="sequences per step", ge=1)
    schedule: ScheduleSpec = param(doc="LR schedule")


class Sft(StageKind):
    name = "sft"
    Config = SftConfig
    parent_fields = ("from_", "data")
    launcher = "torchrun"
    makes_model = True
    built = False
    not_built_reason = NOT_BUILT

    @classmethod
    def check(cls, config: SftConfig, stage: str, graph: StageGraph, cluster: Any) -> None:
        graph.require_model(config.from_, f"stages.{stage}.from")
        graph.require(config.data, f"stages.{stage}.data", "curate")

    @classmethod
    def model_source(cls, config: SftConfig, graph: StageGraph) -> str | None:
        return config.from_
