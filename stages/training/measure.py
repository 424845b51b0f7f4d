"""Fixed-step training on synthetic tokens through the pretrain stage's own step, measured.

Shared by ``benchmarks/mfu.py`` (tokens/s, MFU and memory per precision) and
``tests/gpu/test_fp8_tracks_bf16.py`` (an FP8 loss curve tracks the bf16 one). What is the stage's
own: process and model-parallel set-up (``loop.setup``), the model (``model.build_model``: local
spec on CPU, Transformer Engine spec and the FP8 recipe on GPU), a validated ``PretrainConfig``,
AdamW (``step.make_optimizer``), the LR schedule (``schedules.lr_at``) and the step itself
(``step.train_step``: micro-batches, token-mean loss, global-norm clip). What is not: the tokens
come from an in-memory Markov chain (no blended dataset, no disk reads) and nothing is saved.

Every run re-applies the seed before building, and FP8 does not change what the TE layers draw at
init, so every precision starts from the same weights and sees the same batches: curves compare
step for step.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import random
import time

import numpy as np
import torch

from stages.cluster import ParallelSpec
from stages.specs import FP8_RECIPES, ModelSpec, PrecisionSpec, ScheduleSpec

# Markov chain of the synthetic tokens: each token has len(SUCCESSOR_P) likely successors, and
# one token in NOISE is uniform. The loss falls smoothly from ln(vocab) towards its floor
# (entropy ~ 0.9 x 1.2 + 0.1 x ln(vocab / 0.1) nats), with no sudden drop that could land a few
# steps apart in two precisions.
SUCCESSOR_P = (0.5, 0.25, 0.15, 0.1)
NOISE = 0.1


def precision_of(name: str) -> PrecisionSpec:
    """'bf16' / 'fp32', or an FP8 recipe (bf16 autocast around it, as the stage runs FP8)."""
    if name in ("bf16", "fp32"):
        return PrecisionSpec(dtype=name)
    if name not in FP8_RECIPES:
        raise ValueError(f"unknown precision {name!r}; use bf16, fp32 or one of {FP8_RECIPES}")
    return PrecisionSpec(dtype="bf16", fp8=name)


def markov_tokens(vocab: int, sequences: int, seq: int, seed: int) -> torch.Tensor:
    """[sequences, seq + 1] int64 token ids (CPU), the same for the same arguments."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, vocab, size=(vocab, len(SUCCESSOR_P)))
    cum = np.cumsum(SUCCESSOR_P)
    cum[-1] = 1.0
    out = np.empty((sequences, seq + 1), dtype=np.int64)
    out[:, 0] = rng.integers(0, vocab, sequences)
    for t in range(seq):  # vectorised over sequences: seq small numpy calls
        follow = successors[out[:, t], np.searchsorted(cum, rng.random(sequences), side="right")]
        noise = rng.integers(0, vocab, sequences)
        out[:, t + 1] = np.where(rng.random(sequences) < NOISE, noise, follow)
    return torch.from_numpy(out)


class TokenSamples:
    """Rows of a token tensor as the samples ``step.run_micro_batches`` reads (via
    ``mixture.batch``): tokens, the next tokens as labels, every token in the loss."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens
        self.loss_mask = torch.ones(tokens.shape[1] - 1, device=tokens.device)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.tokens[i]
        return {"tokens": row[:-1], "labels": row[1:], "loss_mask": self.loss_mask}


@dataclasses.dataclass
class Run:
    """One precision's run: the loss of every step and the timed steps' throughput."""
    name: str
    losses: list[float]
    tokens_per_s: float
    seconds: float                 # timed steps only
    peak_memory_bytes: int | None  # torch.cuda.max_memory_allocated over the run; None on CPU
    spec: str                      # "te" or "local" (the layer spec it ran with)

    def final_loss(self, last: int = 5) -> float:
        tail = self.losses[-last:]
        return float(np.mean(tail)) if tail else math.nan


def start(device: str, seed: int):
    """Process group (a world of one) and Megatron's model-parallel state, as a worker sets them
    up; returns the worker's ``Env``. Pair with ``finish()``."""
    from stages.training.loop import setup
    # accelerator only sizes `forge plan`; setup reads device, layout and threads
    cluster = ParallelSpec(device=device, accelerator="cpu" if device == "cpu" else "h100")
    return setup(cluster, seed)


def finish() -> None:
    from stages.training.loop import teardown
    teardown()


def reseed(device: str, seed: int) -> None:
    """The seeds ``loop.setup`` applies, again: the next model starts from the same weights."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device == "cpu":
        from stages.training.cpu_shim import init_cpu_rng_tracker
        init_cpu_rng_tracker()
    else:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(seed)


def release(device: str) -> None:
    """Free the last run's memory and Transformer Engine's global FP8 state (its amax buffers
    hold the old model's tensors and would be updated every step of the next run)."""
    gc.collect()
    if device != "cuda":
        return
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    from stages.training.model import have_transformer_engine
    if have_transformer_engine():
        try:
            from transformer_engine.pytorch.quantization import FP8GlobalStateManager
        except ImportError:
            from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
        FP8GlobalStateManager.reset()


def train(spec: ModelSpec, name: str, env, tokens: torch.Tensor, *, batch: int, micro_batch: int,
          steps: int, warmup: int, lr: float, lr_warmup: int = 0, seed: int = 1234,
          use_te: bool | None = None, on_step=None) -> Run:
    """Train a fresh model in precision ``name`` for ``steps`` steps of ``batch`` rows of
    ``tokens`` (step i takes rows [i * batch, (i + 1) * batch)); time the steps after ``warmup``.

    ``use_te`` defaults to the stage's choice (TE on GPU). ``on_step(step, loss)`` is called after
    every step (progress lines)."""
    from stages.training.pretrain import PretrainConfig
    from stages.training.model import build_model, causal_mask
    from stages.training.schedules import lr_at
    from stages.training.step import make_optimizer, train_step

    device = env.device
    seq = tokens.shape[1] - 1
    if tokens.shape[0] < steps * batch:
        raise ValueError(f"{tokens.shape[0]} sequences of tokens, {steps} x {batch} needed")
    if not 0 <= warmup < steps:
        raise ValueError(f"warmup ({warmup}) must be below steps ({steps})")
    use_te = (device == "cuda") if use_te is None else use_te
    precision = precision_of(name)
    if precision.fp8 != "none" and not use_te:
        raise ValueError("FP8 runs only with the Transformer Engine layer spec")
    spec = dataclasses.replace(spec, max_position_embeddings=max(spec.max_position_embeddings, seq))
    config = PretrainConfig(
        data="synthetic", model=spec, tokens=steps * batch * seq, seq_length=seq,
        global_batch_size=batch, mixture={"synthetic": 1.0}, precision=precision, seed=seed,
        schedule=ScheduleSpec(kind="constant", lr=lr, warmup_steps=lr_warmup),
        micro_batch_size=micro_batch)
    release(device)
    reseed(device, seed)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build_model(spec, precision, device=device, use_te=use_te)
    optimizer = make_optimizer(model, config)
    samples = TokenSamples(tokens.to(device))
    mask = causal_mask(seq, device)
    model.train()
    losses, t0 = [], time.perf_counter()
    try:
        for step in range(steps):
            if step == warmup:
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            rows = range(step * batch, (step + 1) * batch)
            loss, _ = train_step(model, None, optimizer, samples, rows, micro_batch,
                                 lr_at(config.schedule, step, steps), mask, config, env)
            losses.append(loss)  # train_step synchronises (it reads the loss and the grad norm)
            if on_step is not None:
                on_step(step + 1, loss)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    finally:
        del model, optimizer, samples
        release(device)
    return Run(name=name, losses=losses, tokens_per_s=(steps - warmup) * batch * seq / seconds,
               seconds=seconds, peak_memory_bytes=peak, spec="te" if use_te else "local")
