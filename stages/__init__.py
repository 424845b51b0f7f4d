"""Stage kinds. ``KINDS`` is the one registry: kind name -> StageKind class (light imports only)."""
from __future__ import annotations

from stages.base import StageKind
from stages.data_kinds import PrepareData, Tokenize, TrainTokenizer
from stages.evaluate import Evaluate
from stages.extend_context import ExtendContext
from stages.merge import Merge
from stages.planned import PLANNED_KINDS
from stages.pretrain import Pretrain

KINDS: dict[str, type[StageKind]] = {
    k.name: k for k in (PrepareData, TrainTokenizer, Tokenize, Pretrain, ExtendContext, Merge,
                        Evaluate, *PLANNED_KINDS)
}
