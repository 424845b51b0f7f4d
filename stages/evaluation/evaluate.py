"""`evaluate` stage kind: short-context held-out loss and long-context retrieval of one model stage.

- Held-out loss: the token-mean loss of each held-out source of the tokenize stage at
  ``heldout_length`` (the pretraining length, so every evaluation of a pipeline compares on the
  same footing), and their plain mean ``heldout_loss``. A source with prompts counts its
  completions only (for the ``recall`` drills: the loss on their answers).
- Retrieval (RULER-style, ``evaluation/retrieval.py``): for every target length in ``lengths``,
  every needle depth in ``depths`` and every key count in ``keys`` (1 = needle in a haystack,
  more = multi-key with distractors), ``samples`` generated probes; exact match of the greedy
  continuation with the whole answer (a name of one or more tokens). Metrics ``retrieval/L<length>/k<keys>/d<depth>``, per length ``retrieval/L<length>``
  (mean over depths and key counts) and ``retrieval`` (mean over everything).
- ``retrieval.png``: a length x depth heat-map per key count, logged on the stage's MLflow run.

The recipe evaluates before and after each extension step and each merge. Runs on Megatron-core in
a world of one (CPU shim on CPU); vLLM serving on GPU is issue 3's GPU follow-up.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.base import Artifact, RunContext, StageGraph, StageInput, StageKind
from stages.schema import ConfigError, configclass, param, setting


@configclass
class EvaluateConfig:
    from_: str = param(doc="model stage to evaluate")
    data: str = param(doc="the tokenize stage (held-out split and tokenizer)")
    heldout_length: int = param(doc="sequence length of the held-out loss (the pretraining length)",
                                gt=0)
    lengths: tuple[int, ...] = param((), "context lengths for the retrieval probes")
    depths: tuple[float, ...] = param((0.0, 0.25, 0.5, 0.75, 1.0), "needle depths (0 = start, 1 = end)")
    keys: tuple[int, ...] = param((1, 4), "needles per probe: 1 = single needle, more = multi-key")
    samples: int = param(32, "retrieval probes per (length, depth, keys) cell", ge=1)
    seed: int = param(0, "probe generation seed")
    batch_size: int = setting(16, "probes per forward pass", ge=1)

    def __post_init__(self) -> None:
        if any(n < 16 for n in self.lengths):
            raise ConfigError(f"lengths: each must be >= 16 tokens, got {list(self.lengths)}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths) or not self.depths:
            raise ConfigError(f"depths: need values in [0, 1], got {list(self.depths)}")
        if any(k < 1 for k in self.keys) or not self.keys:
            raise ConfigError(f"keys: need counts >= 1, got {list(self.keys)}")


class Evaluate(StageKind):
    name = "evaluate"
    Config = EvaluateConfig
    parent_fields = ("from_", "data")

    @classmethod
    def check(cls, config: EvaluateConfig, stage: str, graph: StageGraph, cluster: Any) -> None:
        graph.require_model(config.from_, f"stages.{stage}.from")
        data = graph.require(config.data, f"stages.{stage}.data", "tokenize")
        if data.tokenizer != graph.tokenizer_of(config.from_):
            raise ConfigError(f"stages.{stage}.data: {config.data!r} uses tokenizer "
                              f"{data.tokenizer!r}, but {config.from_!r} was trained "
                              f"with {graph.tokenizer_of(config.from_)!r}")

    @classmethod
    def run(cls, config: EvaluateConfig, inputs: dict[str, StageInput], out_dir: Path,
            ctx: RunContext) -> Artifact:
        from stages.evaluation.run_eval import evaluate_model  # heavy: torch + megatron
        return evaluate_model(config, inputs, Path(out_dir), ctx)
