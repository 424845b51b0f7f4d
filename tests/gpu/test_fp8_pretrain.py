"""FP8 pretraining through Transformer Engine on a GPU (run on the accelerator machine).

Trains the same tiny Granite-shaped model for a few steps with the TE layer spec twice, in bf16 and
with the "delayed" FP8 recipe, through the real worker (``python -m stages.worker``), and checks
that both losses are finite, fall, and stay close to each other. Reported as "not installed" where
Transformer Engine is absent. ``pytest -m gpu tests/gpu``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.gpu.worker_runs import losses, run_worker, worker_spec

pytestmark = [pytest.mark.gpu, pytest.mark.needs("transformer_engine"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STEPS = 40


def train(data, out, precision: dict) -> dict[int, float]:
    run_worker(worker_spec(data, out, precision, STEPS), timeout=600)
    return losses(out)


def test_fp8_delayed_tracks_bf16(tokenized, tmp_path, figure):
    bf16 = train(tokenized, tmp_path / "bf16", {"dtype": "bf16"})
    fp8 = train(tokenized, tmp_path / "fp8", {"dtype": "bf16", "fp8": "delayed"})
    assert sorted(bf16) == sorted(fp8) == list(range(1, STEPS + 1))
    for curve in (bf16, fp8):
        assert all(np.isfinite(v) for v in curve.values())
        assert np.mean([curve[s] for s in range(STEPS - 4, STEPS + 1)]) < curve[1] - 1.0
    last = lambda c: np.mean([c[s] for s in range(STEPS - 4, STEPS + 1)])  # noqa: E731
    figure(f"last-5 loss bf16 {last(bf16):.3f}, fp8 delayed {last(fp8):.3f}")
    assert abs(last(fp8) - last(bf16)) < 0.15 * last(bf16)
