"""`extend_context` stage kind: continue a model at a longer sequence length with a raised RoPE theta.

The recipe's steps are 4K -> 32K -> 128K -> 512K; the tiny pipeline takes the same number of
steps at tiny lengths. A step is a training phase (``training/loop.py``) whose model is its
parent's with ``rope_theta`` and ``max_position_embeddings`` replaced (``run_model``):

- weights come from the parent (a pretrain phase, an extension or a merge); AdamW moments start
  fresh, since a merged parent has none and the raised theta moves every attention pattern;
- the data is a blend of long documents (books-like prose, whole code repositories) and a share of
  short-context sources (``mixture``), packed to ``seq_length``;
- with ``document_mask`` (default) each packed sample gets a block-diagonal causal mask, so no
  token attends across a document boundary (CPU backend; on GPU this needs THD packing, not
  built yet, so a GPU cluster with ``document_mask: true`` is refused at validation);
- context parallelism comes from the cluster config or the stage's ``parallel``; it validates and
  plans, but the training loop does not split sequences yet (the stage shows as blocked).

Checks before compute: the parent is a model stage of the same shape, the new length is longer
than the parent's, the length fits the CP split, the mixture names known sources.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from stages.base import StageGraph
from stages.schema import ConfigError, configclass, param
from stages.specs import ModelSpec, shape_differences, with_context
from stages.training.pretrain import Pretrain, PretrainConfig


@configclass
class ExtendContextConfig(PretrainConfig):
    from_: str = param(doc="model stage to extend (pretrain, extend_context or merge)")
    rope_theta: float = param(doc="raised RoPE base for the new length", gt=0)
    document_mask: bool = param(True, "attend within each packed document only (CPU backend)")

    carries_optimizer: ClassVar[bool] = False

    @property
    def run_model(self) -> ModelSpec:
        return with_context(self.model, self.seq_length, self.rope_theta)



class ExtendContext(Pretrain):
    name = "extend_context"
    Config = ExtendContextConfig

    @classmethod
    def check(cls, config: ExtendContextConfig, stage: str, graph: StageGraph, cluster: Any) -> None:
        graph.require_model(config.from_, f"stages.{stage}.from")
        diff = shape_differences(config.model, graph.model_of(config.from_))
        if diff:
            raise ConfigError(f"stages.{stage}.model: differs from the model of parent {config.from_!r} "
                              f"({'; '.join(diff)}); an extension keeps the model's shape")
        parent_len = graph.context_length_of(config.from_)
        if config.seq_length <= parent_len:
            raise ConfigError(f"stages.{stage}.seq_length: {config.seq_length} is not longer than "
                              f"the context of parent {config.from_!r} ({parent_len}); an extension "
                              "step must raise the length")
        parent_theta = graph.model_of(config.from_).rope_theta
        if config.rope_theta < parent_theta:
            raise ConfigError(f"stages.{stage}.rope_theta: {config.rope_theta:g} is below the theta "
                              f"of parent {config.from_!r} ({parent_theta:g}); raise it (or keep it) "
                              "for a longer context")
        if config.document_mask and cluster.device == "cuda":
            # the GPU path would silently attend across documents under a key that says it does not
            raise ConfigError(f"stages.{stage}.document_mask: document masking is built for the CPU "
                              "backend only; on GPUs (cluster.device=cuda) it needs THD packing, "
                              "which is not built yet, and packed documents would attend across "
                              f"their boundaries; set stages.{stage}.document_mask=false on GPUs")
        super().check(dataclasses.replace(config, from_=None), stage, graph, cluster)
