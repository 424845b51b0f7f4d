"""Stage kinds. ``KINDS`` is the one registry: kind name -> StageKind class, each in its family's
package (data/, training/, models/, evaluation/, rl/). Only light modules are imported here."""
from __future__ import annotations

from stages.base import StageKind
from stages.data.curate import Curate
from stages.data.prepare import PrepareData
from stages.data.tokenize import Tokenize
from stages.data.tokenizer import TrainTokenizer
from stages.evaluation.evaluate import Evaluate
from stages.models.merge import Merge
from stages.rl.grpo import Rl
from stages.training.extend_context import ExtendContext
from stages.training.pretrain import Pretrain
from stages.training.sft import Sft

KINDS: dict[str, type[StageKind]] = {
    k.name: k for k in (PrepareData, TrainTokenizer, Tokenize, Pretrain, ExtendContext, Merge,
                        Evaluate, Curate, Sft, Rl)
}


def register(kind: type[StageKind]) -> type[StageKind]:
    """Add a kind defined outside this package (a plugin, a test). The worker finds it through the
    module named in its spec, which registers it again on import."""
    known = KINDS.get(kind.name)
    if known is not None and known is not kind:
        raise ValueError(f"stage kind {kind.name!r} is already registered ({known.__module__})")
    KINDS[kind.name] = kind
    return kind
