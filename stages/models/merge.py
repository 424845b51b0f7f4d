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

import json
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from stages.base import Artifact, RunContext, StageGraph, StageInput, StageKind
from stages.layout import CHECKPOINTS, iter_name
from stages.schema import ConfigError, configclass, param, to_dict
from stages.specs import ModelSpec, shape_differences, spec_of_artifact

NEEDS_BASE = ("slerp", "ties", "task_arithmetic")


@configclass
class MergeConfig:
    from_: tuple[str, ...] = param(doc="two or more model stages to merge")
    method: Literal["linear", "slerp", "ties", "task_arithmetic"] = param("linear", "mergekit method")
    weights: tuple[float, ...] = param((), "one weight per parent in `from` (default: equal)")
    base: str | None = param(None, "base model stage (slerp, ties, task_arithmetic)")
    density: float = param(1.0, "ties: fraction of each task vector kept", gt=0.0, le=1.0)

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
        if self.density != 1.0 and self.method != "ties":
            raise ConfigError(f"density: only the ties method trims task vectors; drop density "
                              f"or set method=ties (method is {self.method!r})")
        same = self.identity_of()
        if same is not None:
            raise ConfigError(
                f"weights: {list(self.weights) if self.weights else 'unset (1.0 each)'}: this {self.method} merge "
                f"returns {same!r} unchanged ({self._why_identity(same)}), so the stage would only "
                f"copy it; give the weights a real mix ({self._fix_hint()}) or drop the merge stage")

    def identity_of(self) -> str | None:
        """The parent this merge returns unchanged, or None when it really mixes. linear: one
        parent holds all the weight; slerp: t = 0 (the base) or 1 (the other); task_arithmetic /
        ties (density 1): base + w (m - base) with a single task vector of weight 1 is m, and
        with every task-vector weight 0 it is the base."""
        w = self.weight_of()
        if self.method == "linear":
            held = [p for p, x in w.items() if x > 0]
            return held[0] if len(held) == 1 else None
        others = {p: x for p, x in w.items() if p != self.base}
        if self.method == "slerp":
            (other, x), = others.items()
            return self.base if x == 0 else other if w[self.base] == 0 else None
        if all(x == 0 for x in others.values()):
            return self.base
        live = [p for p, x in others.items() if x != 0]
        untrimmed = self.method != "ties" or self.density == 1.0
        if len(live) == 1 and others[live[0]] == 1.0 and untrimmed:
            return live[0]
        return None

    def _why_identity(self, same: str) -> str:
        if self.method == "linear":
            return f"all the weight is on {same!r}"
        if self.method == "slerp":
            return f"t = {0 if same == self.base else 1}"
        if same == self.base:
            return "every task vector has weight 0"
        return (f"{self.base} + 1.0 x ({same} - {self.base}) = {same}"
                + (", density 1" if self.method == "ties" else ""))

    def _fix_hint(self) -> str:
        if self.method == "linear":
            return "e.g. weights: [0.75, 0.25]"
        if self.method == "slerp":
            return "both weights > 0, e.g. [0.75, 0.25]: t = 0.75 towards the non-base parent"
        return ("a task-vector weight below 1, e.g. weights: [0.75, 0.25] for from: [extension, "
                "base]: the base's weight is not used, base + 0.75 x (extension - base)")

    def weight_of(self) -> dict[str, float]:
        ws = self.weights or tuple(1.0 for _ in self.from_)
        return dict(zip(self.from_, ws, strict=True))


class Merge(StageKind):
    name = "merge"
    Config = MergeConfig
    parent_fields = ("from_", "base")
    makes_model = True

    @classmethod
    def check(cls, config: MergeConfig, stage: str, graph: StageGraph, cluster: Any) -> None:
        for i, p in enumerate(config.from_):
            graph.require_model(p, f"stages.{stage}.from[{i}]")
        if config.base is not None:
            graph.require_model(config.base, f"stages.{stage}.base")
        first = config.from_[0]
        tokenizer_of = graph.tokenizer_of
        for p in [*config.from_[1:], *([config.base] if config.base else [])]:
            diff = shape_differences(graph.model_of(first), graph.model_of(p))
            if diff:
                raise ConfigError(f"stages.{stage}.from: {first!r} and {p!r} have different shapes "
                                  f"({'; '.join(diff)}); only models of one shape can be merged")
            if tokenizer_of(p) != tokenizer_of(first):
                raise ConfigError(f"stages.{stage}.from: {first!r} and {p!r} use different tokenizers "
                                  f"({tokenizer_of(first)!r} vs {tokenizer_of(p)!r}); "
                                  "merged models must share one vocabulary")

    @classmethod
    def model_source(cls, config: MergeConfig, graph: StageGraph) -> str | None:
        """The longest-context parent (the documented merge config; the first on a tie)."""
        return max(config.from_, key=graph.context_length_of)

    @classmethod
    def run(cls, config: MergeConfig, inputs: dict[str, StageInput], out_dir: Path,
            ctx: RunContext) -> Artifact:
        return merge_models(config, inputs, Path(out_dir), ctx)


def mergekit_config(config, paths: dict[str, str]) -> dict:
    """The MergeConfiguration document (as mergekit's YAML would hold it)."""
    weights = config.weight_of()
    doc: dict = {"merge_method": config.method, "dtype": "float32"}
    if config.method == "linear":
        total = sum(weights.values())
        doc["models"] = [{"model": paths[p], "parameters": {"weight": w / total}}
                         for p, w in weights.items()]
        doc["parameters"] = {"normalize": False}  # normalised here, so the record shows the math
        return doc
    doc["base_model"] = paths[config.base]
    others = [p for p in config.from_ if p != config.base]
    if config.method == "slerp":
        (other,) = others
        doc["models"] = [{"model": paths[config.base]}, {"model": paths[other]}]
        doc["parameters"] = {"t": weights[other] / (weights[other] + weights[config.base])}
        return doc
    doc["models"] = [{"model": paths[p], "parameters": {"weight": weights[p]} |
                      ({"density": config.density} if config.method == "ties" else {})}
                     for p in others]
    doc["parameters"] = {"normalize": False}  # weights mean what the config says
    return doc


def set_context(hf_dir: Path, spec: ModelSpec) -> None:
    """Write the longest-context parent's RoPE theta and max positions into ``config.json``."""
    path = hf_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg["max_position_embeddings"] = spec.max_position_embeddings
    rope = cfg.get("rope_parameters") or {"rope_type": "default"}
    cfg["rope_parameters"] = rope | {"rope_theta": float(spec.rope_theta)}
    cfg.pop("rope_theta", None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def merge_models(config, inputs: dict[str, StageInput], out_dir: Path, ctx: RunContext) -> Artifact:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from stages.models.convert import hf_to_megatron, megatron_to_hf
    from stages.training.checkpoint import TrainState
    t0 = time.time()
    parents = list(dict.fromkeys([*config.from_, *([config.base] if config.base else [])]))
    checkpoints = {p: inputs[p].checkpoint() for p in parents}   # damaged: refused before any work
    specs = {p: spec_of_artifact(inputs[p]) for p in parents}
    longest = max(config.from_, key=lambda p: inputs[p].artifact.extra.get("seq_length", 0))
    tokenizer = next((inputs[p].path("tokenizer") for p in parents
                      if "tokenizer" in inputs[p].artifact.outputs), None)

    work, hf_out = out_dir / "inputs", out_dir / "hf"
    shutil.rmtree(work, ignore_errors=True)  # a half-done earlier attempt: redo from scratch
    shutil.rmtree(hf_out, ignore_errors=True)
    paths = {}
    for p in parents:
        paths[p] = str(megatron_to_hf(checkpoints[p], specs[p], work / p, tokenizer))
        print(f"[{ctx.stage}] exported {p} to Hugging Face format", flush=True)

    doc = mergekit_config(config, paths)
    (out_dir / "mergekit.json").write_text(json.dumps(doc, indent=2) + "\n")
    run_merge(MergeConfiguration.model_validate(doc), str(hf_out),
              MergeOptions(cuda=False, copy_tokenizer=tokenizer is not None, write_model_card=False,
                           quiet=True, random_seed=ctx.seed))
    set_context(hf_out, specs[longest])
    print(f"[{ctx.stage}] {config.method} merge of {', '.join(config.from_)} -> {hf_out}", flush=True)

    ckpt = out_dir / CHECKPOINTS / iter_name(0)
    tokens = max(inputs[p].artifact.extra.get("tokens_total", 0) for p in parents)
    spec = hf_to_megatron(hf_out, ckpt, TrainState(tokens_total=tokens))  # for token-based schedules
    shutil.rmtree(work)
    outputs = {"checkpoint": f"{CHECKPOINTS}/{iter_name(0)}", "hf": "hf", "mergekit_config": "mergekit.json"}
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out_dir / "tokenizer.json")
        outputs["tokenizer"] = "tokenizer.json"
    extra = {"model": to_dict(spec), "seq_length": inputs[longest].artifact.extra.get("seq_length"),
             "parents": parents, "context_from": longest, "method": config.method,
             "tokens_total": tokens}
    return Artifact(kind="merge", stage=ctx.stage, key=ctx.key, outputs=outputs,
                    metrics={"merge_s": time.time() - t0}, extra=extra)
