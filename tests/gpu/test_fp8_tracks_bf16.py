"""FP8 training tracks bf16 over 300 steps, for each FP8 recipe this GPU can run.

A small Granite-shaped model (4 layers, hidden 1024, 8/2 heads of 128, MLP 3200, vocabulary 8192,
untied) trains 300 steps of 8 x 1024 synthetic tokens (a Markov chain: its loss falls smoothly,
stages/training/measure.py) in bf16 and in each FP8 recipe, from the same weights on the same
batches, through the pretrain stage's own model build, AdamW and train step. Per recipe it asserts:

- every loss is finite;
- the curve learns (the mean of the last 100 steps is more than 2 nats below step 1), so two
  curves that learned nothing cannot pass;
- over the last 100 steps, the mean absolute difference between the FP8 and the bf16 curve, each
  smoothed by a trailing 20-step mean, is below 2% of the bf16 loss there.

Recipes this GPU or its Transformer Engine cannot run are skipped with the reason (mxfp8 needs
Blackwell); all of them are reported as "not installed" where Transformer Engine is absent.
About 15 s per recipe on an H100-class GPU (an estimate; not yet run).
``pytest -m gpu tests/gpu -s`` prints the figures.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.specs import FP8_RECIPES, ModelSpec

pytestmark = [pytest.mark.gpu, pytest.mark.needs("transformer_engine"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# every width a multiple of 128: what the block-scaled recipes' GEMMs want
SPEC = ModelSpec(name="granite-fp8-probe", hidden_size=1024, num_layers=4, num_attention_heads=8,
                 num_query_groups=2, kv_channels=128, ffn_hidden_size=3200, vocab_size=8192,
                 max_position_embeddings=1024, tied_embeddings=False)
SEQ, BATCH, STEPS, SEED = 1024, 8, 300, 1234
LR, LR_WARMUP = 6e-4, 30
WINDOW, SMOOTH, TOLERANCE, MIN_DROP = 100, 20, 0.02, 2.0


def smoothed(losses: list[float], width: int = SMOOTH) -> np.ndarray:
    """Trailing mean over ``width`` steps (fewer at the start)."""
    x = np.asarray(losses, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(x)])
    n = np.minimum(np.arange(1, len(x) + 1), width)
    return (c[1:] - c[np.arange(1, len(x) + 1) - n]) / n


def tracking_error(reference: list[float], losses: list[float]) -> float:
    """Mean |smoothed loss - smoothed reference| over the last WINDOW steps, relative to the
    reference's mean there."""
    ref, got = smoothed(reference)[-WINDOW:], smoothed(losses)[-WINDOW:]
    return float(np.mean(np.abs(got - ref)) / np.mean(ref))


@pytest.fixture(scope="module")
def runs():
    """bf16 and every runnable FP8 recipe, trained once for the module: name -> Run, the reason
    it cannot run here, or the exception it raised."""
    from stages.training import measure
    from stages.training.model import fp8_unsupported
    # installed (the marker says so) but not importable is a failure, with its import error
    import transformer_engine  # noqa: F401
    from megatron.core.extensions import transformer_engine as _  # noqa: F401
    env = measure.start("cuda", SEED)
    out = {}
    try:
        tokens = measure.markov_tokens(SPEC.vocab_size, STEPS * BATCH, SEQ, SEED)
        for name in ("bf16",) + FP8_RECIPES:
            why = fp8_unsupported(name) if name != "bf16" else ""
            if why:
                out[name] = why
                print(f"[{name}] skipped: {why}", flush=True)
                continue
            try:
                run = measure.train(SPEC, name, env, tokens, batch=BATCH, micro_batch=BATCH,
                                    steps=STEPS, warmup=10, lr=LR, lr_warmup=LR_WARMUP, seed=SEED)
            except Exception as e:  # fail that recipe's test only, keep the others' figures
                out[name] = e
                print(f"[{name}] FAILED: {type(e).__name__}: {e}", flush=True)
                continue
            out[name] = run
            picks = ", ".join(f"{s}: {run.losses[s - 1]:.3f}" for s in (1, 100, 200, STEPS))
            print(f"[{name}] loss {picks}; {run.tokens_per_s:.0f} tok/s, "
                  f"peak {run.peak_memory_bytes / 2**30:.1f} GiB", flush=True)
    finally:
        measure.finish()
    return out


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_fp8_loss_tracks_bf16(runs, recipe, figure):
    bf16, fp8 = runs["bf16"], runs[recipe]
    if isinstance(fp8, str):
        pytest.skip(fp8)
    for name, got in (("bf16", bf16), (recipe, fp8)):
        if isinstance(got, Exception):
            pytest.fail(f"{name} did not train: {type(got).__name__}: {got}")
    for run in (bf16, fp8):
        bad = [i + 1 for i, v in enumerate(run.losses) if not math.isfinite(v)]
        assert not bad, f"{run.name}: non-finite loss at steps {bad[:10]}"
        tail = float(np.mean(run.losses[-WINDOW:]))
        assert tail < run.losses[0] - MIN_DROP, \
            f"{run.name} did not learn: step 1 {run.losses[0]:.3f}, last {WINDOW} steps {tail:.3f}"
    err = tracking_error(bf16.losses, fp8.losses)
    last = float(np.mean(smoothed(bf16.losses)[-WINDOW:]))
    print(f"[{recipe}] vs bf16 over the last {WINDOW} steps: mean |diff| {err:.2%} of the bf16 loss "
          f"({last:.3f}); tokens/s {fp8.tokens_per_s / bf16.tokens_per_s:.2f}x bf16", flush=True)
    figure(f"{err:.2%} of the bf16 loss; {fp8.tokens_per_s / bf16.tokens_per_s:.2f}x bf16 tok/s")
    assert len(fp8.losses) == len(bf16.losses) == STEPS
    assert err < TOLERANCE, (f"{recipe} drifts from bf16: {err:.2%} of the loss over the last "
                             f"{WINDOW} steps (tolerance {TOLERANCE:.0%})")
