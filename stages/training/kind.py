"""What every training kind (pretrain, extend_context, sft) shares as a ``StageKind``: a
``torchrun`` worker on the stage's own parallel layout (``parallel:`` over the cluster's), a model
as its output, FP8 checked on the launching machine, and resume from the newest checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.base import StageKind
from stages.cluster import stage_cluster
from stages.layout import newest_checkpoint
from stages.training.precision import require_fp8_runtime


class TrainingKind(StageKind):
    launcher = "torchrun"
    makes_model = True

    @classmethod
    def blocked(cls, config: Any, cluster: Any) -> str:
        return super().blocked(config, cluster) or cls.layout(config, cluster).not_built()

    @classmethod
    def layout(cls, config: Any, cluster: Any) -> Any:
        return stage_cluster(cluster, config.parallel)

    @classmethod
    def preflight(cls, config: Any, where: str) -> None:
        require_fp8_runtime(config.precision, f"{where}.precision")

    @classmethod
    def resume_point(cls, out_dir: Path) -> Path | None:
        return newest_checkpoint(out_dir)
