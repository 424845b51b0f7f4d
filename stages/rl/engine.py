"""Rollout engines behind one interface: generate with per-token log-probs, load new weights,
sleep/wake where the engine can.

Two engines implement ``RolloutEngine``: ``cpu`` (``stages/rl/cpu_engine.py``: our own batched
generation on a transformers ``GraniteForCausalLM``, fp32, what CI runs) and ``vllm``
(``stages/rl/vllm_engine.py``: the GPU worker image). Both are fed by the one weight-streaming
path, ``stages.models.weights.hf_weights_from_model``: (Hugging Face name, tensor) pairs from the
live Megatron policy, so what CI loads is what vLLM loads.

Behaviour log-prob (the trainer computes the same, ``kernels/`` and ``stages/rl/``): for a
completion token ``y_t`` sampled after context ``x, y_<t`` at temperature ``T > 0``,

    logp_t = log_softmax(z_t / T)[y_t],   z_t = the model's logits over the real vocabulary
                                                 (ids 0 .. spec.vocab_size - 1, no TP padding),

taken BEFORE top-p truncation: the nucleus decides which tokens may be drawn, not the reported
probability (so with top_p < 1, exp(logp_t) is the untruncated probability of a drawn token).
``score`` returns the same quantity teacher-forced over a given completion.

Sampling (both engines): top-p keeps the smallest set of most probable tokens (probabilities of
``z_t / T``) whose mass reaches ``top_p`` (the most probable token always); a token is drawn from
that set renormalised. ``temperature`` must be > 0 (greedy decoding is not a rollout).

Determinism: the completions of prompt ``p`` depend only on (weights, ``prompts[p]``,
``seeds[p]``, ``n``, the sampling arguments), not on the other prompts of the batch, so a
data-parallel run with DP=1 or DP=2 samples the same rollouts (up to floating-point near-ties:
the logits of a row may differ in the last bits with the batch's shapes, which can only change a
draw when two candidates are within rounding of each other).

Stops: a row ends at the first token in ``stop_ids`` (included in ``tokens``, ``finish="stop"``)
or after ``max_new_tokens`` tokens (``finish="length"``).
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Literal, Sequence

if TYPE_CHECKING:
    import torch

    from stages.specs import ModelSpec

# kind -> (module, class), imported on demand: the engine modules import this one (the interface),
# so this one names them instead of importing them (no import cycle; vLLM only where it is asked for).
ENGINES = {"cpu": ("stages.rl.cpu_engine", "CpuEngine"),
           "vllm": ("stages.rl.vllm_engine", "VllmEngine")}


@dataclass
class Completion:
    """One sampled completion."""
    tokens: list[int]        # generated ids, the stop token included when it stopped on one
    logprobs: list[float]    # behaviour log-prob of each generated token (module docstring)
    finish: str              # "stop" | "length"


class RolloutEngine(ABC):
    """Generates completions with behaviour log-probs from weights streamed in by HF name."""
    name: str

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, "torch.Tensor"]]) -> None:
        """Copy (HF name, tensor) pairs into the engine's model; every parameter must come, once."""

    @abstractmethod
    def generate(self, prompts: list[list[int]], *, n: int, max_new_tokens: int,
                 temperature: float, top_p: float, stop_ids: Sequence[int],
                 seeds: Sequence[int]) -> list[list[Completion]]:
        """``n`` completions of each prompt: ``out[p][i]``."""

    @abstractmethod
    def score(self, prompt: list[int], completion: list[int], temperature: float) -> list[float]:
        """Teacher-forced behaviour log-probs of ``completion`` after ``prompt``."""

    def sleep(self) -> None:
        """Free memory where the engine can (vLLM's sleep mode); the weights must be loaded
        again (or woken) before the next ``generate``."""

    def wake(self) -> None:
        """Undo ``sleep``."""

    def close(self) -> None:
        """Release the engine; it cannot be used afterwards."""


def engine_kind(choice: str, device: str) -> str:
    """The engine an ``engine:`` setting means on ``device`` (auto: vllm on cuda, else cpu)."""
    return ("vllm" if device == "cuda" else "cpu") if choice == "auto" else choice


def check_sampling(prompts: list[list[int]], *, n: int, max_new_tokens: int, temperature: float,
                   top_p: float, stop_ids: Sequence[int], seeds: Sequence[int],
                   vocab_size: int, max_positions: int) -> None:
    """Refuse bad generate() arguments with the field and the fix (shared by the engines)."""
    problems = []
    if not prompts:
        problems.append("prompts is empty; pass at least one prompt")
    if n < 1:
        problems.append(f"n={n}; ask for at least one completion per prompt")
    if max_new_tokens < 1:
        problems.append(f"max_new_tokens={max_new_tokens}; it must be >= 1")
    if not temperature > 0:
        problems.append(f"temperature={temperature}; sampling needs temperature > 0")
    if not 0 < top_p <= 1:
        problems.append(f"top_p={top_p}; it must be in (0, 1] (1 keeps the whole vocabulary)")
    if len(seeds) != len(prompts):
        problems.append(f"{len(seeds)} seeds for {len(prompts)} prompts; pass one seed per prompt")
    for i, p in enumerate(prompts):
        if not p:
            problems.append(f"prompts[{i}] is empty; a prompt needs at least one token")
        elif min(p) < 0 or max(p) >= vocab_size:
            problems.append(f"prompts[{i}] has ids outside [0, {vocab_size}) (the spec's vocab_size)")
        elif len(p) + max_new_tokens > max_positions:
            problems.append(f"prompts[{i}]: {len(p)} tokens + max_new_tokens={max_new_tokens} pass "
                            f"max_position_embeddings={max_positions}; shorten one of them")
    bad_stops = [s for s in stop_ids if not 0 <= s < vocab_size]
    if bad_stops:
        problems.append(f"stop_ids {bad_stops} are outside [0, {vocab_size})")
    if problems:
        raise ValueError("generate: " + "; ".join(problems))


def make_engine(kind: Literal["cpu", "vllm"], spec: "ModelSpec", *,
                tokenizer_dir: Path | None = None, **options) -> RolloutEngine:
    """A rollout engine for models of ``spec``, with no weights yet: ``load_weights`` next.

    ``tokenizer_dir`` (a folder with the tokenizer files) is passed to engines that take one;
    neither needs it today: both take and return token ids. ``options`` go to the engine's constructor
    (``CpuEngine`` / ``VllmEngine``)."""
    if kind not in ENGINES:
        raise ValueError(f"make_engine: kind={kind!r}; choose one of {', '.join(ENGINES)}")
    module, cls = ENGINES[kind]
    engine = getattr(importlib.import_module(module), cls)
    if kind == "vllm":
        options["tokenizer_dir"] = tokenizer_dir
    return engine(spec, **options)
