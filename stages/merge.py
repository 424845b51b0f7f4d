"""`merge` stage kind: merge two or more model stages with mergekit, output in both formats.

The recipe merges each context-extension step with its parent so that short-context quality
survives. Steps of a run (``merge_models``):

1. each parent's final Megatron checkpoint -> a Hugging Face directory (``convert.megatron_to_hf``)
   under ``<out>/inputs/<parent>/``;
2. mergekit's Python API (``MergeConfiguration`` + ``run_merge``) -> ``<out>/hf/``:
   - ``linear``: sum_i w_i * m_i (weights normalised to sum 1);
   - ``slerp``: spherical interpolation from ``base`` towards the other parent by ``t`` = the
     other parent's weight (exactly two parents);
   - ``task_arithmetic`` / ``ties``: base + sum_i w_i * (m_i - base) over the non-base parents
     (TIES also trims to ``density`` and elects signs); what mergekit's maintainers advise for
     models whose RoPE theta differ;
3. the output ``config.json`` takes the longest-context parent's ``rope_theta`` and
   ``max_position_embeddings`` whatever mergekit copied (the documented merge config; a model
   merged with its extension is meant to read long inputs);
4. ``<out>/hf/`` -> ``<out>/checkpoints/iter_0000000`` (``convert.hf_to_megatron``), so the next
   stage trains from it like from any phase. The inputs' HF copies are deleted afterwards.

Checks before compute: two or more parents, each a model stage; same shapes and the same
tokenizer (vocabulary); a base among the model stages when the method needs one.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from stages.base import Artifact, RunContext, StageInput, StageKind
from stages.model_stages import (model_of, require_model_stage, shape_differences, tokenizer_of)
from stages.schema import ConfigError, param

NEEDS_BASE = ("slerp", "ties", "task_arithmetic")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MergeConfig:
    from_: tuple[str, ...] = param(doc="two or more model stages to merge")
    method: Literal["linear", "slerp", "ties", "task_arithmetic"] = param("linear", "mergekit method")
    weights: tuple[float, ...] = param((), "one weight per parent in `from` (default: equal)")
    base: str | None = param(None, "base model stage (slerp, ties, task_arithmetic)")
    density: float = param(1.0, "ties: fraction of each task vector kept")

    def __post_init__(self) -> None:
        if len(self.from_) < 2:
            raise ConfigError(f"from: a merge needs two or more parents, got {list(self.from_)}")
        if len(set(self.from_)) != len(self.from_):
            raise ConfigError(f"from: a parent is listed twice: {list(self.from_)}")
        if self.weights and len(self.weights) != len(self.from_):
            raise ConfigError(f"weights: {len(self.weights)} weights for {len(self.from_)} parents")
        if any(w < 0 for w in self.weights) or (self.weights and sum(self.weights) <= 0):
            raise ConfigError(f"weights: must be >= 0 with a positive sum, got {list(self.weights)}")
        if self.method in NEEDS_BASE and self.base is None:
            raise ConfigError(f"base: method {self.method!r} needs a base model stage, e.g. the "
                              "pre-extension parent")
        if self.method not in NEEDS_BASE and self.base is not None:
            raise ConfigError(f"base: method {self.method!r} takes no base model; drop base, or "
                              f"use one of {', '.join(NEEDS_BASE)}")
        if self.method == "slerp" and (len(self.from_) != 2 or self.base not in self.from_):
            raise ConfigError("from: slerp merges exactly two parents, one of which is `base`")
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"density: must be in (0, 1], got {self.density}")
        if self.density != 1.0 and self.method != "ties":
            raise ConfigError(f"density: only the ties method trims task vectors; drop density "
                              f"or set method=ties (method is {self.method!r})")

    def weight_of(self) -> dict[str, float]:
        ws = self.weights or tuple(1.0 for _ in self.from_)
        return dict(zip(self.from_, ws, strict=True))


class Merge(StageKind):
    name = "merge"
    Config = MergeConfig
    parent_fields = ("from_", "base")

    @classmethod
    def check(cls, config: MergeConfig, stage: str, configs: dict[str, Any], cluster: Any) -> None:
        for i, p in enumerate(config.from_):
            require_model_stage(p, configs, f"stages.{stage}.from[{i}]")
        if config.base is not None:
            require_model_stage(config.base, configs, f"stages.{stage}.base")
        first = config.from_[0]
        for p in [*config.from_[1:], *([config.base] if config.base else [])]:
            diff = shape_differences(model_of(first, configs), model_of(p, configs))
            if diff:
                raise ConfigError(f"stages.{stage}.from: {first!r} and {p!r} have different shapes "
                                  f"({'; '.join(diff)}); only models of one shape can be merged")
            if tokenizer_of(p, configs) != tokenizer_of(first, configs):
                raise ConfigError(f"stages.{stage}.from: {first!r} and {p!r} use different tokenizers "
                                  f"({tokenizer_of(first, configs)!r} vs {tokenizer_of(p, configs)!r}); "
                                  "merged models must share one vocabulary")

    @classmethod
    def run(cls, config: MergeConfig, inputs: dict[str, StageInput], out_dir: Path,
            ctx: RunContext) -> Artifact:
        from stages.merging import merge_models  # heavy: torch, transformers, mergekit
        return merge_models(config, inputs, Path(out_dir), ctx)
