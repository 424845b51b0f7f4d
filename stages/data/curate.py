"""`curate` stage kind: rule-based filters and an LLM-as-judge over chat data (issue 11).

Validates and plans today; running it stops at validation, naming the issue that builds it.
"""
from __future__ import annotations

from typing import Any

from stages.base import StageGraph, StageKind
from stages.schema import configclass, param

NOT_BUILT = "is not built yet: curation (rule filters + LLM judge) is issue 11"


@configclass
class CurateConfig:
    data: str = param(doc="prepare_data stage with the instruction/chat sources")
    rules: tuple[str, ...] = param(("min_length", "dedup", "language"), "rule-based filters")
    judge: str | None = param(None, "LLM-as-judge model stage (vLLM on GPU)")
    target_samples: int = param(doc="samples to keep", ge=1)


class Curate(StageKind):
    name = "curate"
    Config = CurateConfig
    parent_fields = ("data", "judge")
    built = False
    not_built_reason = NOT_BUILT

    @classmethod
    def check(cls, config: CurateConfig, stage: str, graph: StageGraph, cluster: Any) -> None:
        graph.require(config.data, f"stages.{stage}.data", "prepare_data")
        if config.judge is not None:
            graph.require_model(config.judge, f"stages.{stage}.judge")
