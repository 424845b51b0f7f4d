"""`rl` stage kind: on-policy GRPO with the DAPO loss, on Megatron-core (issue 12).

The objective, exactly (``forge_kernels/dapo.py`` computes it; ``advantages.py`` and
``rollout.py`` make its inputs):

- **Rollouts.** Each step takes ``prompts_per_step`` prompts from the stage's prompt source
  (shuffled per epoch by ``seed``) and samples ``group_size`` (G) completions of each from the
  rollout engine (``engine``: our own on CPU, vLLM on GPUs) at ``temperature`` / ``top_p``, at most
  ``max_new_tokens`` tokens, stopping at ``<|end_of_text|>``. The engine returns each token's
  behaviour log-prob (log-softmax of logits / temperature over the real vocabulary, before top-p).
- **Rewards.** The task's reward (``rewards.py``: math, code in the sandbox, instruction
  following, chat by the judge) scores each completion in [0, 1] with a reason; a reward that fails
  scores 0. Overlong shaping adds DAPO's soft penalty over the last ``overlong_buffer`` tokens
  before the cap (0 down to -1).
- **Dynamic sampling** (``dynamic_sampling``): a group whose (shaped) rewards are all equal gives
  no signal and is dropped; generation continues with the next prompts until ``prompts_per_step``
  groups are kept, for at most ``max_extra_rounds`` more rounds (then the step trains on what it
  has; with none, it skips the update and says so).
- **Advantages**: GRPO's group-normalised ``(r - mean) / (std + 1e-6)`` per group, or
  ``r - mean`` (``advantage: mean_centred``); every token of a completion gets its completion's.
  **Overlong filtering** (``overlong_filter``): a completion cut at the cap gets no loss.
- **Updates.** The kept batch is split into ``updates_per_batch`` minibatches, one AdamW step
  each (with one, the ratio is always 1 and clip-higher does nothing). ``old_logp`` is the trainer's
  log-prob under the weights that generated the batch (before its first update). Per token:
  ``r = exp(logp - old_logp)``; ``pg = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``;
  dual clip (``dual_clip = c``, only where A < 0): ``pg = min(pg, -c A)``; truncated importance
  weight for engine/trainer mismatch ``w = min(exp(old_logp - behaviour_logp), is_cap)``
  (``is_cap: null`` turns it off); optional KL to the frozen parent (``kl_coef > 0``, k3
  estimator; off by default). Loss = sum over every response token of the minibatch of
  ``w pg (+ kl_coef kl)``, divided by the number of those tokens in the whole minibatch (all
  micro-batches, all data-parallel ranks): the token mean, so the loss and its gradient do not
  change with the DP size or the micro-batch split.
- **Weights** go from the trainer to the engine after each rollout batch's updates, through the
  one weight-streaming path (``stages/models/weights.py``: Megatron names -> HF names ->
  ``engine.load_weights``).

What is checkpointed (every ``checkpoint_interval`` steps, and at a SIGTERM): policy, AdamW,
RNG, the prompt position and the dynamic-sampling counters (``loop_state``). Rollout seeds are
a function of (seed, step, round, prompt), so a resumed run samples what the uninterrupted run
would have: it ends bit-identical on CPU (tested).

The held-out reward (``prompts.heldout`` prompts never trained on, one completion each, fixed
seeds) is measured before the first step and after the last: ``heldout_reward_before/after``
with their standard errors. ``reward_shuffle_control`` shuffles the rewards within each rollout
batch: a control run whose held-out reward should not rise.
The model an RL stage makes is its parent's shape, context and tokenizer (``model_source``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from stages.base import Artifact, RunContext, StageGraph, StageInput
from stages.cluster import check_stage_parallel
from stages.data.judge import JudgeSpec
from stages.rl.engine import engine_kind
from stages.rl.prompts import PromptSource
from stages.schema import ConfigError, configclass, param, setting
from stages.specs import PrecisionSpec, ScheduleSpec
from stages.training.kind import TrainingKind
from stages.training.precision import check_precision

TASKS = ("math", "code", "instruction_following", "chat")


@configclass
class RlConfig:
    """On-policy GRPO with the DAPO loss (the module docstring states every term)."""
    from_: str = param(doc="policy model stage (its weights; AdamW moments start fresh)")
    task: Literal["math", "code", "instruction_following", "chat"] = param(
        doc="reward: math (final answer vs reference), code (unit tests in the sandbox), "
            "instruction_following (checkable constraints), chat (the LLM judge)")
    prompts: PromptSource = param(doc="where prompts and their reference answers come from")
    steps: int = param(doc="rollout batches (each gives updates_per_batch optimizer steps)", ge=1)
    schedule: ScheduleSpec = param(doc="LR schedule (over optimizer steps)")
    judge: JudgeSpec | None = param(None, "task chat: the judge (endpoint or `serve: STAGE`)")
    group_size: int = param(8, "completions per prompt (G); GRPO needs two or more", ge=2)
    prompts_per_step: int = param(16, "groups per rollout batch", ge=1)
    updates_per_batch: int = param(2, "minibatch updates per rollout batch (with 1 the ratio is "
                                      "always 1 and the clip does nothing)", ge=1)
    advantage: Literal["group_norm", "mean_centred"] = param(
        "group_norm", "GRPO (r - mean) / (std + 1e-6), or r - mean")
    eps_low: float = param(0.2, "DAPO lower clip", gt=0.0, lt=1.0)
    eps_high: float = param(0.28, "DAPO upper clip (clip-higher)", gt=0.0, lt=1.0)
    dual_clip: float | None = param(None, "dual-clip constant c > 1 for negative advantages "
                                          "(None: off)")
    is_cap: float | None = param(2.0, "truncated importance weight cap for engine/trainer "
                                      "mismatch (None: no correction)")
    kl_coef: float = param(0.0, "KL to the frozen parent (k3); 0: no KL, no reference model", ge=0)
    dynamic_sampling: bool = param(True, "drop groups whose rewards are all equal and refill")
    max_extra_rounds: int = param(3, "dynamic sampling: most extra generation rounds a step",
                                  ge=0)
    max_new_tokens: int = param(256, "rollout length cap", ge=1)
    overlong_buffer: int = param(32, "soft overlong-penalty window before the cap (0: off)", ge=0)
    overlong_filter: bool = param(True, "no loss on completions cut at the cap")
    temperature: float = param(1.0, "rollout sampling temperature", gt=0.0)
    top_p: float = param(1.0, "rollout nucleus sampling", gt=0.0, le=1.0)
    engine: Literal["auto", "cpu", "vllm"] = param(
        "auto", "rollout engine (auto: vllm on cuda clusters, cpu otherwise)")
    reward_shuffle_control: bool = param(False, "control run: shuffle rewards within each batch")
    precision: PrecisionSpec = param(factory=PrecisionSpec, doc="dtype / FP8 recipe")
    weight_decay: float = param(0.0, "AdamW weight decay", ge=0)
    adam_beta1: float = param(0.9, "AdamW beta1", ge=0.0, lt=1.0)
    adam_beta2: float = param(0.999, "AdamW beta2", ge=0.0, lt=1.0)
    adam_eps: float = param(1e-8, "AdamW epsilon", gt=0)
    grad_clip: float = param(1.0, "gradient-norm clip (0 turns it off)", ge=0)
    seed: int = param(1234, "prompt order and rollout seeds")
    micro_batch_size: int = setting(0, "sequences per forward pass per rank (0: the whole local "
                                       "minibatch)", ge=0)
    parallel: dict[str, int | bool | str] = setting(
        factory=dict, doc="this stage's own layout over the cluster's (data_parallel)")
    reward_workers: int = setting(2, "rewards scored in parallel (processes / sandboxes)", ge=1)
    reward_timeout_s: float = setting(5.0, "a reward's time limit (then it scores 0)", gt=0)
    checkpoint_interval: int = setting(10, "save every N steps (and always at the end)", ge=0)
    keep_checkpoints: int = setting(2, "newest checkpoints kept while training", ge=1)
    log_interval: int = setting(5, "print progress every N steps", ge=1)
    sample_interval: int = setting(10, "write a table of sampled rollouts every N steps", ge=1)

    def __post_init__(self) -> None:
        check_stage_parallel(self.parallel)
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ConfigError(f"dual_clip: {self.dual_clip} must be > 1 (or null to turn it off)")
        if self.is_cap is not None and self.is_cap < 1.0:
            raise ConfigError(f"is_cap: {self.is_cap} must be >= 1 (or null: no correction)")
        if self.overlong_buffer >= self.max_new_tokens:
            raise ConfigError(f"overlong_buffer: {self.overlong_buffer} must be smaller than "
                              f"max_new_tokens ({self.max_new_tokens})")
        if (self.task == "chat") != (self.judge is not None):
            raise ConfigError("judge: the chat task needs a judge (judge: {serve: STAGE} or an "
                              "endpoint), and only the chat task uses one"
                              if self.task == "chat" else
                              f"judge: task {self.task!r} is scored by its verifier, not a judge; "
                              "drop judge or use task: chat")
        if self.prompts_per_step * self.group_size < self.updates_per_batch:
            raise ConfigError(f"updates_per_batch: {self.updates_per_batch} minibatches need at "
                              f"least as many completions per batch (prompts_per_step x "
                              f"group_size = {self.prompts_per_step * self.group_size})")


class Rl(TrainingKind):
    name = "rl"
    Config = RlConfig
    parent_fields = ("from_", "judge.serve")

    @classmethod
    def check(cls, config: RlConfig, stage: str, graph: StageGraph, cluster: Any) -> None:
        where = f"stages.{stage}"
        graph.require_model(config.from_, f"{where}.from")
        from stages.rl.prompts import check_files
        check_files(config.prompts, f"{where}.prompts")
        if config.judge is not None and config.judge.serve is not None:
            graph.require_model(config.judge.serve, f"{where}.judge.serve")
        tokenizer = graph.tokenizer_of(config.from_)
        if tokenizer is not None and not getattr(graph[tokenizer], "chat_roles", False):
            raise ConfigError(f"{where}.from: the tokenizer of {config.from_!r} (stage "
                              f"{tokenizer!r}) has no chat role tokens; RL prompts are chats: "
                              f"set stages.{tokenizer}.chat_roles=true")
        model, context = graph.model_of(config.from_), graph.context_length_of(config.from_)
        if config.max_new_tokens >= min(context, model.max_position_embeddings):
            raise ConfigError(f"{where}.max_new_tokens: {config.max_new_tokens} leaves no room for "
                              f"a prompt in the context of {config.from_!r} ({context} tokens)")
        if engine_kind(config.engine, cluster.device) == "vllm" and cluster.device != "cuda":
            raise ConfigError(f"{where}.engine: vllm serves rollouts on GPUs only (cluster.device "
                              f"is {cluster.device}); use engine: cpu or auto")
        layout = cls.layout(config, cluster)
        if layout.tensor_parallel > 1 or layout.pipeline_parallel > 1:
            raise ConfigError(f"{where}.parallel: RL runs with tensor_parallel=1 and "
                              "pipeline_parallel=1 for now (the rollout engine and the policy "
                              "loss take the whole model); scale it with data_parallel")
        check_precision(config.precision, cluster, f"{where}.precision")

    @classmethod
    def preflight(cls, config: RlConfig, where: str) -> None:
        super().preflight(config, where)
        if config.task == "code":  # the sandbox must work before any rollout is made
            from stages.rl.sandbox import sandbox_available
            if why := sandbox_available():
                raise RuntimeError(f"{where}.task: code rewards run in a sandbox, which cannot run "
                                   f"here: {why}")

    @classmethod
    def tokens(cls, config: RlConfig) -> int:
        return 0  # rollout lengths are known only while it runs

    @classmethod
    def compute_plan(cls, stage: str, config: RlConfig, cluster: Any) -> Any:
        return None

    @classmethod
    def model_source(cls, config: RlConfig, graph: StageGraph) -> str | None:
        return config.from_

    @classmethod
    def datasets_read(cls, config: RlConfig, artifact: Artifact,
                      upstream: dict[str, Artifact]) -> list[dict]:
        """The prompt sets it trained on and held out (written beside its checkpoints)."""
        return [dict(d, stage=artifact.stage) for d in artifact.datasets]

    @classmethod
    def run(cls, config: RlConfig, inputs: dict[str, StageInput], out_dir: Path,
            ctx: RunContext) -> Artifact:
        from stages.rl.loop import train_rl  # heavy: torch + megatron
        return train_rl(config, inputs, Path(out_dir), ctx)
