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
- Chat (``chat``: a curate stage; ``evaluation/chat_eval.py`` defines each number exactly):
  ``chat/heldout_loss``, the token-mean cross-entropy over the assistant tokens (content and closing
  ``<|end_of_text|>``) of the curate stage's held-out conversations, each alone, truncated to the
  model's context (``chat/heldout_tokens`` tokens over ``chat/heldout_conversations``
  conversations, ``chat/heldout_truncated`` of them cut); ``chat/exact_match``, the share of the
  first ``chat_samples`` eval prompts whose greedy completion's final answer (the last number, or
  the stripped text if it has none) equals the reference's (``chat/exact_match_prompts`` prompts,
  ``chat/exact_match_correct`` right); every prompt's completion in ``chat_samples.jsonl``.
  The recipe runs it before and after SFT on the same curate stage.

- lm-evaluation-harness (``lm_eval_tasks``: task files shipped in ``conf/lm_eval/``;
  ``evaluation/harness.py`` says how they run): the model stage is exported as a Hugging Face folder
  (``models/export.py``, into ``hf-export/``, removed after) and each task runs on it offline, on
  lm-eval's ``hf`` backend on CPU and ``vllm`` on CUDA; with ``lm_eval_chat_template`` (the default)
  every task prompt is a user turn of the export's chat template, as ``chat/exact_match`` asks.
  Metrics ``lm_eval/<task>/<metric>`` (``lm_eval/tiny_arith_mc/acc``, ...); the harness's results
  in ``lm_eval_results.json`` and every request's log-likelihoods or generation in
  ``lm_eval_samples.jsonl``. ``lm_eval_limit`` (the first N documents of each task) and
  ``lm_eval_batch_size`` are settings: a limited run is a smoke test, not another stage.

A stage evaluates ``data`` (held-out loss at ``heldout_length``, and retrieval), ``chat``,
``lm_eval_tasks``, or any combination of them.

The recipe evaluates before and after each extension step and each merge. Runs on Megatron-core in
a world of one (CPU shim on CPU); vLLM serving on GPU is issue 3's GPU follow-up. The lm-eval tasks
run after, in a process of their own on the export (the model is not loaded when nothing else
needs it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.base import Artifact, RunContext, StageGraph, StageInput, StageKind
from stages.schema import ConfigError, configclass, param, setting


@configclass
class EvaluateConfig:
    from_: str = param(doc="model stage to evaluate")
    # data and heldout_length were required before chat came: a config that sets them keeps its key
    data: str | None = param(None, "the tokenize stage (held-out split and tokenizer)")
    heldout_length: int | None = param(
        None, "sequence length of the held-out loss (the pretraining length); needed with data", gt=0)
    lengths: tuple[int, ...] = param((), "context lengths for the retrieval probes")
    depths: tuple[float, ...] = param((0.0, 0.25, 0.5, 0.75, 1.0), "needle depths (0 = start, 1 = end)")
    keys: tuple[int, ...] = param((1, 4), "needles per probe: 1 = single needle, more = multi-key")
    samples: int = param(32, "retrieval probes per (length, depth, keys) cell", ge=1)
    seed: int = param(0, "probe generation seed")
    batch_size: int = setting(16, "probes (chat: conversations or prompts) per forward pass", ge=1)
    # Added after stages were run: keyed only when set, so every earlier key stays valid.
    chat: str | None = param(None, "curate stage: held-out assistant-token loss and greedy exact "
                                   "match on its eval prompts", keyed_if_set=True)
    chat_samples: int = param(64, "eval prompts for the greedy exact match (the first N)", ge=1,
                              keyed_if_set=True)
    max_new_tokens: int = param(32, "greedy tokens generated per eval prompt at most", ge=1,
                                keyed_if_set=True)
    lm_eval_tasks: tuple[str, ...] = param(
        (), "lm-evaluation-harness tasks shipped in conf/lm_eval/ (e.g. tiny_arith_mc), run on the "
            "model stage's Hugging Face export", keyed_if_set=True)
    lm_eval_chat_template: bool = param(
        True, "lm-eval prompts as user turns of the export's chat template (needs the chat role "
              "tokens); false: the plain task prompts", keyed_if_set=True)
    lm_eval_limit: int | None = setting(None, "lm-eval documents per task (the first N); None: all",
                                        ge=1)
    lm_eval_batch_size: int = setting(16, "lm-eval requests per forward pass (hf backend)", ge=1)

    def __post_init__(self) -> None:
        if self.data is None and self.chat is None and not self.lm_eval_tasks:
            raise ConfigError("data: set data (a tokenize stage: held-out loss, retrieval), "
                              "lm_eval_tasks (lm-evaluation-harness tasks of conf/lm_eval/) or chat "
                              "(a curate stage: chat loss and exact match), or several")
        from stages.evaluation.harness import check_task_names  # file names only: no lm-eval here
        check_task_names(self.lm_eval_tasks)
        if self.data is not None and self.heldout_length is None:
            raise ConfigError("heldout_length: required with data (the pretraining sequence length)")
        if self.data is None and self.heldout_length is not None:
            raise ConfigError("heldout_length: only means something with data (a tokenize stage); "
                              "set data or remove heldout_length")
        if any(n < 16 for n in self.lengths):
            raise ConfigError(f"lengths: each must be >= 16 tokens, got {list(self.lengths)}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths) or not self.depths:
            raise ConfigError(f"depths: need values in [0, 1], got {list(self.depths)}")
        if any(k < 1 for k in self.keys) or not self.keys:
            raise ConfigError(f"keys: need counts >= 1, got {list(self.keys)}")


class Evaluate(StageKind):
    name = "evaluate"
    Config = EvaluateConfig
    parent_fields = ("from_", "data", "chat")

    @classmethod
    def check(cls, config: EvaluateConfig, stage: str, graph: StageGraph, cluster: Any) -> None:
        graph.require_model(config.from_, f"stages.{stage}.from")
        model_tokenizer = graph.tokenizer_of(config.from_)
        if config.data is not None:
            data = graph.require(config.data, f"stages.{stage}.data", "tokenize")
            if data.tokenizer != model_tokenizer:
                raise ConfigError(f"stages.{stage}.data: {config.data!r} uses tokenizer "
                                  f"{data.tokenizer!r}, but {config.from_!r} was trained "
                                  f"with {model_tokenizer!r}")
        if config.chat is not None:
            curate = graph.require(config.chat, f"stages.{stage}.chat", "curate")
            # read by name: the curate kind's module is not imported here
            if getattr(curate, "tokenizer", None) != model_tokenizer:
                raise ConfigError(f"stages.{stage}.chat: {config.chat!r} measured its data with "
                                  f"tokenizer {getattr(curate, 'tokenizer', None)!r}, but "
                                  f"{config.from_!r} was trained with {model_tokenizer!r}; name a "
                                  f"curate stage of the same tokenizer")

    @classmethod
    def datasets_read(cls, config: EvaluateConfig, artifact: Artifact,
                      upstream: dict[str, Artifact]) -> list[dict]:
        """Every parent's datasets, except that of the chat curate stage only its held-out split
        is read (its kept set is SFT's training data, not this stage's); and its own: the data
        files of its lm-eval tasks."""
        parents = [d for d in super().datasets_read(config, artifact, upstream)
                   if d["stage"] != config.chat or d.get("split") == "heldout"]
        own = [dict(d, stage=artifact.stage) for d in artifact.datasets] if upstream else []
        return parents + own

    @classmethod
    def run(cls, config: EvaluateConfig, inputs: dict[str, StageInput], out_dir: Path,
            ctx: RunContext) -> Artifact:
        from stages.evaluation.run_eval import evaluate_model  # heavy: torch + megatron
        return evaluate_model(config, inputs, Path(out_dir), ctx)
